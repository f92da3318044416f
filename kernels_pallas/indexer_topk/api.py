"""Entry point of the fused lightning indexer: scores + exact top-k without the score matrix.

    idx = indexer_topk(q, weights, keys, k=k, ratio=m, key_valid=None, segment_ids=None,
                       return_scores=False, implementation=None, interpret=None, config=None)

q [B, S, Hi, Di], weights [B, S, Hi] (already scaled), keys [B, N, Di] (compressed indexer keys),
key_valid [B, N] bool (None = all valid), segment_ids [B, S] int (packed documents; None = one
document). Semantics = `sparse_lm.ops.indexer` (`indexer_scores` over
`sparse_lm.ops.masks.sequence_entry_visible`, then `select_topk`): I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]) for visible s (s < (t+1)//m, valid,
same document), the k best per query, best first, ties to the lower index (exactly
`lax.top_k`'s order), -1 (score -inf) where fewer than k entries are visible.
-> idx [B, S, k] int32 (and scores [B, S, k] fp32 with return_scores). Forward only: top-k has
no gradient (the indexer learns through its KL objective).

Implementations (`OP`, a `kernels_pallas.registry.Op`): "reference" (the naive [B, S, N] scores
then `lax.top_k`), "xla" (the same in query chunks, O(chunk * N) memory), "pallas_tpu" (Mosaic),
"pallas_gpu" (Pallas Triton). None = the target platform's preference: "pallas_tpu" on TPU,
"pallas_gpu" on GPU (each where its blocks take the shapes, else "xla", logged once), "xla" on
CPU. `interpret=None` = interpret the Pallas kernels iff the target platform is CPU.
"""
from __future__ import annotations


import jax
import numpy as np

from kernels_pallas import compat, registry
from kernels_pallas.indexer_topk import reference
from kernels_pallas.indexer_topk.config import IndexerTopkConfig, default_config
from kernels_pallas.indexer_topk.gpu import indexer_topk_gpu
from kernels_pallas.indexer_topk.plan import QUERY_PAD, Layout, finish
from kernels_pallas.indexer_topk.tpu import indexer_topk_tpu


def validate_inputs(q, weights, keys, *, k, ratio, key_valid=None, segment_ids=None,
                    key_segments=None, query_offset=0):
    """Raises ValueError/TypeError naming the offending argument."""
    b, s, h, d = registry.check_query(q, "[B, S, Hi, Di]")
    if weights.shape != (b, s, h):
        raise ValueError(f"weights has shape {weights.shape}: expected [B, S, Hi] = {(b, s, h)}")
    if keys.ndim != 3 or keys.shape[0] != b or keys.shape[2] != d:
        raise ValueError(f"keys has shape {keys.shape}: expected [B={b}, N, Di={d}]")
    n = keys.shape[1]
    if n < 1:
        raise ValueError("keys has N = 0 entries: expected N >= 1 (nothing to select from)")
    if keys.dtype != q.dtype:
        raise TypeError(f"keys has dtype {keys.dtype}: expected q's dtype {q.dtype}")
    registry.check_positive_int("ratio", ratio)
    registry.check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k={k} is larger than the number of keys N={n}: expected 1 <= k <= N "
                         "(the model passes min(index_topk, N))")
    if k >= 2 ** 24:
        raise ValueError(f"k={k} is too large: expected k < 2**24")
    if n >= 2 ** 30:
        raise ValueError(f"N={n} keys is too many: expected N < 2**30")
    if key_valid is not None and key_valid.shape != (b, n):
        raise ValueError(f"key_valid has shape {key_valid.shape}: expected [B, N] = {(b, n)}")
    registry.check_segment_ids(segment_ids, b, s)
    if key_segments is not None:
        if segment_ids is None:
            raise ValueError("key_segments given without segment_ids: the entries' documents "
                             "need the queries' documents")
        if key_segments.shape != (b, n):
            raise ValueError(f"key_segments has shape {key_segments.shape}: expected [B, N] = "
                             f"{(b, n)}")
    if isinstance(query_offset, (int, np.integer)):
        if isinstance(query_offset, bool) or query_offset < 0:
            raise ValueError(f"query_offset={query_offset!r} is invalid: expected an int >= 0 "
                             "(or a traced int32 scalar)")
    elif getattr(query_offset, "shape", None) != () or not jax.numpy.issubdtype(
            query_offset.dtype, jax.numpy.integer):
        raise ValueError(f"query_offset has shape {getattr(query_offset, 'shape', None)}: "
                         "expected an int or an integer scalar array")
    if segment_ids is not None:
        if key_segments is None and n * ratio > s:
            raise ValueError(f"keys has N={n} entries but S={s} // ratio={ratio} = {s // ratio}: "
                             "with segment_ids every entry must have its window in the sequence")
        # on the host (np.asarray): a jnp reduction inside an outer trace would be traced too
        low = int(np.asarray(segment_ids).min()) if compat.is_concrete(segment_ids) and \
            segment_ids.size else QUERY_PAD + 1
        if low <= QUERY_PAD:
            raise ValueError(f"segment_ids holds {low}: ids must be > "
                             f"{QUERY_PAD} (the two smallest int32 values are sentinels)")


def _jnp(fn):
    def run(q, weights, keys, *, k, ratio, key_valid, segment_ids, key_segments, query_offset,
            return_scores, config, scores_only):
        idx, vals = fn(q, weights, keys, k=k, ratio=ratio, key_valid=key_valid,
                       segment_ids=segment_ids, key_segments=key_segments,
                       query_offset=query_offset)
        return (idx, vals) if return_scores else idx
    return run


