"""Entry point of the fused lightning indexer: scores + exact top-k without the score matrix.

    idx = indexer_topk(q, weights, keys, k=k, ratio=m, key_valid=None, segment_ids=None,
                       return_scores=False, implementation=None, interpret=None, config=None)

q [B, S, Hi, Di], weights [B, S, Hi] (already scaled), keys [B, N, Di] (compressed indexer keys),
key_valid [B, N] bool (None = all valid), segment_ids [B, S] int (packed documents; None = one
document). Semantics = `sparse_lm.ops.indexer` (`indexer_scores` over `entry_visibility`, then
`select_topk`): I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s]) for visible s (s < (t+1)//m, valid,
same document), the k best per query, best first, ties to the lower index (exactly
`lax.top_k`'s order), -1 (score -inf) where fewer than k entries are visible.
-> idx [B, S, k] int32 (and scores [B, S, k] fp32 with return_scores). Forward only: top-k has
no gradient (the indexer learns through its KL objective).

Implementations: "reference" (the naive [B, S, N] scores then `lax.top_k`), "xla" (the same in
query chunks, O(chunk * N) memory), "pallas_tpu" (Mosaic), "pallas_gpu" (Pallas Triton). None =
"pallas_tpu" on TPU, "pallas_gpu" on GPU, "xla" on CPU (logged once). `interpret=None` =
interpret the Pallas kernels iff the backend is CPU.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import compat
from kernels_pallas.indexer_topk import reference
from kernels_pallas.indexer_topk.config import IndexerTopkConfig, default_config
from kernels_pallas.indexer_topk.plan import QUERY_PAD, Layout, finish

IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu")


def default_implementation(platform: str | None = None) -> str:
    return compat.platform_implementation("indexer_topk", "xla", platform)


def validate_inputs(q, weights, keys, *, k, ratio, key_valid=None, segment_ids=None):
    """Raises ValueError/TypeError naming the offending argument."""
    if q.ndim != 4:
        raise ValueError(f"q has shape {q.shape}: expected [B, S, Hi, Di]")
    b, s, h, d = q.shape
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"q has dtype {q.dtype}: expected a floating dtype")
    if weights.shape != (b, s, h):
        raise ValueError(f"weights has shape {weights.shape}: expected [B, S, Hi] = {(b, s, h)}")
    if keys.ndim != 3 or keys.shape[0] != b or keys.shape[2] != d:
        raise ValueError(f"keys has shape {keys.shape}: expected [B={b}, N, Di={d}]")
    n = keys.shape[1]
    if n < 1:
        raise ValueError("keys has N = 0 entries: expected N >= 1 (nothing to select from)")
    if keys.dtype != q.dtype:
        raise TypeError(f"keys has dtype {keys.dtype}: expected q's dtype {q.dtype}")
    if not isinstance(ratio, (int, np.integer)) or isinstance(ratio, bool) or ratio < 1:
        raise ValueError(f"ratio={ratio!r} is invalid: expected an int >= 1")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r} is invalid: expected an int >= 1")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of keys N={n}: expected 1 <= k <= N "
                         "(the model passes min(index_topk, N))")
    if k >= 2 ** 24:
        raise ValueError(f"k={k} is too large: expected k < 2**24")
    if n >= 2 ** 30:
        raise ValueError(f"N={n} keys is too many: expected N < 2**30")
    if key_valid is not None and key_valid.shape != (b, n):
        raise ValueError(f"key_valid has shape {key_valid.shape}: expected [B, N] = {(b, n)}")
    if segment_ids is not None:
        if segment_ids.shape != (b, s):
            raise ValueError(f"segment_ids has shape {segment_ids.shape}: expected [B, S] = "
                             f"{(b, s)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids has dtype {segment_ids.dtype}: expected an integer dtype")
        if n * ratio > s:
            raise ValueError(f"keys has N={n} entries but S={s} // ratio={ratio} = {s // ratio}: "
                             "with segment_ids every entry must have its window in the sequence")
        if compat.is_concrete(segment_ids) and segment_ids.size and int(np.min(segment_ids)) <= QUERY_PAD:
            raise ValueError(f"segment_ids holds {int(np.min(segment_ids))}: ids must be > "
                             f"{QUERY_PAD} (the two smallest int32 values are sentinels)")


def indexer_topk(q: jax.Array, weights: jax.Array, keys: jax.Array, *, k: int, ratio: int,
                 key_valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 return_scores: bool = False, implementation: str | None = None,
                 interpret: bool | None = None, config: IndexerTopkConfig | None = None):
    """-> idx [B, S, k] int32 (-1 = none), plus scores [B, S, k] fp32 with return_scores."""
    return _run(q, weights, keys, k=k, ratio=ratio, key_valid=key_valid,
                segment_ids=segment_ids, return_scores=return_scores,
                implementation=implementation, interpret=interpret, config=config,
                scores_only=False)


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
                   segment_ids=segment_ids, return_scores=True, implementation=implementation,
                   interpret=interpret, config=config, scores_only=True)
    return vals[..., 0]


def _run(q, weights, keys, *, k, ratio, key_valid, segment_ids, return_scores, implementation,
         interpret, config, scores_only):
    if implementation is None:
        implementation = default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is invalid: allowed values "
                         f"{IMPLEMENTATIONS + (None,)}")
    if config is not None and not isinstance(config, IndexerTopkConfig):
        raise TypeError(f"config={config!r} is invalid: expected an IndexerTopkConfig or None")
    validate_inputs(q, weights, keys, k=k, ratio=ratio, key_valid=key_valid,
                    segment_ids=segment_ids)
    q, weights, keys = jax.lax.stop_gradient((q, weights, keys))
    kw = dict(k=int(k), ratio=int(ratio), key_valid=key_valid, segment_ids=segment_ids)
    if implementation in ("reference", "xla"):
        fn = (reference.indexer_topk_reference if implementation == "reference"
              else reference.indexer_topk_xla)
        idx, vals = fn(q, weights, keys, **kw)
        return (idx, vals) if return_scores else idx
    interpret = compat.resolve_interpret(interpret)
    backend = "tpu" if implementation == "pallas_tpu" else "gpu"
    b, s, h, d = q.shape
    if config is None:
        config = default_config(backend, compiled=not interpret)
    config.validate_for(backend, compiled=not interpret, k=int(k), heads=h, dim=d)
    width = config.merge_width(int(k), backend=backend, compiled=not interpret)
    lay = Layout(b=b, s=s, h=h, d=d, n=keys.shape[1], k=int(k), ratio=int(ratio),
                 bq=config.block_q, bk=config.key_block(int(k), backend=backend,
                                                         compiled=not interpret),
                 width=width, scores_only=scores_only)
    if backend == "tpu":
        from kernels_pallas.indexer_topk.tpu import indexer_topk_tpu
        idx, vals = indexer_topk_tpu(q, weights, keys, lay=lay, key_valid=key_valid,
                                     segment_ids=segment_ids,
                                     vmem_limit_bytes=config.vmem_limit_bytes,
                                     with_scores=return_scores, interpret=interpret)
    else:
        from kernels_pallas.indexer_topk.gpu import indexer_topk_gpu
        idx, vals = indexer_topk_gpu(q, weights, keys, lay=lay, key_valid=key_valid,
                                     segment_ids=segment_ids, num_warps=config.num_warps,
                                     num_stages=config.num_stages, with_scores=return_scores,
                                     interpret=interpret)
    return finish(lay, idx, vals)
