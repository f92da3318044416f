"""Mosaic TPU kernels: forward, dq and dkv of block-sparse attention with a sink.

Grid (batch, row block, step). The block map (`mask.py`) is scalar-prefetched into SMEM as
run-length-encoded rows; each index map decodes step -> visited block, so the pipeline DMAs
exactly the visited blocks (steps past a row's end repeat its last block: no new DMA, no work).
Query heads sit on the matmul M dimension: a query block is a [block_q * H, D] tile and every
head shares the K = V block. Online softmax in fp32 VMEM scratch, started from the sink logit
(m = sink, l = 1), so a row never sees an empty softmax.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import compat
from kernels_pallas.block_sparse_attention import mask as mask_lib
from kernels_pallas.block_sparse_attention.plan import MASK_VALUE, Plan, grid_steps

NT = (((1,), (1,)), ((), ()))   # a @ b.T
NN = (((1,), (0,)), ((), ()))   # a @ b


def decode_step(map_ref, row, step, num_runs: int):
    """Scalar decode of a packed row: (block index, kind) at `step` (kind 0 = past the row's end,
    1 = partial, 2 = full). Past the end the block is the row's last one (no re-fetch)."""
    blk = jnp.int32(0)
    kind = jnp.int32(0)
    offset = jnp.int32(0)
    last = jnp.int32(0)
    for r in range(num_runs):
        start, length, full = mask_lib.read_run(map_ref, row, r, num_runs)
        inside = jnp.logical_and(step >= offset, step < offset + length)
        blk = jnp.where(inside, start + step - offset, blk)
        kind = jnp.where(inside, 1 + full, kind)
        last = jnp.where(length > 0, start + length - 1, last)
        offset = offset + length
    return jnp.where(kind == 0, last, blk), kind


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _compiler_params(plan: Plan):
    return compat.tpu_compiler_params(("parallel", "parallel", "arbitrary"),
                                      plan.blocks.vmem_limit_bytes)


def _visible(kpos, kend, qpos, kseg=None, qseg=None):
    """Boolean visibility from broadcastable per-key / per-row operands."""
    vis = jnp.logical_and(kpos <= qpos, qpos <= kend)
    if kseg is not None:
        vis = jnp.logical_and(vis, kseg == qseg)
    return vis


def _to_column(row):
    """(1, M) lane-dense -> (M, 1): per-row operands travel lane-dense ([B, 1, R_q], 4 bytes a
    row) instead of as [R_q, 1] columns, which TPU tiling pads to 128 lanes in HBM."""
    return jnp.broadcast_to(row, (128, row.shape[1])).T[:, :1]


def _to_row(col):
    """(M, 1) -> (1, M) lane-dense."""
    return jnp.broadcast_to(col, (col.shape[0], 128)).T[:1, :]


def _row_positions(i, bq: int, num_heads: int, rows: int, lanes: bool = False):
    """Query position of each (query, head) row of query block i, [rows, 1] (or [1, rows] with
    lanes=True), computed in-kernel rather than read from an operand: row // H via fp32, exact
    since (row + 0.5) / H stays >= 0.5 / H away from an integer and rows < 2**21."""
    shape, dim = ((1, rows), 1) if lanes else ((rows, 1), 0)
    r = lax.broadcasted_iota(jnp.int32, shape, dim).astype(jnp.float32)
    return i * bq + ((r + 0.5) * (1.0 / num_heads)).astype(jnp.int32)


def _dispatch(kind, always_mask: bool, body):
    """Run body(masked) on visited steps: full blocks unmasked unless data masks exist."""
    if always_mask:
        pl.when(kind > 0)(lambda: body(True))
    else:
        pl.when(kind == 1)(lambda: body(True))
        pl.when(kind == 2)(lambda: body(False))


# ----------------------------------------------------------------------------------------------
# forward

