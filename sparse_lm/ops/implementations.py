"""The model's ops behind their registries (`kernels_pallas.registry`): one entry point per op
with an `implementation=` switch in the one vocabulary.

  sparse_attention   "reference" / "xla": the attention math of `sparse_lm.ops.attention`;
                     "pallas_tpu" / "pallas_gpu": the kernels of `kernels_pallas` (the
                     token-sparse CSA kernel when entries are listed, the block-sparse kernel
                     otherwise: HCA, SWA, dense CSA). None = the target platform's preference:
                     the platform's kernel on TPU / GPU where its tiles take the shapes, else
                     "xla" (logged once); "xla" on CPU.
  indexer_topk       the fused lightning-indexer score + top-k (`kernels_pallas.indexer_topk`).
The routed-expert product has its registry beside its math: `sparse_lm.ops.moe.EXPERTS`.

The old name "pallas" is an alias of "pallas_<target>" ("pallas_tpu" on CPU, interpreted),
with one deprecation note. The target platform and `interpret=None` follow
`kernels_pallas.registry.current_platform` (an explicit `platform=`, a
`registry.target_platform(...)` block, the mesh in context, else the default backend).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas import registry
from kernels_pallas.block_sparse_attention import api as block_sparse
from kernels_pallas.indexer_topk import api as indexer_kernels
from kernels_pallas.sparse_attention import api as csa
from sparse_lm.ops.attention import attention_reference, attention_xla


# ------------------------------------------------------------------------ sparse attention

def _math(fn):
    def run(q, kv, sink, *, window, scale, segment_ids, compressed, compressed_valid, ratio,
            topk_idx, query_offset, offset_range, compressed_segments):
        if query_offset is not None:
            raise ValueError("query_offset is taken by the block-sparse kernel "
                             "(implementation='pallas_tpu' / 'pallas_gpu'), not by the "
                             "jnp attention math")
        return fn(q, kv, sink, window=window, scale=scale, segment_ids=segment_ids,
                  compressed=compressed, compressed_valid=compressed_valid, ratio=ratio,
                  topk_idx=topk_idx)
    return run


def _pallas(implementation: str):
    def run(q, kv, sink, *, window, scale, segment_ids, compressed, compressed_valid, ratio,
            topk_idx, query_offset, offset_range, compressed_segments, interpret):
        if topk_idx is not None:
            if query_offset is not None:
                raise ValueError("query_offset with topk_idx: a list holds global entry "
                                 "indices already (the kernel trusts it)")
            return csa.csa_attention(q, kv, compressed, topk_idx, sink, window=window,
                                     scale=scale, segment_ids=segment_ids,
                                     implementation=implementation, interpret=interpret)
        return block_sparse.block_sparse_attention(
            q, kv, sink, window=window, scale=scale, compressed=compressed,
            # all entries are valid without documents: the kernel then skips masking
            # positionally full blocks
            compressed_valid=None if segment_ids is None else compressed_valid,
            ratio=ratio if compressed is not None else 0, segment_ids=segment_ids,
            query_offset=query_offset if compressed is not None else None,
            offset_range=offset_range if compressed is not None else None,
            compressed_segments=compressed_segments if compressed is not None else None,
            implementation=implementation, interpret=interpret)

    def check(q, kv, sink, *, topk_idx, interpret, **_):
        if topk_idx is not None:
            return csa.tile_problem(implementation, q, interpret=interpret)
        return block_sparse.tile_problem(implementation, q, interpret=interpret)

    family = implementation.removeprefix("pallas_")
    return registry.Implementation(implementation, run, platforms=(family,), check=check,
                                   interpretable=True)


SPARSE_ATTENTION = registry.Op(
    "sparse_attention",
    [registry.Implementation("reference", _math(attention_reference)),
     registry.Implementation("xla", _math(attention_xla)),
     _pallas("pallas_tpu"), _pallas("pallas_gpu")],
    preference=registry.KERNEL_PREFERENCE, aliases=registry.KERNEL_ALIASES)
ATTENTION_IMPLEMENTATIONS = SPARSE_ATTENTION.names


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, *, window: int, scale: float,
                     segment_ids: jax.Array | None = None, compressed: jax.Array | None = None,
                     compressed_valid: jax.Array | None = None, ratio: int = 0,
                     topk_idx: jax.Array | None = None, implementation: str | None = None,
                     return_lse: bool = False, interpret: bool | None = None,
                     platform: str | None = None, query_offset=None,
                     offset_range: tuple[int, int] | None = None,
                     compressed_segments: jax.Array | None = None):
    """q [B, S, H, D]; kv [B, S, D]; sink [H]; compressed [B, N, D] with compressed_valid [B, N]
    (entries of windows of `ratio` tokens); topk_idx [B, S, K] int32 or None.
    query_offset / offset_range / compressed_segments [B, N]: a context-parallel shard's rows
    for the block-sparse kernel (entries seen at global positions offset + t; see
    `kernels_pallas.block_sparse_attention.block_sparse_attention`); kernels only.

    Returns out [B, S, H, D] in q's dtype (and lse [B, S, H] fp32, sink included, if asked).
    """
    implementation = SPARSE_ATTENTION.canonical(implementation, platform)
    b, s, h, d = q.shape
    if kv.shape != (b, s, d):
        raise ValueError(f"kv has shape {kv.shape}, expected {(b, s, d)} (one shared head)")
    if compressed is not None:
        if ratio < 1 or compressed_valid is None:
            raise ValueError("compressed entries need `ratio` >= 1 and `compressed_valid`")
        if topk_idx is not None and (topk_idx.ndim != 3 or topk_idx.shape[:2] != (b, s)):
            raise ValueError(f"topk_idx has shape {topk_idx.shape}, expected [B={b}, S={s}, K]")
    elif topk_idx is not None:
        raise ValueError("topk_idx given without compressed entries")
    if compressed is not None and (compressed.shape[1] == 0
                                   or (topk_idx is not None and topk_idx.shape[-1] == 0)):
        compressed = compressed_valid = topk_idx = None   # too short for one entry: window only
        query_offset = offset_range = compressed_segments = None
    out, lse = SPARSE_ATTENTION(q, kv, sink, window=window, scale=scale,
                                segment_ids=segment_ids, compressed=compressed,
                                compressed_valid=compressed_valid, ratio=ratio,
                                topk_idx=topk_idx, query_offset=query_offset,
                                offset_range=offset_range,
                                compressed_segments=compressed_segments,
                                implementation=implementation,
                                interpret=interpret, platform=platform)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------- indexer top-k

INDEXER_TOPK = indexer_kernels.OP


def indexer_topk(q: jax.Array, weights: jax.Array, keys: jax.Array, valid: jax.Array, k: int, *,
                 ratio: int, segment_ids: jax.Array | None = None,
                 key_segments: jax.Array | None = None, query_offset=0,
                 implementation: str | None = None, interpret: bool | None = None,
                 platform: str | None = None) -> jax.Array:
    """`select_topk(indexer_scores(q, weights, keys, masks.sequence_entry_visible(S, ratio,
    valid, segment_ids)), k)` without the [B, S, N] score matrix: the fused score + streaming
    top-k of `kernels_pallas.indexer_topk` (implementation None = the target platform's
    preference: Pallas on TPU/GPU, the query-chunked XLA form on CPU; or "reference" / "xla" /
    "pallas_tpu" / "pallas_gpu").

    q [B, S, Hi, Di], weights [B, S, Hi], keys [B, N, Di], valid [B, N] -> [B, S, min(k, N)]
    int32, -1 where fewer entries are visible; same indices, same order (ties to the lower
    index). N == 0 gives [B, S, 0]. A shard of query rows under context parallelism: q's rows
    start at global position `query_offset` (a traced int), and `key_segments` [B, N] give the
    entries' documents (the shard's segment_ids cover only its own rows).
    """
    n = keys.shape[1]
    k_eff = min(k, n)
    if k_eff == 0:
        return jnp.zeros(q.shape[:2] + (0,), jnp.int32)
    return indexer_kernels.indexer_topk(q, weights, keys.astype(q.dtype), k=k_eff, ratio=ratio,
                                        key_valid=valid, segment_ids=segment_ids,
                                        key_segments=key_segments, query_offset=query_offset,
                                        implementation=implementation, interpret=interpret,
                                        platform=platform)
