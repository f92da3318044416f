"""Mosaic TPU kernels of the CSA core: forward and backward (scatter-free, see `csa_bwd_tpu`).

Layout of one program (grid = (B, S_padded / block_q), both axes parallel):
  * its block of `bq` queries, all H heads ([bq, H, D] in VMEM); heads are the matmul M dimension;
  * the window slab: the `bq + wp` raw keys [j*bq - wp, j*bq + bq) DMA'd once from HBM (kv is
    front-padded by wp >= W-1 rows, so the slab never starts before row 0);
  * the top-k list of its queries in SMEM (addresses of the row gathers) and again in VMEM
    (the validity vector of a chunk: -1 = none, whose logit is masked; the gather of a -1 slot
    fetches row 0 only so the DMA count stays static, the mask, not the address, decides);
  * per query, the selected compressed rows are gathered `block_k` at a time by single-row DMAs
    from HBM into a double-buffered VMEM tile (the next chunk's DMAs are in flight while the
    current one is on the MXU), and folded into an online softmax in f32 scratch whose running
    max starts at the sink logit (finite, and it puts the sink in the denominator for free).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import compat
from kernels_pallas.sparse_attention.config import SparseAttentionConfig

NEG = -0.7 * float(np.finfo(np.float32).max)   # finite "minus infinity" for masked logits
LSE_PAD = 1e30                                 # lse of padded query rows: their p is exp(-1e30) = 0


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot_nt(a, b):
    """a [m, k] . b [n, k]^T -> [m, n] fp32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


