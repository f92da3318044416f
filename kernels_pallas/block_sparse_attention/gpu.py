"""GPU kernels on the Pallas Triton backend: forward, dq and dkv of block-sparse attention.

One program per (row tile, batch element). A program reads its row of the run-length-encoded
block map (`mask.py`, kept in HBM) and loops over each run with a dynamic trip count, so only
visited blocks are loaded and computed. Query heads sit on the matmul M dimension (a query block
is a [block_q * H, D] matrix; all heads share the K = V block); a kernel may split that matrix
into row tiles of `BlockSizes.block_rows*` rows (one program per tile in the forward and dq
kernels, an inner step per tile in dkv): at D = 512 a [64, 512] bf16 operand is 64 KiB of shared
memory, and the backward kernels hold two such operands (q and dout) in two layouts each. Online
softmax in fp32 registers, started from the sink logit. Loads/stores/dots go through `kernels_pallas.compat` (the Triton
`load`/`store`/`dot`, never `pl.dot`), written against the surface common to JAX 0.11.2 and 0.12.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import compat
from kernels_pallas.block_sparse_attention.mask import read_run as _run
from kernels_pallas.block_sparse_attention.plan import MASK_VALUE, Plan


def _visible(kpos, kend, qpos, kseg=None, qseg=None):
    """[M, bk] visibility from per-row [M] and per-key [bk] vectors."""
    vis = jnp.logical_and(kpos[None, :] <= qpos[:, None], qpos[:, None] <= kend[None, :])
    if kseg is not None:
        vis = jnp.logical_and(vis, kseg[None, :] == qseg[:, None])
    return vis


def _params(plan: Plan):
    return compat.triton_compiler_params(plan.blocks.num_warps, plan.blocks.num_stages)


def _whole(shape):
    """BlockSpec of a whole (batch-squeezed when `shape[0] is None`) operand."""
    nd = len(shape)
    if shape[0] is None:
        return pl.BlockSpec(shape, lambda i, bi: (bi,) + (0,) * (nd - 1))
    return pl.BlockSpec(shape, lambda i, bi: (0,) * nd)


def _key_meta(plan: Plan, kpos_ref, kend_ref, kseg_ref, sl):
    kpos = compat.triton_load(kpos_ref.at[sl])
    kend = compat.triton_load(kend_ref.at[sl])
    kseg = compat.triton_load(kseg_ref.at[sl]) if plan.has_segments else None
    return kpos, kend, kseg


# ----------------------------------------------------------------------------------------------
# forward

def _fwd_kernel(map_ref, q_ref, k_ref, kpos_ref, kend_ref, *refs, plan, num_runs, bk, tiles):
    if plan.has_segments:
        kseg_ref, qseg_ref, *refs = refs
    else:
        kseg_ref = qseg_ref = None
    qpos_ref, sink_ref, o_ref, lse_ref = refs
    i = pl.program_id(0) // tiles                      # query block of this row tile
    q = compat.triton_load(q_ref)
    qpos = compat.triton_load(qpos_ref)
    qseg = compat.triton_load(qseg_ref) if plan.has_segments else None
    m0 = compat.triton_load(sink_ref)
    carry = (m0, jnp.ones_like(m0), jnp.zeros(q.shape, jnp.float32))
    for r in range(num_runs):
        start, length, full = _run(map_ref, i, r, num_runs)

        def body(t, c, start=start, full=full):
            m_prev, l_prev, acc = c
            sl = pl.ds(pl.multiple_of((start + t) * bk, bk), bk)
            k = compat.triton_load(k_ref.at[sl, :])
            s = compat.triton_dot(q, k, trans_b=True) * plan.scale
            kpos, kend, kseg = _key_meta(plan, kpos_ref, kend_ref, kseg_ref, sl)
            vis = _visible(kpos, kend, qpos, kseg, qseg)
            if not plan.always_mask:
                vis = jnp.logical_or(vis, full == 1)
            s = jnp.where(vis, s, MASK_VALUE)
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(s - m_new[:, None])
            l_new = alpha * l_prev + jnp.sum(p, axis=1)
            acc = acc * alpha[:, None] + compat.triton_dot(p.astype(k.dtype), k)
            return m_new, l_new, acc

        carry = lax.fori_loop(0, length, body, carry)
    m, l, acc = carry
    compat.triton_store(o_ref, (acc / l[:, None]).astype(o_ref.dtype))
    compat.triton_store(lse_ref, m + jnp.log(l))


def forward(plan: Plan, q2, keys, kpos, kseg, qseg, sink):
    """-> (out [B, R_q, D] in q's dtype, lse [B, R_q] fp32)."""
    b, rq, d = q2.shape
    nk = keys.shape[1]
    bq, bk = plan.blocks.fwd
    g = plan.blocks.rows("fwd", plan.num_heads)
    tiles = bq * plan.num_heads // g
    packed = plan.query_map(bq, bk)
    rows = lambda i, bi: (bi, i, 0)  # noqa: E731
    vec_rows = lambda i, bi: (bi, i)  # noqa: E731
    in_specs = [_whole((packed.size,)), pl.BlockSpec((None, g, d), rows),
                _whole((None, nk, d)), _whole((None, nk)), _whole((nk,))]
    args = [jnp.asarray(packed.reshape(-1)), q2, keys, kpos, jnp.asarray(plan.kend())]
    if plan.has_segments:
        in_specs += [_whole((None, nk)), pl.BlockSpec((None, g), vec_rows)]
        args += [kseg, qseg]
    # sink per row of a query block ([bq * H], head fastest); tile i uses its slice i % tiles
    in_specs += [pl.BlockSpec((g,), lambda i, bi: (i,)),
                 pl.BlockSpec((g,), lambda i, bi: (i % tiles,))]
    args += [jnp.asarray(plan.qpos_rows()), jnp.tile(sink.astype(jnp.float32), bq)]
    kernel = functools.partial(_fwd_kernel, plan=plan, num_runs=packed.shape[1], bk=bk,
                               tiles=tiles)
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((b, rq, d), q2.dtype),
                   jax.ShapeDtypeStruct((b, rq), jnp.float32)],
        grid=(rq // g, b),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, g, d), rows), pl.BlockSpec((None, g), vec_rows)],
        compiler_params=_params(plan),
        interpret=plan.interpret,
        name="block_sparse_attention_fwd",
    )(*args)