def _fwd_kernel(map_ref, q_ref, k_ref, kpos_ref, kend_ref, *refs, num_runs, steps, scale,
                always_mask, has_segments, bq, num_heads):
    if has_segments:
        kseg_ref, qseg_ref, *refs = refs
    sink_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *seg_scratch = refs
    i, j = pl.program_id(1), pl.program_id(2)
    _, kind = decode_step(map_ref, i, j, num_runs)

    @pl.when(j == 0)
    def _init():
        if has_segments:
            seg_scratch[0][...] = _to_column(qseg_ref[...])
        m_ref[...] = sink_ref[...]
        l_ref[...] = jnp.ones_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def body(masked: bool):
        q, k = q_ref[...], k_ref[...]
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32,
                            precision=_precision(q.dtype)) * scale
        if masked:
            vis = _visible(kpos_ref[...], kend_ref[...],
                           _row_positions(i, bq, num_heads, s.shape[0]),
                           kseg_ref[...] if has_segments else None,
                           seg_scratch[0][...] if has_segments else None)
            s = jnp.where(vis, s, MASK_VALUE)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(k.dtype), k, NN, preferred_element_type=jnp.float32,
                             precision=_precision(k.dtype))
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    _dispatch(kind, always_mask, body)

    @pl.when(j == steps - 1)
    def _finish():
        l = l_ref[...]
        o_ref[...] = (acc_ref[...] / l).astype(o_ref.dtype)
        lse_ref[...] = _to_row(m_ref[...] + jnp.log(l))


def forward(plan: Plan, q2, keys, kpos, kseg, qseg, sink):
    """-> (out [B, R_q, D] in q's dtype, lse [B, R_q] fp32)."""
    b, rq, d = q2.shape
    nk = keys.shape[1]
    bq, bk = plan.blocks.fwd
    m = bq * plan.num_heads
    packed = plan.query_map(bq, bk)
    runs, steps = packed.shape[1], grid_steps(packed)
    dec = functools.partial(decode_step, num_runs=runs)

    def kv_map(bi, i, j, map_ref):
        return (bi, dec(map_ref, i, j)[0], 0)

    def key_meta_b(bi, i, j, map_ref):
        return (bi, 0, dec(map_ref, i, j)[0])

    def key_meta(bi, i, j, map_ref):
        return (0, dec(map_ref, i, j)[0])

    in_specs = [pl.BlockSpec((None, m, d), lambda bi, i, j, _: (bi, i, 0)),
                pl.BlockSpec((None, bk, d), kv_map),
                pl.BlockSpec((None, 1, bk), key_meta_b),
                pl.BlockSpec((1, bk), key_meta)]
    args = [q2, keys, kpos.reshape(b, 1, nk), jnp.asarray(plan.kend()).reshape(1, nk)]
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, 1, bk), key_meta_b),
                     pl.BlockSpec((None, 1, m), lambda bi, i, j, _: (bi, 0, i))]
        args += [kseg.reshape(b, 1, nk), qseg.reshape(b, 1, rq)]
    in_specs += [pl.BlockSpec((m, 1), lambda bi, i, j, _: (0, 0))]
    args += [jnp.tile(sink.astype(jnp.float32), bq).reshape(m, 1)]
    out_specs = [pl.BlockSpec((None, m, d), lambda bi, i, j, _: (bi, i, 0)),
                 pl.BlockSpec((None, 1, m), lambda bi, i, j, _: (bi, 0, i))]
    kernel = functools.partial(_fwd_kernel, num_runs=runs, steps=steps, scale=plan.scale,
                               always_mask=plan.always_mask, has_segments=plan.has_segments,
                               bq=bq, num_heads=plan.num_heads)
    out, lse = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((b, rq, d), q2.dtype),
                   jax.ShapeDtypeStruct((b, 1, rq), jnp.float32)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, rq // m, steps), in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((m, 1), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                            pltpu.VMEM((m, d), jnp.float32)]
            + ([pltpu.VMEM((m, 1), jnp.int32)] if plan.has_segments else [])),
        compiler_params=_compiler_params(plan),
        interpret=plan.interpret,
        name="block_sparse_attention_fwd",
    )(jnp.asarray(packed.reshape(-1)), *args)
    return out, lse[:, 0]


# ----------------------------------------------------------------------------------------------
# backward: dq (rows = query blocks, like the forward)

