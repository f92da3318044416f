"""Pallas Triton (GPU) kernels of the CSA core: forward and backward with fp32 atomics.

One program per (batch, query): the query's H heads are the rows (M) of every matmul, which is
what makes a token-level gather worth it (FlashMLA's layout): each gathered KV row is used by
all H heads. The program
  * loads its window, a contiguous [Wb, D] slab, in sub-tiles of min(Wb, block_k) rows (kv is
    front-padded by Wb = next_pow2(W) rows, so the slab never starts before row 0; positions
    outside the window are masked);
  * walks its top-k list `block_k` entries at a time, gathering the listed compressed rows with
    a masked pointer gather (-1 = none: masked load, masked logit; the address 0 is never used
    as a valid entry);
  * keeps an online softmax in fp32 registers whose running max starts at the sink logit.
The backward (one program per query and group of `bwd_heads` heads, `bwd_block_k` rows per
step) recomputes the probabilities from the saved lse, writes dq, and adds the dK rows
(V = K, so value and key paths add up) into fp32 accumulators with atomics: the window rows of
dkv tile by tile, the gathered rows of dcompressed as a [block_k, D] scatter whose -1
slots point at a trash row N that is dropped afterwards.

Interpret mode (CPU) runs the same kernels; only the atomic scatter of gathered rows is issued
row by row there, because the interpreter's vector atomic loses duplicate updates.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import compat
from kernels_pallas.sparse_attention.config import SparseAttentionConfig, next_pow2
from kernels_pallas.sparse_attention.tpu import dsink_from_stats, softmax_delta

NEG = -0.7 * float(np.finfo(np.float32).max)
LSE_PAD = 1e30


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


class _Layout:
    def __init__(self, q_shape, num_selected, n_entries, window, cfg: SparseAttentionConfig):
        self.b, self.s, self.h, self.d = q_shape
        self.n = n_entries
        self.bk = cfg.block_k
        self.kp = _round_up(num_selected, self.bk)
        self.nc = self.kp // self.bk
        # Window tile rows: a power of two, and >= 16 because a bf16 tl.dot needs K >= 16 (with
        # an 8-row tile the compiled bf16 kernel counted the window twice; fp32 was unaffected).
        self.wb = max(16, next_pow2(window))
        # Both kernels walk the window in sub-tiles of wt rows: q, dout and a [128, 512] bf16
        # window tile together needed 256 KiB of shared memory in the backward (the H100 has
        # 227 KiB), and at 128 heads q and the whole window tile need 256 KiB in the forward.
        self.wt = min(self.wb, self.bk)
        self.window = window
        # Heads per backward program (cfg.bwd_heads; None = all): ng programs per query.
        self.hg = min(cfg.bwd_heads or self.h, self.h)
        if self.h % self.hg:
            raise ValueError(f"SparseAttentionConfig.bwd_heads={cfg.bwd_heads} is invalid with "
                             f"{self.h} query heads: it must divide them")
        self.ng = self.h // self.hg


def _prepare(lay, kv, topk_idx, segment_ids):
    kvp = jnp.pad(kv, ((0, 0), (lay.wb, 0), (0, 0)))          # padded row r <-> position r - wb
    idx = jnp.pad(topk_idx, ((0, 0), (0, 0), (0, lay.kp - topk_idx.shape[-1])),
                  constant_values=-1)
    segp = None
    if segment_ids is not None:
        segp = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (lay.wb, 0)), constant_values=-1)
    return kvp, idx, segp


def _window(lay, b, t, kv_ref, seg_ref, start: int = 0, rows: int | None = None):
    """Rows [start, start + rows) of query t's window tile [Wb, D], and their validity."""
    rows = lay.wb if rows is None else rows
    keys = compat.triton_load(kv_ref.at[b, pl.ds(t + 1 + start, rows), :])
    kpos = t - lay.wb + 1 + start + jnp.arange(rows, dtype=jnp.int32)
    valid = (kpos >= 0) & (t - kpos < lay.window)
    if seg_ref is not None:
        kseg = compat.triton_load(seg_ref.at[b, pl.ds(t + 1 + start, rows)])
        qseg = compat.triton_load(seg_ref.at[b, pl.ds(t + lay.wb, 1)])
        valid = valid & (kseg == qseg)
    return keys, valid