# ----------------------------------------------------------------------------------------------
# backward: dq

def _dq_kernel(map_ref, q_ref, k_ref, kpos_ref, kend_ref, *refs, plan, num_runs, bk, tiles):
    if plan.has_segments:
        kseg_ref, qseg_ref, *refs = refs
    else:
        kseg_ref = qseg_ref = None
    qpos_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    i = pl.program_id(0) // tiles                      # query block of this row tile
    q = compat.triton_load(q_ref)
    do = compat.triton_load(do_ref)
    lse = compat.triton_load(lse_ref)
    delta = compat.triton_load(delta_ref)
    qpos = compat.triton_load(qpos_ref)
    qseg = compat.triton_load(qseg_ref) if plan.has_segments else None
    acc = jnp.zeros(q.shape, jnp.float32)
    for r in range(num_runs):
        start, length, full = _run(map_ref, i, r, num_runs)

        def body(t, acc, start=start, full=full):
            sl = pl.ds(pl.multiple_of((start + t) * bk, bk), bk)
            k = compat.triton_load(k_ref.at[sl, :])
            s = compat.triton_dot(q, k, trans_b=True) * plan.scale
            kpos, kend, kseg = _key_meta(plan, kpos_ref, kend_ref, kseg_ref, sl)
            vis = _visible(kpos, kend, qpos, kseg, qseg)
            if not plan.always_mask:
                vis = jnp.logical_or(vis, full == 1)
            p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
            dp = compat.triton_dot(do, k, trans_b=True)
            ds = p * (dp - delta[:, None])
            return acc + compat.triton_dot(ds.astype(k.dtype), k)

        acc = lax.fori_loop(0, length, body, acc)
    compat.triton_store(dq_ref, (acc * plan.scale).astype(dq_ref.dtype))


def dq(plan: Plan, q2, keys, kpos, kseg, qseg, do2, lse, delta):
    """-> dq [B, R_q, D] in q's dtype. lse, delta: [B, R_q] fp32."""
    b, rq, d = q2.shape
    nk = keys.shape[1]
    bq, bk = plan.blocks.dq
    g = plan.blocks.rows("dq", plan.num_heads)
    tiles = bq * plan.num_heads // g
    packed = plan.query_map(bq, bk)
    rows = lambda i, bi: (bi, i, 0)  # noqa: E731
    vec_rows = lambda i, bi: (bi, i)  # noqa: E731
    in_specs = [_whole((packed.size,)), pl.BlockSpec((None, g, d), rows),
                _whole((None, nk, d)), _whole((None, nk)), _whole((nk,))]
    args = [jnp.asarray(packed.reshape(-1)), q2, keys, kpos, jnp.asarray(plan.kend())]
    if plan.has_segments:
        in_specs += [_whole((None, nk)), pl.BlockSpec((None, g), vec_rows)]
        args += [kseg, qseg]
    in_specs += [pl.BlockSpec((g,), lambda i, bi: (i,)), pl.BlockSpec((None, g, d), rows),
                 pl.BlockSpec((None, g), vec_rows), pl.BlockSpec((None, g), vec_rows)]
    args += [jnp.asarray(plan.qpos_rows()), do2, lse, delta]
    kernel = functools.partial(_dq_kernel, plan=plan, num_runs=packed.shape[1], bk=bk,
                               tiles=tiles)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, rq, d), q2.dtype),
        grid=(rq // g, b),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, g, d), rows),
        compiler_params=_params(plan),
        interpret=plan.interpret,
        name="block_sparse_attention_dq",
    )(*args)


