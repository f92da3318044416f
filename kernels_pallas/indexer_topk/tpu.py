"""Mosaic TPU kernel of the fused lightning indexer: scores over key tiles, exact running top-k.

Grid (B, query blocks, key steps); the last axis walks the key tiles [tile_lo, tile_hi) of the
block (scalar-prefetched; steps past the range repeat the last tile's block index, so they cost
no DMA, and do nothing). One step:
  * dots = q_block [bq * Hi, Di] . keys [L, Di]^T on the MXU (the block's queries and heads are
    the M dimension: never a one-row matmul);
  * scores [bq, L] = sum_h w[h, q] * relu(dots[h, q, :]) in fp32; -inf where not visible
    (causal rule on the entry index against the query's position, offset + row, segment ids);
  * if any score beats its row's current k-th best, the tile is bitonic-sorted and merged into
    the [bq, L] best-first state (fp32 scores + int32 indices in VMEM scratch; `bitonic.py`,
    lane rotations). The [S, N] score matrix never exists: HBM holds only the inputs and the
    [S, L] result.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import compat
from kernels_pallas.indexer_topk import bitonic
from kernels_pallas.indexer_topk.plan import Layout, prepare, query_offsets


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _kernel(lo_ref, hi_ref, off_ref, q_ref, w_ref, qseg_ref, k_ref, kseg_ref, *refs, lay: Layout,
            with_scores: bool):
    if with_scores:
        idx_ref, vals_ref, sv_ref, si_ref = refs
    else:
        (idx_ref, sv_ref, si_ref), vals_ref = refs, None
    b, j, kj = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bj = b * lay.nq + j
    tile = lo_ref[bj] + kj

    @pl.when(kj == 0)
    def _():
        v0, i0 = bitonic.empty_state(lay.bq, lay.width)
        sv_ref[...] = v0
        si_ref[...] = i0

    @pl.when(tile < hi_ref[bj])
    def _():
        q = q_ref[...].reshape(lay.bq * lay.h, lay.d)
        dots = lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())),
                               precision=_precision(q_ref.dtype),
                               preferred_element_type=jnp.float32)        # [bq * Hi, L]
        r = jnp.maximum(dots, 0.0).reshape(lay.bq, lay.h, lay.bk)
        sc = jnp.sum(r * w_ref[...][:, :, None], axis=1)                  # [bq, L]
        e = tile * lay.bk + lax.broadcasted_iota(jnp.int32, (lay.bq, lay.bk), 1)
        t = off_ref[0] + j * lay.bq + lax.broadcasted_iota(jnp.int32, (lay.bq, lay.bk), 0)
        vis = (e * lay.ratio + (lay.ratio - 1) <= t) & (kseg_ref[...] == qseg_ref[...])
        sc = jnp.where(vis, sc, bitonic.NEG_INF)
        if lay.scores_only:   # what scoring alone costs (benchmarks): a running row max
            sv_ref[...] = jnp.maximum(sv_ref[...], jnp.max(sc, axis=1, keepdims=True))
            return
        kth = bitonic.kth_value(sv_ref[...], lay.k)

        @pl.when(jnp.max(jnp.where(sc > kth, 1.0, 0.0)) > 0.0)
        def _():
            nv, ni = bitonic.merge_tile(sv_ref[...], si_ref[...], sc, e, exchange="roll")
            sv_ref[...] = nv
            si_ref[...] = ni

    @pl.when(kj == pl.num_programs(2) - 1)
    def _():
        sv = sv_ref[...]
        idx_ref[...] = jnp.where(sv > bitonic.NEG_INF, si_ref[...], -1)
        if vals_ref is not None:
            vals_ref[...] = sv


def indexer_topk_tpu(q, weights, keys, *, lay: Layout, key_valid, segment_ids, vmem_limit_bytes,
                     with_scores: bool, interpret: bool, key_segments=None, query_offset=0):
    """q [B,S,Hi,Di], weights [B,S,Hi], keys [B,N,Di] -> best-first indices [B, Sp, L] (-1 =
    none) and, with_scores, their scores (-inf for none). query_offset: the position of row 0
    (a traced scalar under context parallelism; scalar-prefetched), key_segments: `prepare`."""
    kseg, qseg, tile_lo, tile_hi = prepare(lay, key_valid, segment_ids, key_segments,
                                           query_offset)
    ds = lay.sp - lay.s
    qp = jnp.pad(q, ((0, 0), (0, ds), (0, 0), (0, 0)))
    wp = jnp.pad(weights.astype(jnp.float32), ((0, 0), (0, ds), (0, 0)))
    kp = jnp.pad(keys, ((0, 0), (0, lay.np_ - lay.n), (0, 0))).astype(q.dtype)

    def tile_of(b, j, kj, lo, hi):
        bj = b * lay.nq + j
        return jnp.clip(jnp.minimum(lo[bj] + kj, hi[bj] - 1), 0, lay.nk - 1)

    out_block = pl.BlockSpec((None, lay.bq, lay.width), lambda b, j, kj, lo, hi, off: (b, j, 0))
    out_shape = [jax.ShapeDtypeStruct((lay.b, lay.sp, lay.width), jnp.int32)]
    if with_scores:
        out_shape.append(jax.ShapeDtypeStruct((lay.b, lay.sp, lay.width), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_kernel, lay=lay, with_scores=with_scores),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(lay.b, lay.nq, lay.nk),
            in_specs=[
                pl.BlockSpec((None, lay.bq, lay.h, lay.d),
                             lambda b, j, kj, lo, hi, off: (b, j, 0, 0)),
                pl.BlockSpec((None, lay.bq, lay.h), lambda b, j, kj, lo, hi, off: (b, j, 0)),
                pl.BlockSpec((None, lay.bq, 1), lambda b, j, kj, lo, hi, off: (b, j, 0)),
                pl.BlockSpec((None, lay.bk, lay.d),
                             lambda b, j, kj, lo, hi, off: (b, tile_of(b, j, kj, lo, hi), 0)),
                pl.BlockSpec((None, 1, lay.bk),
                             lambda b, j, kj, lo, hi, off: (b, 0, tile_of(b, j, kj, lo, hi))),
            ],
            out_specs=[out_block] * len(out_shape),
            scratch_shapes=[pltpu.VMEM((lay.bq, lay.width), jnp.float32),
                            pltpu.VMEM((lay.bq, lay.width), jnp.int32)]),
        out_shape=out_shape,
        compiler_params=compat.tpu_compiler_params(
            (compat.PARALLEL, compat.PARALLEL, compat.ARBITRARY), vmem_limit_bytes),
        interpret=interpret,
        name="indexer_topk_tpu",
    )(tile_lo, tile_hi, query_offsets(query_offset), qp, wp, qseg[..., None], kp, kseg[:, None, :])
    return outs[0], (outs[1] if with_scores else None)