def _chunk(lay, b, t, c, idx_ref, c_ref):
    """Gathers chunk c of query t's list: (rows [bk, D], valid [bk], ids [bk])."""
    ids = compat.triton_load(idx_ref.at[b, t, pl.ds(c * lay.bk, lay.bk)])
    valid = ids >= 0
    safe = jnp.where(valid, ids, 0)                     # address only; the row is masked out
    cols = jnp.arange(lay.d, dtype=jnp.int32)
    rows = compat.triton_load(c_ref.at[b, safe[:, None], cols[None, :]],
                              mask=valid[:, None], other=0)
    return rows, valid, ids


def _fwd_kernel(*refs, lay, scale, has_seg):
    if has_seg:
        q_ref, kv_ref, c_ref, idx_ref, sink_ref, seg_ref, o_ref, lse_ref = refs
    else:
        q_ref, kv_ref, c_ref, idx_ref, sink_ref, o_ref, lse_ref = refs
        seg_ref = None
    pid = pl.program_id(0)            # 1-D grid: CUDA's 2nd/3rd grid dims stop at 65535
    b, t = pid // lay.s, pid % lay.s
    qi = compat.triton_load(q_ref.at[b, t, :, :])                          # [H, D]

    def update(carry, s, valid, vals):
        m, l, acc = carry
        s = jnp.where(valid[None, :], s, NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + compat.triton_dot(p.astype(vals.dtype), vals)
        return m_new, l, acc

    m0 = compat.triton_load(sink_ref).astype(jnp.float32)                # sink opens the softmax
    carry = (m0, jnp.ones_like(m0), jnp.zeros((lay.h, lay.d), jnp.float32))
    for start in range(0, lay.wb, lay.wt):   # window in sub-tiles (shared memory, see _Layout)
        keys, valid = _window(lay, b, t, kv_ref, seg_ref, start, lay.wt)
        carry = update(carry, compat.triton_dot(qi, keys, trans_b=True) * scale, valid, keys)

    def body(c, carry):
        rows, valid, _ = _chunk(lay, b, t, c, idx_ref, c_ref)
        return update(carry, compat.triton_dot(qi, rows, trans_b=True) * scale, valid, rows)

    m, l, acc = lax.fori_loop(0, lay.nc, body, carry)
    compat.triton_store(o_ref.at[b, t, :, :], (acc / l[:, None]).astype(o_ref.dtype))
    compat.triton_store(lse_ref.at[b, t, :], m + jnp.log(l))


def csa_fwd_gpu(q, kv, compressed, topk_idx, sink, *, window, scale, segment_ids,
                cfg: SparseAttentionConfig, interpret: bool):
    """q [B,S,H,D], kv [B,S,D], compressed [B,N,D], topk_idx [B,S,K], sink [H]
    -> out [B,S,H,D] (q.dtype), lse [B,S,H] fp32."""
    lay = _Layout(q.shape, topk_idx.shape[-1], compressed.shape[1], window, cfg)
    kvp, idx, segp = _prepare(lay, kv, topk_idx, segment_ids)
    has_seg = segp is not None
    args = [q, kvp, compressed, idx, sink.astype(jnp.float32)] + ([segp] if has_seg else [])
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, lay=lay, scale=float(scale), has_seg=has_seg),
        grid=(lay.b * lay.s,),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((lay.b, lay.s, lay.h), jnp.float32)],
        compiler_params=None if interpret else compat.triton_compiler_params(
            cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="csa_fwd_gpu",
    )(*args)
    return out, lse


def _scatter_rows_add(acc_ref, b, tgt, vals, interpret):
    """acc_ref[b, tgt[r], :] += vals[r] for every r (duplicates accumulate)."""
    if interpret:  # the interpreter's vector atomic would keep one update per duplicate target
        for r in range(vals.shape[0]):
            compat.triton_atomic_add(acc_ref, (b, tgt[r], pl.ds(0, vals.shape[1])), vals[r])
    else:
        cols = jnp.arange(vals.shape[1], dtype=jnp.int32)
        compat.triton_atomic_add(acc_ref, (b, tgt[:, None], cols[None, :]), vals)