# ----------------------------------------------------------------------------------------------
# backward: dkv (one program per key block, looping over the query blocks that visit it)

def _dkv_kernel(map_ref, k_ref, kpos_ref, kend_ref, *refs, plan, num_runs, g, tiles):
    if plan.has_segments:
        kseg_ref, qseg_ref, *refs = refs
    else:
        kseg_ref = qseg_ref = None
    qpos_ref, q_ref, do_ref, lse_ref, delta_ref, dk_ref = refs
    kb = pl.program_id(0)
    k = compat.triton_load(k_ref)
    kpos = compat.triton_load(kpos_ref)
    kend = compat.triton_load(kend_ref)
    kseg = compat.triton_load(kseg_ref) if plan.has_segments else None
    acc = jnp.zeros(k.shape, jnp.float32)
    for r in range(num_runs):
        start, length, full = _run(map_ref, kb, r, num_runs)

        # the run's query blocks are consecutive rows: walk them `g` rows (one tile) per step
        def body(t, acc, start=start, full=full):
            sl = pl.ds(pl.multiple_of((start * tiles + t) * g, g), g)
            q = compat.triton_load(q_ref.at[sl, :])
            do = compat.triton_load(do_ref.at[sl, :])
            lse = compat.triton_load(lse_ref.at[sl])
            delta = compat.triton_load(delta_ref.at[sl])
            qpos = compat.triton_load(qpos_ref.at[sl])
            qseg = compat.triton_load(qseg_ref.at[sl]) if plan.has_segments else None
            s = compat.triton_dot(q, k, trans_b=True) * plan.scale            # [M, bk]
            vis = _visible(kpos, kend, qpos, kseg, qseg)
            if not plan.always_mask:
                vis = jnp.logical_or(vis, full == 1)
            p = jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)
            dp = compat.triton_dot(do, k, trans_b=True)
            ds = p * (dp - delta[:, None]) * plan.scale
            acc = acc + compat.triton_dot(ds.astype(q.dtype), q, trans_a=True)
            return acc + compat.triton_dot(p.astype(do.dtype), do, trans_a=True)

        acc = lax.fori_loop(0, length * tiles, body, acc)
    compat.triton_store(dk_ref, acc.astype(dk_ref.dtype))


def dkv(plan: Plan, q2, keys, kpos, kseg, qseg, do2, lse, delta):
    """-> dkeys [B, K, D] in keys' dtype (V = K: both the score and the value paths)."""
    b, rq, d = q2.shape
    nk = keys.shape[1]
    bq, bk = plan.blocks.dkv
    g = plan.blocks.rows("dkv", plan.num_heads)
    packed = plan.key_map(bq, bk)
    key_rows = lambda kb, bi: (bi, kb, 0)  # noqa: E731
    key_vec = lambda kb, bi: (bi, kb)  # noqa: E731
    in_specs = [_whole((packed.size,)), pl.BlockSpec((None, bk, d), key_rows),
                pl.BlockSpec((None, bk), key_vec), pl.BlockSpec((bk,), lambda kb, bi: (kb,))]
    args = [jnp.asarray(packed.reshape(-1)), keys, kpos, jnp.asarray(plan.kend())]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, bk), key_vec), _whole((None, rq))]
        args += [kseg, qseg]
    in_specs += [_whole((rq,)), _whole((None, rq, d)), _whole((None, rq, d)),
                 _whole((None, rq)), _whole((None, rq))]
    args += [jnp.asarray(plan.qpos_rows()), q2, do2, lse, delta]
    kernel = functools.partial(_dkv_kernel, plan=plan, num_runs=packed.shape[1], g=g,
                               tiles=bq * plan.num_heads // g)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, nk, d), keys.dtype),
        grid=(nk // bk, b),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bk, d), key_rows),
        compiler_params=_params(plan),
        interpret=plan.interpret,
        name="block_sparse_attention_dkv",
    )(*args)
