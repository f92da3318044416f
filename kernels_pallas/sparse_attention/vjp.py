"""`jax.custom_vjp` around the Pallas kernels (a `pallas_call` is not differentiable by itself).

Residuals: the inputs, out and lse. The backward takes cotangents of both outputs; the lse
cotangent folds into delta (see `tpu.softmax_delta`). Integer inputs (indices, segment ids)
get no cotangent.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax

from kernels_pallas.sparse_attention import gpu, tpu
from kernels_pallas.sparse_attention.config import SparseAttentionConfig

_KERNELS = {
    "pallas_tpu": (tpu.csa_fwd_tpu, tpu.csa_bwd_tpu),
    "pallas_gpu": (gpu.csa_fwd_gpu, gpu.csa_bwd_gpu),
}


class Static(NamedTuple):
    """Hashable non-array arguments of one kernel call."""
    implementation: str
    window: int
    scale: float
    config: SparseAttentionConfig
    interpret: bool


def _kw(st: Static):
    return dict(window=st.window, scale=st.scale, cfg=st.config, interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def csa_pallas(q, kv, compressed, topk_idx, sink, segment_ids, st: Static):
    """(out [B,S,H,D], lse [B,S,H]) from the kernel named by st.implementation."""
    fwd, _ = _KERNELS[st.implementation]
    return fwd(q, kv, compressed, topk_idx, sink, segment_ids=segment_ids, **_kw(st))


def _csa_fwd(q, kv, compressed, topk_idx, sink, segment_ids, st):
    fwd, _ = _KERNELS[st.implementation]
    out, lse = fwd(q, kv, compressed, topk_idx, sink, segment_ids=segment_ids, **_kw(st))
    return (out, lse), (q, kv, compressed, topk_idx, sink, segment_ids, out, lse)


def _csa_bwd(st, res, cts):
    q, kv, compressed, topk_idx, sink, segment_ids, out, lse = res
    dout, dlse = cts
    _, bwd = _KERNELS[st.implementation]
    dq, dkv, dc, dsink = bwd(q, kv, compressed, topk_idx, sink, out, lse, dout,
                             segment_ids=segment_ids, dlse=dlse, **_kw(st))
    return dq, dkv, dc, None, dsink, None


csa_pallas.defvjp(_csa_fwd, _csa_bwd)
