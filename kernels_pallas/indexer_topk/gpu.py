"""Pallas Triton (GPU) kernel of the fused lightning indexer: scores + exact running top-k.

One program per (batch row, block of bq queries). It loops over its key tiles [tile_lo,
tile_hi) (dynamic trip count from the causal rule and the segments), bk keys at a time:
  * dots = q [bq * Hi, Di] . keys [bk, Di]^T (tensor cores; queries x heads on M);
  * scores [bq, bk] = sum_h w * relu(dots) in fp32, -inf where not visible;
  * if a score beats its row's k-th best, the tile is bitonic-sorted and merged into the
    [bq, L] best-first state, which lives in registers as the loop carry (`bitonic.py`, the
    "split" exchange: reshape / transpose / tt.split / tt.join). Nothing but the inputs and the
    final [S, L] state touches global memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import compat
from kernels_pallas.indexer_topk import bitonic
from kernels_pallas.indexer_topk.plan import Layout, prepare, query_offsets


def _scalar(ref, i):
    return compat.triton_load(ref.at[pl.ds(i, 1)])[0]


def _kernel(lo_ref, hi_ref, off_ref, q_ref, w_ref, qseg_ref, k_ref, kseg_ref, idx_ref, *vals_ref,
            lay: Layout):
    pid = pl.program_id(0)
    b, j = pid // lay.nq, pid % lay.nq
    lo, hi = _scalar(lo_ref, pid), _scalar(hi_ref, pid)
    rows = pl.ds(j * lay.bq, lay.bq)
    q = compat.triton_load(q_ref.at[b, rows, :, :]).reshape(lay.bq * lay.h, lay.d)
    w = compat.triton_load(w_ref.at[b, rows, :]).astype(jnp.float32)           # [bq, Hi]
    qs = compat.triton_load(qseg_ref.at[b, rows])                               # [bq]
    t = _scalar(off_ref, 0) + j * lay.bq + jnp.arange(lay.bq, dtype=jnp.int32)

    def body(tile, state):
        sv, si = state
        keys = compat.triton_load(k_ref.at[b, pl.ds(tile * lay.bk, lay.bk), :])  # [bk, Di]
        ks = compat.triton_load(kseg_ref.at[b, pl.ds(tile * lay.bk, lay.bk)])   # [bk]
        dots = compat.triton_dot(q, keys, trans_b=True)                         # [bq*Hi, bk]
        r = jnp.maximum(dots, 0.0).reshape(lay.bq, lay.h, lay.bk)
        sc = jnp.sum(r * w[:, :, None], axis=1)                                 # [bq, bk]
        e = tile * lay.bk + jnp.arange(lay.bk, dtype=jnp.int32)
        vis = ((e[None, :] * lay.ratio + (lay.ratio - 1) <= t[:, None])
               & (ks[None, :] == qs[:, None]))
        sc = jnp.where(vis, sc, bitonic.NEG_INF)
        if lay.scores_only:   # what scoring alone costs (benchmarks): a running row max
            return jnp.maximum(sv, jnp.max(sc, axis=1)[:, None]), si
        ee = jnp.broadcast_to(e[None, :], (lay.bq, lay.bk))
        beats = jnp.where(sc > bitonic.kth_value(sv, lay.k), 1, 0)
        hit = jnp.max(jnp.max(beats, axis=1), axis=0) > 0     # one axis at a time (Triton)

        def merge(state):
            return bitonic.merge_tile(state[0], state[1], sc, ee, exchange="split")

        return lax.cond(hit, merge, lambda state: state, (sv, si))

    state = bitonic.empty_state(lay.bq, lay.width)
    sv, si = lax.fori_loop(lo, hi, body, state)
    compat.triton_store(idx_ref.at[b, rows, :], jnp.where(sv > bitonic.NEG_INF, si, -1))
    if vals_ref:
        compat.triton_store(vals_ref[0].at[b, rows, :], sv)


def indexer_topk_gpu(q, weights, keys, *, lay: Layout, key_valid, segment_ids, num_warps: int,
                     num_stages: int, with_scores: bool, interpret: bool, key_segments=None,
                     query_offset=0):
    """q [B,S,Hi,Di], weights [B,S,Hi], keys [B,N,Di] -> best-first indices [B, Sp, L] (-1 =
    none) and, with_scores, their scores (-inf for none). query_offset: the position of row 0
    (a [1] int32 operand), key_segments: `prepare`."""
    kseg, qseg, tile_lo, tile_hi = prepare(lay, key_valid, segment_ids, key_segments,
                                           query_offset)
    ds = lay.sp - lay.s
    qp = jnp.pad(q, ((0, 0), (0, ds), (0, 0), (0, 0)))
    wp = jnp.pad(weights.astype(jnp.float32), ((0, 0), (0, ds), (0, 0)))
    kp = jnp.pad(keys, ((0, 0), (0, lay.np_ - lay.n), (0, 0))).astype(q.dtype)
    out_shape = [jax.ShapeDtypeStruct((lay.b, lay.sp, lay.width), jnp.int32)]
    if with_scores:
        out_shape.append(jax.ShapeDtypeStruct((lay.b, lay.sp, lay.width), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_kernel, lay=lay),
        grid=(lay.b * lay.nq,),
        out_shape=out_shape,
        compiler_params=None if interpret else compat.triton_compiler_params(num_warps,
                                                                             num_stages),
        interpret=interpret,
        name="indexer_topk_gpu",
    )(tile_lo, tile_hi, query_offsets(query_offset), qp, wp, qseg, kp, kseg)
    return outs[0], (outs[1] if with_scores else None)
