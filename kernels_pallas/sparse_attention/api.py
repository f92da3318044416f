"""Entry point of the CSA core: window + listed compressed entries + per-head sink, one softmax.

    out, lse = csa_attention(q, kv, compressed, topk_idx, sink, window=W, scale=s,
                             segment_ids=None, implementation=None, interpret=None, config=None)

Semantics are those of `sparse_lm.ops.attention.sparse_attention(..., topk_idx=...,
implementation="reference", return_lse=True)`: query t attends raw keys t-W+1..t of its own
segment, the compressed entries listed in topk_idx[b, t] (-1 = none; a duplicate listing counts
twice; the list is trusted, no visibility check) and a sink logit per head that only enters the
denominator. V = K (one shared head). lse includes the sink.

Implementations (`OP`, a `kernels_pallas.registry.Op`): "reference" (dense masked jnp), "xla"
(gathered jnp), "pallas_tpu" (Mosaic), "pallas_gpu" (Pallas Triton). None = the target
platform's preference: "pallas_tpu" on TPU, "pallas_gpu" on GPU (each where its tiles take the
shapes, else "xla", logged once), "xla" on CPU (Pallas runs only interpreted there; ask for a
pallas_* implementation to interpret it). `interpret=None` = interpret iff the target platform
is CPU. Everything is validated before a kernel is traced.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import compat, registry
from kernels_pallas.sparse_attention import reference
from kernels_pallas.sparse_attention.config import SparseAttentionConfig, default_config
from kernels_pallas.sparse_attention.vjp import Static, csa_pallas


def validate_inputs(q, kv, compressed, topk_idx, sink, *, window, scale, segment_ids=None):
    """Raises ValueError/TypeError naming the offending argument. Index values are checked
    (-1 <= idx < N) when topk_idx is concrete; under `jit` only shapes and dtypes can be."""
    b, s, h, d = registry.check_query(q)
    if kv.shape != (b, s, d):
        raise ValueError(f"kv has shape {kv.shape}: expected [B, S, D] = {(b, s, d)} "
                         "(one shared KV head)")
    if compressed.ndim != 3 or compressed.shape[0] != b or compressed.shape[2] != d:
        raise ValueError(f"compressed has shape {compressed.shape}: expected [B={b}, N, D={d}]")
    if compressed.shape[1] < 1:
        raise ValueError("compressed has N = 0 entries: expected N >= 1")
    for name, x in (("kv", kv), ("compressed", compressed)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype}: expected q's dtype {q.dtype}")
    if topk_idx.dtype != jnp.int32:
        raise TypeError(f"topk_idx has dtype {topk_idx.dtype}: expected int32 (-1 = no entry)")
    if topk_idx.ndim != 3 or topk_idx.shape[:2] != (b, s) or topk_idx.shape[2] < 1:
        raise ValueError(f"topk_idx has shape {topk_idx.shape}: expected [B={b}, S={s}, K>=1]")
    if sink.shape != (h,):
        raise ValueError(f"sink has shape {sink.shape}: expected [H] = {(h,)}")
    registry.check_positive_int("window", window)
    if not np.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale={scale!r} is invalid: expected a finite float > 0")
    registry.check_segment_ids(segment_ids, b, s)
    if compat.is_concrete(topk_idx):
        idx = np.asarray(topk_idx)
        n = compressed.shape[1]
        lo, hi = int(idx.min()), int(idx.max())
        if hi >= n:
            raise ValueError(f"topk_idx holds {hi}, out of range for N={n} compressed entries "
                             "(valid: 0..N-1, and -1 for none)")
        if lo < -1:
            raise ValueError(f"topk_idx holds {lo}: the only negative value allowed is -1 (none)")


def tile_problem(implementation: str, q, *, interpret: bool) -> str | None:
    """Why the compiled kernel cannot tile q's heads / head dim (None if it can, or when
    interpreted: interpret mode accepts any size)."""
    return registry.problem_of(check_kernel_shapes, implementation, q, compiled=not interpret)


def check_kernel_shapes(implementation, q, compiled):
    """Tile constraints of the compiled kernels (interpret mode accepts any size)."""
    if not compiled:
        return
    h, d = q.shape[2], q.shape[3]
    if implementation == "pallas_tpu":
        sub = 8 * (4 // jnp.dtype(q.dtype).itemsize)
        if h % sub:
            raise ValueError(f"num heads H={h} is unsupported by the compiled TPU kernel for "
                             f"{q.dtype}: must be a multiple of {sub} (sublane tile)")
        if d % 128:
            raise ValueError(f"head dim D={d} is unsupported by the compiled TPU kernel: must be "
                             "a multiple of 128 (lane tile)")
    elif implementation == "pallas_gpu":
        for name, v in (("num heads H", h), ("head dim D", d)):
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} is unsupported by the compiled GPU kernel: must be "
                                 "a power of two >= 16 (Triton dot tiles)")


def _pallas(implementation: str):
    family = "tpu" if implementation == "pallas_tpu" else "gpu"

    def run(q, kv, compressed, topk_idx, sink, *, window, scale, segment_ids, config,
            interpret):
        # (Compiling for another platform than the host's is allowed: TPU AOT from a CPU host.)
        if config is None:
            config = default_config(family, compiled=not interpret,
                                    num_selected=topk_idx.shape[-1])
        config.validate_for(family, compiled=not interpret)
        st = Static(implementation, int(window), float(scale), config, interpret)
        return csa_pallas(q, kv, compressed, topk_idx, sink.astype(jnp.float32), segment_ids, st)

    def check(q, kv, compressed, topk_idx, sink, *, interpret, **_):
        return tile_problem(implementation, q, interpret=interpret)

    return registry.Implementation(implementation, run, platforms=(family,), check=check,
                                   interpretable=True)


def _jnp(fn):
    def run(q, kv, compressed, topk_idx, sink, *, window, scale, segment_ids, config):
        return fn(q, kv, compressed, topk_idx, sink, window=window, scale=scale,
                  segment_ids=segment_ids)
    return run


OP = registry.Op(
    "csa_attention",
    [registry.Implementation("reference", _jnp(reference.csa_reference)),
     registry.Implementation("xla", _jnp(reference.csa_xla)),
     _pallas("pallas_tpu"), _pallas("pallas_gpu")],
    preference=registry.KERNEL_PREFERENCE, aliases=registry.KERNEL_ALIASES)
IMPLEMENTATIONS = OP.names
default_implementation = OP.default_implementation


def csa_attention(q: jax.Array, kv: jax.Array, compressed: jax.Array, topk_idx: jax.Array,
                  sink: jax.Array, *, window: int, scale: float,
                  segment_ids: jax.Array | None = None, implementation: str | None = None,
                  interpret: bool | None = None, config: SparseAttentionConfig | None = None,
                  platform: str | None = None):
    """q [B,S,H,D], kv [B,S,D], compressed [B,N,D], topk_idx [B,S,K] int32, sink [H] fp32
    -> (out [B,S,H,D] in q's dtype, lse [B,S,H] fp32). Differentiable in q, kv, compressed, sink.
    platform: the target platform (None = `registry.current_platform()`)."""
    implementation = OP.canonical(implementation, platform)
    if config is not None and not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config={config!r} is invalid: expected a SparseAttentionConfig or None")
    validate_inputs(q, kv, compressed, topk_idx, sink, window=window, scale=scale,
                    segment_ids=segment_ids)
    return OP(q, kv, compressed, topk_idx, sink, window=window, scale=scale,
              segment_ids=segment_ids, config=config, implementation=implementation,
              interpret=interpret, platform=platform)
