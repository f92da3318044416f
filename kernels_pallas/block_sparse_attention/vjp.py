"""`jax.custom_vjp` around the kernels: forward kernel, then dq and dkv kernels.

With p = softmax over [visible keys | sink], o = sum_k p_k v_k (V = K), lse = log of the
denominator (sink included), upstream (do, dlse) and Delta_r = do_r . o_r - dlse_r:
    ds_rk   = p_rk (do_r . k_k - Delta_r)
    dq_r    = scale * sum_k ds_rk k_k
    dk_k    = scale * sum_r ds_rk q_r + sum_r p_rk do_r          (score path + value path)
    dsink_h = -sum_{r of head h} exp(sink_h - lse_r) Delta_r
Delta and dsink are O(rows) and computed with XLA; dq and dk by the kernels over the same block
map (dk over its transpose).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse_attention import gpu, tpu
from kernels_pallas.block_sparse_attention.plan import Plan


def _kernels(plan: Plan):
    return tpu if plan.platform == "tpu" else gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention_core(plan: Plan, q2, keys, sink, kpos, kseg, qseg):
    """q2 [B, R_q, D], keys [B, K, D], sink [H] fp32, kpos [B, K] int32, kseg [B, K] | None,
    qseg [B, R_q] | None -> (out [B, R_q, D], lse [B, R_q] fp32)."""
    return _kernels(plan).forward(plan, q2, keys, kpos, kseg, qseg, sink)


def _fwd(plan, q2, keys, sink, kpos, kseg, qseg):
    out, lse = _kernels(plan).forward(plan, q2, keys, kpos, kseg, qseg, sink)
    return (out, lse), (q2, keys, sink, kpos, kseg, qseg, out, lse)


def _bwd(plan, res, cotangents):
    q2, keys, sink, kpos, kseg, qseg, out, lse = res
    do2, dlse = cotangents
    b, rq, _ = q2.shape
    h = plan.num_heads
    delta = jnp.sum(do2.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = delta - dlse.astype(jnp.float32)
    kern = _kernels(plan)
    do2 = do2.astype(q2.dtype)
    dq2 = kern.dq(plan, q2, keys, kpos, kseg, qseg, do2, lse, delta)
    dkeys = kern.dkv(plan, q2, keys, kpos, kseg, qseg, do2, lse, delta)
    p_sink = jnp.exp(sink.reshape(1, 1, h) - lse.reshape(b, rq // h, h))
    dsink = -jnp.sum(p_sink * delta.reshape(b, rq // h, h), axis=(0, 1))
    return dq2, dkeys, dsink.astype(sink.dtype), None, None, None


attention_core.defvjp(_fwd, _bwd)