def _dq_kernel(map_ref, q_ref, k_ref, kpos_ref, kend_ref, *refs, num_runs, steps, scale,
               always_mask, has_segments, bq, num_heads):
    if has_segments:
        kseg_ref, qseg_ref, *refs = refs
    do_ref, lse_ref, delta_ref, dq_ref, acc_ref, lse_col, delta_col, *seg_scratch = refs
    i, j = pl.program_id(1), pl.program_id(2)
    _, kind = decode_step(map_ref, i, j, num_runs)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        lse_col[...] = _to_column(lse_ref[...])
        delta_col[...] = _to_column(delta_ref[...])
        if has_segments:
            seg_scratch[0][...] = _to_column(qseg_ref[...])

    def body(masked: bool):
        q, k, do = q_ref[...], k_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        s = lax.dot_general(q, k, NT, preferred_element_type=jnp.float32, precision=prec) * scale
        p = jnp.exp(s - lse_col[...])
        if masked:
            vis = _visible(kpos_ref[...], kend_ref[...],
                           _row_positions(i, bq, num_heads, s.shape[0]),
                           kseg_ref[...] if has_segments else None,
                           seg_scratch[0][...] if has_segments else None)
            p = jnp.where(vis, p, 0.0)
        dp = lax.dot_general(do, k, NT, preferred_element_type=jnp.float32, precision=prec)
        ds = p * (dp - delta_col[...])
        acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, NN,
                                        preferred_element_type=jnp.float32, precision=prec)

    _dispatch(kind, always_mask, body)

    @pl.when(j == steps - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def dq(plan: Plan, q2, keys, kpos, kseg, qseg, do2, lse, delta):
    """-> dq [B, R_q, D] in q's dtype. lse, delta: [B, R_q] fp32."""
    b, rq, d = q2.shape
    nk = keys.shape[1]
    bq, bk = plan.blocks.dq
    m = bq * plan.num_heads
    packed = plan.query_map(bq, bk)
    runs, steps = packed.shape[1], grid_steps(packed)
    dec = functools.partial(decode_step, num_runs=runs)
    row = lambda bi, i, j, _: (bi, i, 0)  # noqa: E731
    in_specs = [pl.BlockSpec((None, m, d), row),
                pl.BlockSpec((None, bk, d), lambda bi, i, j, mr: (bi, dec(mr, i, j)[0], 0)),
                pl.BlockSpec((None, 1, bk), lambda bi, i, j, mr: (bi, 0, dec(mr, i, j)[0])),
                pl.BlockSpec((1, bk), lambda bi, i, j, mr: (0, dec(mr, i, j)[0]))]
    args = [q2, keys, kpos.reshape(b, 1, nk), jnp.asarray(plan.kend()).reshape(1, nk)]
    lanes = lambda bi, i, j, _: (bi, 0, i)  # noqa: E731
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, 1, bk), lambda bi, i, j, mr: (bi, 0, dec(mr, i, j)[0])),
                     pl.BlockSpec((None, 1, m), lanes)]
        args += [kseg.reshape(b, 1, nk), qseg.reshape(b, 1, rq)]
    in_specs += [pl.BlockSpec((None, m, d), row),
                 pl.BlockSpec((None, 1, m), lanes),
                 pl.BlockSpec((None, 1, m), lanes)]
    args += [do2, lse.reshape(b, 1, rq), delta.reshape(b, 1, rq)]
    kernel = functools.partial(_dq_kernel, num_runs=runs, steps=steps, scale=plan.scale,
                               always_mask=plan.always_mask, has_segments=plan.has_segments,
                               bq=bq, num_heads=plan.num_heads)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, rq, d), q2.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, rq // m, steps), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, m, d), row),
            scratch_shapes=[pltpu.VMEM((m, d), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                            pltpu.VMEM((m, 1), jnp.float32)]
            + ([pltpu.VMEM((m, 1), jnp.int32)] if plan.has_segments else [])),
        compiler_params=_compiler_params(plan),
        interpret=plan.interpret,
        name="block_sparse_attention_dq",
    )(jnp.asarray(packed.reshape(-1)), *args)


# ----------------------------------------------------------------------------------------------
# backward: dkv (rows = key blocks; query rows on lanes so every matmul is a plain NN / NT)