def _bwd_kernel(*refs, lay, scale, has_seg, interpret):
    if has_seg:
        (q_ref, do_ref, lse_ref, dlt_ref, kv_ref, c_ref, idx_ref, seg_ref, _dkv0, _dc0,
         dq_ref, dkv_ref, dc_ref) = refs
    else:
        (q_ref, do_ref, lse_ref, dlt_ref, kv_ref, c_ref, idx_ref, _dkv0, _dc0,
         dq_ref, dkv_ref, dc_ref) = refs
        seg_ref = None
    pid = pl.program_id(0)            # 1-D grid: CUDA's 2nd/3rd grid dims stop at 65535
    bt, grp = pid // lay.ng, pid % lay.ng                  # (query, head group of hg heads)
    b, t = bt // lay.s, bt % lay.s
    heads = pl.ds(grp * lay.hg, lay.hg)
    qi = compat.triton_load(q_ref.at[b, t, heads, :])
    doi = compat.triton_load(do_ref.at[b, t, heads, :])
    lse = compat.triton_load(lse_ref.at[b, t, heads])
    dlt = compat.triton_load(dlt_ref.at[b, t, heads])

    def grads(vals, valid):
        s = compat.triton_dot(qi, vals, trans_b=True) * scale               # [H, n]
        p = jnp.where(valid[None, :], jnp.exp(s - lse[:, None]), 0.0)
        dp = compat.triton_dot(doi, vals, trans_b=True)
        dsc = p * (dp - dlt[:, None])
        dq = compat.triton_dot(dsc.astype(vals.dtype), vals) * scale        # [H, D]
        dk = (compat.triton_dot(dsc.astype(qi.dtype), qi, trans_a=True) * scale
              + compat.triton_dot(p.astype(doi.dtype), doi, trans_a=True))  # [n, D]
        return dq, dk

    dq = jnp.zeros((lay.hg, lay.d), jnp.float32)
    for start in range(0, lay.wb, lay.wt):
        keys, valid = _window(lay, b, t, kv_ref, seg_ref, start, lay.wt)
        dqw, dk = grads(keys, valid)
        compat.triton_atomic_add(dkv_ref, (b, pl.ds(t + 1 + start, lay.wt), pl.ds(0, lay.d)), dk)
        dq = dq + dqw

    def body(c, dq):
        rows, valid, ids = _chunk(lay, b, t, c, idx_ref, c_ref)
        dqc, dkc = grads(rows, valid)
        _scatter_rows_add(dc_ref, b, jnp.where(valid, ids, lay.n), dkc, interpret)
        return dq + dqc

    dq = lax.fori_loop(0, lay.nc, body, dq)
    compat.triton_store(dq_ref.at[b, t, heads, :], dq)


def csa_bwd_gpu(q, kv, compressed, topk_idx, sink, out, lse, dout, *, window, scale,
                segment_ids, cfg: SparseAttentionConfig, interpret: bool, dlse=None):
    """Gradients (dq, dkv, dcompressed, dsink) of `csa_fwd_gpu` (fp32 atomic accumulation)."""
    if cfg.bwd_block_k is not None:
        cfg = dataclasses.replace(cfg, block_k=cfg.bwd_block_k)
    lay = _Layout(q.shape, topk_idx.shape[-1], compressed.shape[1], window, cfg)
    kvp, idx, segp = _prepare(lay, kv, topk_idx, segment_ids)
    has_seg = segp is not None
    delta = softmax_delta(out, dout, dlse)
    dkv0 = jnp.zeros((lay.b, lay.wb + lay.s, lay.d), jnp.float32)
    dc0 = jnp.zeros((lay.b, lay.n + 1, lay.d), jnp.float32)                         # + trash row
    args = ([q, dout.astype(q.dtype), lse, delta, kvp, compressed, idx]
            + ([segp] if has_seg else []) + [dkv0, dc0])
    n_in = len(args)
    dq, dkvp, dc = pl.pallas_call(
        functools.partial(_bwd_kernel, lay=lay, scale=float(scale), has_seg=has_seg,
                          interpret=interpret),
        grid=(lay.b * lay.s * lay.ng,),
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32),
                   jax.ShapeDtypeStruct(dkv0.shape, jnp.float32),
                   jax.ShapeDtypeStruct(dc0.shape, jnp.float32)],
        input_output_aliases={n_in - 2: 1, n_in - 1: 2},
        compiler_params=None if interpret else compat.triton_compiler_params(
            cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="csa_bwd_gpu",
    )(*args)
    dsink = dsink_from_stats(sink, lse, delta)
    return (dq.astype(q.dtype), dkvp[:, lay.wb:].astype(kv.dtype),
            dc[:, :lay.n].astype(compressed.dtype), dsink.astype(sink.dtype))