def _dot(a, b):
    """a [m, k] . b [k, n] -> [m, n] fp32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a.dtype),
                           preferred_element_type=jnp.float32)


class _Layout:
    """Static geometry shared by forward and backward."""

    def __init__(self, q_shape, num_selected, window, cfg: SparseAttentionConfig,
                 q_multiple: int | None = None):
        b, s, h, d = q_shape
        self.b, self.s, self.h, self.d = b, s, h, d
        self.bq, self.bk = cfg.block_q, cfg.block_k
        self.sp = _round_up(s, q_multiple or self.bq)   # q_multiple: a multiple of block_q
        self.nq = self.sp // self.bq
        self.kp = _round_up(num_selected, self.bk)
        self.nc = self.kp // self.bk
        self.wp = _round_up(max(window - 1, 1), 8)   # keys before a block its first query can see
        self.slab = self.bq + self.wp
        self.window = window


def _prepare(lay: _Layout, q, kv, topk_idx, segment_ids):
    """Pads and re-lays out the inputs (cheap O(S) XLA work, outside the kernel)."""
    ds = lay.sp - lay.s
    qp = jnp.pad(q, ((0, 0), (0, ds), (0, 0), (0, 0)))
    # Row gathers travel as 32-bit words: Mosaic cannot DMA one packed (bf16) row to a dynamic
    # sublane offset, so 16-bit keys are widened here (2x gather bytes; cast back in VMEM).
    kvp = jnp.pad(kv, ((0, 0), (lay.wp, ds), (0, 0))).astype(jnp.float32)  # row r <-> pos r - wp
    idx = jnp.pad(topk_idx, ((0, 0), (0, ds), (0, lay.kp - topk_idx.shape[-1])),
                  constant_values=-1)
    idx_v = idx.reshape(lay.b, lay.sp, lay.nc, 1, lay.bk)
    seg = None
    if segment_ids is not None:
        segp = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (lay.wp, ds)), constant_values=-1)
        cols = (jnp.arange(lay.nq) * lay.bq)[:, None] + jnp.arange(lay.slab)[None, :]
        kseg = segp[:, cols][:, :, None, :]                                # [B, nq, 1, slab]
        qseg = segp[:, lay.wp:].reshape(lay.b, lay.nq, lay.bq, 1, 1)       # [B, nq, bq, 1, 1]
        seg = (qseg, kseg)
    return qp, kvp, idx, idx_v, seg


def _wide(compressed):
    return compressed.astype(jnp.float32)


def _specs(lay: _Layout, has_seg: bool):
    """BlockSpecs of (idx_s, idx_v, [qseg, kseg], sink, q-like...)."""
    specs = [
        pl.BlockSpec((None, lay.bq, lay.kp), lambda b, j: (b, j, 0), memory_space=compat.SMEM),
        pl.BlockSpec((None, lay.bq, lay.nc, 1, lay.bk), lambda b, j: (b, j, 0, 0, 0)),
    ]
    if has_seg:
        specs += [pl.BlockSpec((None, None, lay.bq, 1, 1), lambda b, j: (b, j, 0, 0, 0)),
                  pl.BlockSpec((None, None, 1, lay.slab), lambda b, j: (b, j, 0, 0))]
    specs.append(pl.BlockSpec((lay.h, 1), lambda b, j: (0, 0)))               # sink [H, 1]
    return specs


def _q_spec(lay):
    return pl.BlockSpec((None, lay.bq, lay.h, lay.d), lambda b, j: (b, j, 0, 0))


def _col_spec(lay):
    return pl.BlockSpec((None, lay.bq, lay.h, 1), lambda b, j: (b, j, 0, 0))


class _Gather:
    """Double-buffered single-row DMA gathers of the selected compressed rows of one query chunk."""

    def __init__(self, lay, b, idx_s, c_hbm, gbuf, sem):
        self.lay, self.b, self.idx_s, self.c_hbm, self.gbuf, self.sem = lay, b, idx_s, c_hbm, gbuf, sem

    def start(self, step, slot):
        lay = self.lay
        i, c = step // lay.nc, step % lay.nc

        def body(kk, carry):
            e = jnp.maximum(self.idx_s[i, c * lay.bk + kk], 0)   # address only; masked if -1
            pltpu.make_async_copy(self.c_hbm.at[self.b, pl.ds(e, 1)],
                                  self.gbuf.at[slot, pl.ds(kk, 1)], self.sem.at[slot]).start()
            return carry

        lax.fori_loop(0, lay.bk, body, 0)

    def wait(self, slot):
        def body(kk, carry):
            pltpu.make_async_copy(self.c_hbm.at[self.b, pl.ds(0, 1)],
                                  self.gbuf.at[slot, pl.ds(0, 1)], self.sem.at[slot]).wait()
            return carry

        lax.fori_loop(0, self.lay.bk, body, 0)


def _window_valid(lay, j, i, kseg_ref=None, qseg_ref=None):
    """[1, slab] mask of the window keys of query i (block j) inside the slab."""
    t = j * lay.bq + i
    kpos = j * lay.bq - lay.wp + lax.broadcasted_iota(jnp.int32, (1, lay.slab), 1)
    valid = (kpos >= 0) & (kpos <= t) & (t - kpos < lay.window)
    if kseg_ref is not None:
        valid = valid & (kseg_ref[...] == qseg_ref[i])
    return valid


# ----------------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, lay: _Layout, scale: float, has_seg: bool):
    if has_seg:
        (idx_s, idx_v, qseg, kseg, sink_ref, q_ref, kv_hbm, c_hbm, o_ref, lse_ref,
         slab, gbuf, sem, m_scr, l_scr, acc_scr) = refs
    else:
        (idx_s, idx_v, sink_ref, q_ref, kv_hbm, c_hbm, o_ref, lse_ref,
         slab, gbuf, sem, m_scr, l_scr, acc_scr) = refs
        qseg = kseg = None
    b, j = pl.program_id(0), pl.program_id(1)
    nsteps = lay.bq * lay.nc
    slab_copy = pltpu.make_async_copy(
        kv_hbm.at[b, pl.ds(pl.multiple_of(j * lay.bq, 8), lay.slab)], slab, sem.at[2])
    slab_copy.start()
    gather = _Gather(lay, b, idx_s, c_hbm, gbuf, sem)
    gather.start(0, 0)
    slab_copy.wait()

    def update(s, valid, vals):
        s = jnp.where(valid, s, NEG)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=-1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + _dot(p.astype(vals.dtype), vals)
        m_scr[...] = m_new

    def step_body(step, carry):
        slot = step % 2
        i, c = step // lay.nc, step % lay.nc

        @pl.when(step + 1 < nsteps)
        def _():
            gather.start(step + 1, 1 - slot)

        @pl.when(c == 0)
        def _():  # new query: the sink opens the softmax, then its window
            m_scr[...] = sink_ref[...]
            l_scr[...] = jnp.ones_like(l_scr)
            acc_scr[...] = jnp.zeros_like(acc_scr)
            keys = slab[...].astype(q_ref.dtype)
            s = _dot_nt(q_ref[i], keys) * scale
            update(s, _window_valid(lay, j, i, kseg, qseg), keys)

        gather.wait(slot)
        rows = gbuf[slot].astype(q_ref.dtype)
        s = _dot_nt(q_ref[i], rows) * scale
        update(s, idx_v[i, c] >= 0, rows)

        @pl.when(c == lay.nc - 1)
        def _():
            l = l_scr[...]
            o_ref[i] = (acc_scr[...] / l).astype(o_ref.dtype)
            lse_ref[i] = m_scr[...] + jnp.log(l)

        return carry

    lax.fori_loop(0, nsteps, step_body, 0)


def csa_fwd_tpu(q, kv, compressed, topk_idx, sink, *, window, scale, segment_ids,
                cfg: SparseAttentionConfig, interpret: bool):
    """q [B,S,H,D], kv [B,S,D], compressed [B,N,D], topk_idx [B,S,K], sink [H]
    -> out [B,S,H,D] (q.dtype), lse [B,S,H] fp32."""
    lay = _Layout(q.shape, topk_idx.shape[-1], window, cfg)
    qp, kvp, idx, idx_v, seg = _prepare(lay, q, kv, topk_idx, segment_ids)
    has_seg = seg is not None
    sink_col = sink.astype(jnp.float32).reshape(lay.h, 1)
    in_specs = _specs(lay, has_seg) + [_q_spec(lay), pl.BlockSpec(memory_space=compat.ANY),
                                       pl.BlockSpec(memory_space=compat.ANY)]
    args = [idx, idx_v] + (list(seg) if has_seg else []) + [sink_col, qp, kvp, _wide(compressed)]
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, lay=lay, scale=float(scale), has_seg=has_seg),
        grid=(lay.b, lay.nq),
        in_specs=in_specs,
        out_specs=[_q_spec(lay), _col_spec(lay)],
        out_shape=[jax.ShapeDtypeStruct((lay.b, lay.sp, lay.h, lay.d), q.dtype),
                   jax.ShapeDtypeStruct((lay.b, lay.sp, lay.h, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((lay.slab, lay.d), jnp.float32),
                        pltpu.VMEM((2, lay.bk, lay.d), jnp.float32),
                        pltpu.SemaphoreType.DMA((3,)),
                        pltpu.VMEM((lay.h, 1), jnp.float32),
                        pltpu.VMEM((lay.h, 1), jnp.float32),
                        pltpu.VMEM((lay.h, lay.d), jnp.float32)],
        compiler_params=compat.tpu_compiler_params((compat.PARALLEL, compat.PARALLEL),
                                                   cfg.vmem_limit_bytes),
        interpret=interpret,
        name="csa_fwd_tpu",
    )(*args)
    return out[:, :lay.s], lse[:, :lay.s, :, 0]


# ---------------------------------------------------------------------------------- backward

def _bwd_kernel(*refs, lay: _Layout, scale: float, has_seg: bool):
    if has_seg:
        (j0_ref, idx_s, idx_v, qseg, kseg, sink_ref, q_ref, do_ref, lse_ref, dlt_ref, kv_hbm,
         c_hbm, dq_ref, dslab_ref, dc_hbm, slab, gbuf, stage, sem, dq_scr) = refs
    else:
        (j0_ref, idx_s, idx_v, sink_ref, q_ref, do_ref, lse_ref, dlt_ref, kv_hbm, c_hbm,
         dq_ref, dslab_ref, dc_hbm, slab, gbuf, stage, sem, dq_scr) = refs
        qseg = kseg = None
    del sink_ref  # dsink is computed outside from lse and delta
    b, j = pl.program_id(0), pl.program_id(1)
    jg = j0_ref[0] + j                      # global query block (this call covers one chunk)
    nsteps = lay.bq * lay.nc
    slab_copy = pltpu.make_async_copy(
        kv_hbm.at[b, pl.ds(pl.multiple_of(jg * lay.bq, 8), lay.slab)], slab, sem.at[2])
    slab_copy.start()
    gather = _Gather(lay, b, idx_s, c_hbm, gbuf, sem)
    gather.start(0, 0)
    dslab_ref[...] = jnp.zeros_like(dslab_ref)
    slab_copy.wait()

    def grads(i, s, valid, vals):
        """Returns (dq contribution [H, D], dK rows [n, D]) of logits s [H, n] over vals [n, D]."""
        qi, doi = q_ref[i], do_ref[i]
        p = jnp.where(valid, jnp.exp(s - lse_ref[i]), 0.0)                     # [H, n]
        dp = _dot_nt(doi, vals)                                                # [H, n]
        dsc = p * (dp - dlt_ref[i])
        dq = _dot(dsc.astype(vals.dtype), vals) * scale
        dk = (_dot(dsc.T.astype(qi.dtype), qi) * scale
              + _dot(p.T.astype(doi.dtype), doi))                              # [n, D]
        return dq, dk

    def out_copy(step, slot):
        i, c = step // lay.nc, step % lay.nc
        return pltpu.make_async_copy(
            stage.at[slot], dc_hbm.at[b, j * lay.bq + i, pl.ds(c * lay.bk, lay.bk)],
            sem.at[3 + slot])

    def step_body(step, carry):
        slot = step % 2
        i, c = step // lay.nc, step % lay.nc

        @pl.when(step + 1 < nsteps)
        def _():
            gather.start(step + 1, 1 - slot)

        @pl.when(c == 0)
        def _():
            keys = slab[...].astype(q_ref.dtype)
            s = _dot_nt(q_ref[i], keys) * scale
            dq, dk = grads(i, s, _window_valid(lay, jg, i, kseg, qseg), keys)
            dq_scr[...] = dq
            dslab_ref[...] += dk

        gather.wait(slot)
        rows = gbuf[slot].astype(q_ref.dtype)
        s = _dot_nt(q_ref[i], rows) * scale
        dq, dk = grads(i, s, idx_v[i, c] >= 0, rows)
        dq_scr[...] += dq

        @pl.when(step >= 2)
        def _():  # the stage slot's previous write-out (step - 2) must be done before reuse
            out_copy(step - 2, slot).wait()

        stage[slot] = dk
        out_copy(step, slot).start()

        @pl.when(c == lay.nc - 1)
        def _():
            dq_ref[i] = dq_scr[...].astype(dq_ref.dtype)

        return carry

    lax.fori_loop(0, nsteps, step_body, 0)
    for back in (2, 1):  # drain the last write-outs
        if nsteps >= back:
            out_copy(nsteps - back, (nsteps - back) % 2).wait()


def bwd_chunk_queries(lay: _Layout, cfg: SparseAttentionConfig) -> int:
    """Queries per backward kernel call: bounds the fp32 [chunk, K, D] dK-row buffer (~1 GiB by
    default), a multiple of block_q, no larger than the padded sequence."""
    if cfg.bwd_block_s is not None:
        chunk = cfg.bwd_block_s
    else:
        chunk = max(lay.bq, ((1 << 30) // (lay.kp * lay.d * 4)) // lay.bq * lay.bq)
    return min(chunk, _round_up(lay.s, lay.bq))


def csa_bwd_tpu(q, kv, compressed, topk_idx, sink, out, lse, dout, *, window, scale,
                segment_ids, cfg: SparseAttentionConfig, interpret: bool, dlse=None):
    """Gradients (dq, dkv, dcompressed, dsink) of `csa_fwd_tpu`.

    Scatter-free kernel: each program writes dq of its queries, the dK partial of its window
    slab ([B, nq, slab, D]) and the dK rows of every (query, listed entry) pair ([B, chunk, K, D],
    fp32, written to HBM by DMA); XLA then scatter-adds the slabs into dkv and the rows into
    dcompressed (duplicates and overlap accumulate by construction). The queries are processed in
    chunks (`bwd_chunk_queries`) by a loop around the kernel so the dK-row buffer stays bounded.
    dsink needs no kernel: dsink[h] = -sum_{b,t} exp(sink[h] - lse[b,t,h]) * delta[b,t,h].
    """
    lay0 = _Layout(q.shape, topk_idx.shape[-1], window, cfg)
    chunk = bwd_chunk_queries(lay0, cfg)
    lay = _Layout(q.shape, topk_idx.shape[-1], window, cfg, q_multiple=chunk)
    qp, kvp, idx, idx_v, seg = _prepare(lay, q, kv, topk_idx, segment_ids)
    has_seg = seg is not None
    ds = lay.sp - lay.s
    delta = softmax_delta(out, dout, dlse)
    dop = jnp.pad(dout.astype(q.dtype), ((0, 0), (0, ds), (0, 0), (0, 0)))
    lsep = jnp.pad(lse, ((0, 0), (0, ds), (0, 0)), constant_values=LSE_PAD)[..., None]
    dltp = jnp.pad(delta, ((0, 0), (0, ds), (0, 0)))[..., None]
    sink_col = sink.astype(jnp.float32).reshape(lay.h, 1)
    n_chunks, cq = lay.sp // chunk, chunk // lay.bq          # chunks; query blocks per chunk
    in_specs = [pl.BlockSpec(memory_space=compat.SMEM)] + _specs(lay, has_seg) + [
        _q_spec(lay), _q_spec(lay), _col_spec(lay), _col_spec(lay),
        pl.BlockSpec(memory_space=compat.ANY), pl.BlockSpec(memory_space=compat.ANY)]
    call = pl.pallas_call(
        functools.partial(_bwd_kernel, lay=lay, scale=float(scale), has_seg=has_seg),
        grid=(lay.b, cq),
        in_specs=in_specs,
        out_specs=[_q_spec(lay),
                   pl.BlockSpec((None, None, lay.slab, lay.d), lambda b, j: (b, j, 0, 0)),
                   pl.BlockSpec(memory_space=compat.ANY)],
        out_shape=[jax.ShapeDtypeStruct((lay.b, chunk, lay.h, lay.d), q.dtype),
                   jax.ShapeDtypeStruct((lay.b, cq, lay.slab, lay.d), jnp.float32),
                   jax.ShapeDtypeStruct((lay.b, chunk, lay.kp, lay.d), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((lay.slab, lay.d), jnp.float32),
                        pltpu.VMEM((2, lay.bk, lay.d), jnp.float32),
                        pltpu.VMEM((2, lay.bk, lay.d), jnp.float32),
                        pltpu.SemaphoreType.DMA((5,)),
                        pltpu.VMEM((lay.h, lay.d), jnp.float32)],
        compiler_params=compat.tpu_compiler_params((compat.PARALLEL, compat.PARALLEL),
                                                   cfg.vmem_limit_bytes),
        interpret=interpret,
        name="csa_bwd_tpu",
    )
    comp32 = _wide(compressed)
    n = compressed.shape[1]
    slab_rows = (jnp.arange(cq) * lay.bq)[:, None] + jnp.arange(lay.slab)[None, :]   # [cq, slab]

    def rows_of(x, c0, size):
        return lax.dynamic_slice_in_dim(x, c0, size, axis=1)

    def body(ci, carry):
        dq_all, dkvp, dcomp = carry
        q0, j0 = ci * chunk, ci * cq
        chunk_seg = [] if not has_seg else [rows_of(seg[0], j0, cq), rows_of(seg[1], j0, cq)]
        idx_c = rows_of(idx, q0, chunk)
        args = ([jnp.reshape(j0, (1,)).astype(jnp.int32), idx_c, rows_of(idx_v, q0, chunk)]
                + chunk_seg + [sink_col, rows_of(qp, q0, chunk), rows_of(dop, q0, chunk),
                               rows_of(lsep, q0, chunk), rows_of(dltp, q0, chunk), kvp, comp32])
        dq, dslab, dcrows = call(*args)
        dq_all = lax.dynamic_update_slice_in_dim(dq_all, dq, q0, axis=1)
        # Window slabs -> dkv (padded rows: slab row r of global block jg is row jg*bq + r).
        dkvp = dkvp.at[:, (q0 + slab_rows).reshape(-1)].add(dslab.reshape(lay.b, -1, lay.d))
        dcomp = dcomp + scatter_rows(dcrows, idx_c, n)
        return dq_all, dkvp, dcomp

    init = (jnp.zeros((lay.b, lay.sp, lay.h, lay.d), q.dtype),
            jnp.zeros((lay.b, lay.wp + lay.sp, lay.d), jnp.float32),
            jnp.zeros((lay.b, n, lay.d), jnp.float32))
    dq, dkvp, dcomp = lax.fori_loop(0, n_chunks, body, init)
    dsink = dsink_from_stats(sink, lse, delta)
    return (dq[:, :lay.s], dkvp[:, lay.wp:lay.wp + lay.s].astype(kv.dtype),
            dcomp.astype(compressed.dtype), dsink.astype(sink.dtype))


def scatter_rows(rows, idx, n):
    """rows [B, S, K, D] for the listings idx [B, S, K] (-1 = none) -> [B, N, D] fp32 sums."""
    b = rows.shape[0]
    tgt = jnp.where(idx >= 0, idx, n)                        # -1 -> a trash row, dropped below
    bidx = jnp.broadcast_to(jnp.arange(b)[:, None, None], tgt.shape)
    acc = jnp.zeros((b, n + 1, rows.shape[-1]), jnp.float32)
    return acc.at[bidx, tgt].add(rows.astype(jnp.float32))[:, :n]


def softmax_delta(out, dout, dlse=None):
    """delta [B,S,H] = rowsum(dO * O) - dlse: with it, dlogit_j = P_j (dO.v_j - delta) covers
    the cotangents of both outputs (d lse / d logit_j = P_j)."""
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    return delta if dlse is None else delta - dlse.astype(jnp.float32)


def dsink_from_stats(sink, lse, delta):
    """dL/dsink [H] = -sum over queries of P(sink) * delta, P(sink) = exp(sink - lse)."""
    p_sink = jnp.exp(sink.astype(jnp.float32)[None, None, :] - lse)
    return -jnp.sum(p_sink * delta, axis=(0, 1))