def _dkv_kernel(map_ref, k_ref, kpos_ref, kend_ref, *refs, num_runs, steps, scale, always_mask,
                has_segments, bq, num_heads):
    if has_segments:
        kseg_ref, qseg_ref, *refs = refs
    q_ref, do_ref, lse_ref, delta_ref, dk_ref, acc_ref, kpos_col, kend_col, *seg_scratch = refs
    kb, j = pl.program_id(1), pl.program_id(2)
    qb, kind = decode_step(map_ref, kb, j, num_runs)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        kpos_col[...] = _to_column(kpos_ref[...])
        kend_col[...] = _to_column(kend_ref[...])
        if has_segments:
            seg_scratch[0][...] = _to_column(kseg_ref[...])

    def body(masked: bool):
        k, q, do = k_ref[...], q_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        s_t = lax.dot_general(k, q, NT, preferred_element_type=jnp.float32, precision=prec) * scale
        p_t = jnp.exp(s_t - lse_ref[...])                                  # [bk, M]
        if masked:
            qpos = _row_positions(qb, bq, num_heads, s_t.shape[1], lanes=True)
            vis = _visible(kpos_col[...], kend_col[...], qpos,
                           seg_scratch[0][...] if has_segments else None,
                           qseg_ref[...] if has_segments else None)
            p_t = jnp.where(vis, p_t, 0.0)
        dp_t = lax.dot_general(k, do, NT, preferred_element_type=jnp.float32, precision=prec)
        ds_t = p_t * (dp_t - delta_ref[...]) * scale
        acc_ref[...] += (
            lax.dot_general(ds_t.astype(q.dtype), q, NN, preferred_element_type=jnp.float32,
                            precision=prec)
            + lax.dot_general(p_t.astype(do.dtype), do, NN, preferred_element_type=jnp.float32,
                              precision=prec))

    _dispatch(kind, always_mask, body)

    @pl.when(j == steps - 1)
    def _finish():
        dk_ref[...] = acc_ref[...].astype(dk_ref.dtype)


def dkv(plan: Plan, q2, keys, kpos, kseg, qseg, do2, lse, delta):
    """-> dkeys [B, K, D] in keys' dtype (V = K: both the score and the value paths)."""
    b, rq, d = q2.shape
    nk = keys.shape[1]
    bq, bk = plan.blocks.dkv
    m = bq * plan.num_heads
    packed = plan.key_map(bq, bk)
    runs, steps = packed.shape[1], grid_steps(packed)
    dec = functools.partial(decode_step, num_runs=runs)
    key_rows = lambda bi, kb, j, _: (bi, kb, 0)  # noqa: E731
    key_lanes = lambda bi, kb, j, _: (bi, 0, kb)  # noqa: E731
    in_specs = [pl.BlockSpec((None, bk, d), key_rows),
                pl.BlockSpec((None, 1, bk), key_lanes),
                pl.BlockSpec((1, bk), lambda bi, kb, j, _: (0, kb))]
    args = [keys, kpos.reshape(b, 1, nk), jnp.asarray(plan.kend()).reshape(1, nk)]
    q_lanes = lambda bi, kb, j, mr: (bi, 0, dec(mr, kb, j)[0])  # noqa: E731
    if plan.has_segments:
        in_specs += [pl.BlockSpec((None, 1, bk), key_lanes), pl.BlockSpec((None, 1, m), q_lanes)]
        args += [kseg.reshape(b, 1, nk), qseg.reshape(b, 1, rq)]
    q_rows = lambda bi, kb, j, mr: (bi, dec(mr, kb, j)[0], 0)  # noqa: E731
    in_specs += [pl.BlockSpec((None, m, d), q_rows),
                 pl.BlockSpec((None, m, d), q_rows),
                 pl.BlockSpec((None, 1, m), q_lanes),
                 pl.BlockSpec((None, 1, m), q_lanes)]
    args += [q2, do2, lse.reshape(b, 1, rq), delta.reshape(b, 1, rq)]
    kernel = functools.partial(_dkv_kernel, num_runs=runs, steps=steps, scale=plan.scale,
                               always_mask=plan.always_mask, has_segments=plan.has_segments,
                               bq=bq, num_heads=plan.num_heads)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, nk, d), keys.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, nk // bk, steps), in_specs=in_specs,
            out_specs=pl.BlockSpec((None, bk, d), key_rows),
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, 1), jnp.int32),
                            pltpu.VMEM((bk, 1), jnp.int32)]
            + ([pltpu.VMEM((bk, 1), jnp.int32)] if plan.has_segments else [])),
        compiler_params=_compiler_params(plan),
        interpret=plan.interpret,
        name="block_sparse_attention_dkv",
    )(jnp.asarray(packed.reshape(-1)), *args)