def _pallas(implementation: str):
    family = "tpu" if implementation == "pallas_tpu" else "gpu"

    def run(q, weights, keys, *, k, ratio, key_valid, segment_ids, key_segments, query_offset,
            return_scores, config, scores_only, interpret):
        b, s, h, d = q.shape
        config = config or default_config(family, compiled=not interpret)
        config.validate_for(family, compiled=not interpret, k=k, heads=h, dim=d)
        lay = Layout(b=b, s=s, h=h, d=d, n=keys.shape[1], k=k, ratio=ratio, bq=config.block_q,
                     bk=config.key_block(k, backend=family, compiled=not interpret),
                     width=config.merge_width(k, backend=family, compiled=not interpret),
                     scores_only=scores_only)
        if family == "tpu":
            idx, vals = indexer_topk_tpu(q, weights, keys, lay=lay, key_valid=key_valid,
                                         segment_ids=segment_ids, key_segments=key_segments,
                                         query_offset=query_offset,
                                         vmem_limit_bytes=config.vmem_limit_bytes,
                                         with_scores=return_scores, interpret=interpret)
        else:
            idx, vals = indexer_topk_gpu(q, weights, keys, lay=lay, key_valid=key_valid,
                                         segment_ids=segment_ids, key_segments=key_segments,
                                         query_offset=query_offset, num_warps=config.num_warps,
                                         num_stages=config.num_stages,
                                         with_scores=return_scores, interpret=interpret)
        return finish(lay, idx, vals)

    def check(q, weights, keys, *, k, config, interpret, **_):
        """The compiled kernel's block rules on these heads / dims / k."""
        cfg = config or default_config(family, compiled=not interpret)
        return registry.problem_of(cfg.validate_for, family, compiled=not interpret, k=k,
                                   heads=q.shape[2], dim=q.shape[3])

    return registry.Implementation(implementation, run, platforms=(family,), check=check,
                                   interpretable=True)


OP = registry.Op(
    "indexer_topk",
    [registry.Implementation("reference", _jnp(reference.indexer_topk_reference)),
     registry.Implementation("xla", _jnp(reference.indexer_topk_xla)),
     _pallas("pallas_tpu"), _pallas("pallas_gpu")],
    preference=registry.KERNEL_PREFERENCE, aliases=registry.KERNEL_ALIASES)
IMPLEMENTATIONS = OP.names
default_implementation = OP.default_implementation


def indexer_topk(q: jax.Array, weights: jax.Array, keys: jax.Array, *, k: int, ratio: int,
                 key_valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 key_segments: jax.Array | None = None, query_offset=0,
                 return_scores: bool = False, implementation: str | None = None,
                 interpret: bool | None = None, config: IndexerTopkConfig | None = None,
                 platform: str | None = None):
    """-> idx [B, S, k] int32 (-1 = none), plus scores [B, S, k] fp32 with return_scores.
    platform: the target (None = `registry.current_platform()`).

    Context parallelism (a shard of the query rows): query_offset (an int or a traced int32
    scalar, e.g. `axis_index * S_local`) is the position of row 0, so row t sees the entries
    e < (offset + t + 1) // ratio; key_segments [B, N] gives the entries' documents where
    segment_ids [B, S] cover only the shard's rows. The key-tile plan is traced (per query
    block, from the offset), the grid walks every key tile and the mask is exact."""
    return _run(q, weights, keys, k=k, ratio=ratio, key_valid=key_valid,
                segment_ids=segment_ids, key_segments=key_segments, query_offset=query_offset,
                return_scores=return_scores,
                implementation=implementation, interpret=interpret, config=config,
                scores_only=False, platform=platform)


def indexer_max_score(q: jax.Array, weights: jax.Array, keys: jax.Array, *, ratio: int,
                      key_valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                      implementation: str | None = None, interpret: bool | None = None,
                      config: IndexerTopkConfig | None = None):
    """The best visible score per query [B, S] fp32 (-inf if none), computed by the fused
    kernels' scoring pass with the top-k merge replaced by a running max: what scoring alone
    costs (the benchmark's "scores_only" arm). Pallas implementations only."""
    if implementation not in ("pallas_tpu", "pallas_gpu"):
        raise ValueError(f"implementation={implementation!r} is invalid for indexer_max_score: "
                         "allowed values ('pallas_tpu', 'pallas_gpu')")
    _, vals = _run(q, weights, keys, k=1, ratio=ratio, key_valid=key_valid,
                   segment_ids=segment_ids, key_segments=None, query_offset=0,
                   return_scores=True, implementation=implementation,
                   interpret=interpret, config=config, scores_only=True)
    return vals[..., 0]


def _run(q, weights, keys, *, k, ratio, key_valid, segment_ids, key_segments, query_offset,
         return_scores, implementation, interpret, config, scores_only, platform=None):
    implementation = OP.canonical(implementation, platform)
    if config is not None and not isinstance(config, IndexerTopkConfig):
        raise TypeError(f"config={config!r} is invalid: expected an IndexerTopkConfig or None")
    validate_inputs(q, weights, keys, k=k, ratio=ratio, key_valid=key_valid,
                    segment_ids=segment_ids, key_segments=key_segments, query_offset=query_offset)
    q, weights, keys = jax.lax.stop_gradient((q, weights, keys))
    return OP(q, weights, keys, k=int(k), ratio=int(ratio), key_valid=key_valid,
              segment_ids=segment_ids, key_segments=key_segments, query_offset=query_offset,
              return_scores=return_scores, config=config,
              scores_only=scores_only, implementation=implementation, interpret=interpret,
              platform=platform)
