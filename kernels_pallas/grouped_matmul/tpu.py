"""Mosaic TPU grouped matmuls (megablox-style): the forward product and the transposed one.

gmm:  out[rows of g] = lhs[rows of g] @ rhs[g]       lhs [M, K], rhs [G, K, N] (or [G, N, K]
      with transpose_rhs) -> [M, N]. Grid (N tiles, visits, K tiles): the visit list
      (`plan.work_list`) walks the row tiles group by group; a tile shared by two groups is
      visited twice in a row (its output block stays in VMEM between the visits) and each visit
      stores only its group's rows. Rows past sum(group_sizes) are a tail "group" that stores
      zeros (as `lax.ragged_dot` does). fp32 accumulator in VMEM scratch.
tgmm: out[g] = lhs[rows of g]^T @ dout[rows of g]  -> [G, K, N]. Grid (K tiles, N tiles,
      visits): consecutive visits of one group accumulate into one output block, which is
      stored when the group changes; an empty group is visited once and stores zeros. Rows of
      other groups in a shared tile are masked (in both operands, so a non-finite value in
      another group cannot leak through 0 * inf).

The visit list, group starts/ends and count travel as scalar-prefetch operands (SMEM) and
drive the index maps; visits past the real count repeat the last real block indices (no DMA)
and do nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import compat
from kernels_pallas.grouped_matmul.config import GroupedMatmulConfig
from kernels_pallas.grouped_matmul.plan import work_list


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _pad2(x, rows: int, cols: int):
    pr, pc = rows - x.shape[0], cols - x.shape[1]
    return x if not (pr or pc) else jnp.pad(x, ((0, pr), (0, pc)))


def _row_mask(shape, tile, tm, start, end):
    rows = tile * tm + lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


# ------------------------------------------------------------------------------ gmm (forward)

def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, count_ref, lhs_ref, rhs_ref, out_ref,
                acc_ref, *, num_groups: int, tm: int, nk: int, transpose_rhs: bool):
    i, kk = pl.program_id(1), pl.program_id(2)
    g = group_ref[i]
    live = i < count_ref[0]

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live & (g < num_groups))
    def _():
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(lhs_ref[...], rhs_ref[...], dims,
                                        precision=_precision(lhs_ref.dtype),
                                        preferred_element_type=jnp.float32)

    @pl.when(live & (kk == nk - 1))
    def _():
        mask = _row_mask(acc_ref.shape, tile_ref[i], tm, start_ref[g], end_ref[g])
        val = jnp.where(g < num_groups, acc_ref[...], 0.0)
        out_ref[...] = jnp.where(mask, val, out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def gmm_tpu(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None,
            cfg: GroupedMatmulConfig, interpret: bool):
    """lhs [M, K], rhs [G, K, N] ([G, N, K] if transpose_rhs), group_sizes [G] int32 -> [M, N]."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    tm, tk, tn = cfg.block_m, cfg.block_k, cfg.block_n
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p = _pad2(lhs, mp, kp)
    if transpose_rhs:
        rhs_p = rhs if (np_, kp) == (n, k) else jnp.pad(rhs, ((0, 0), (0, np_ - n), (0, kp - k)))
    else:
        rhs_p = rhs if (kp, np_) == (k, n) else jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n)))
    wl = work_list(group_sizes, mp, tm, visit_empty=False, tail=True)
    nk, nn = kp // tk, np_ // tn

    def k_of(i, kk, count_ref):
        # Visits past the real count keep the last block (no new DMA).
        return jnp.where(i < count_ref[0], kk, nk - 1)

    def lhs_map(nj, i, kk, group, tile, start, end, count):
        return tile[i], k_of(i, kk, count)

    def rhs_map(nj, i, kk, group, tile, start, end, count):
        gi = jnp.minimum(group[i], g - 1)
        kb = k_of(i, kk, count)
        return (gi, nj, kb) if transpose_rhs else (gi, kb, nj)

    def out_map(nj, i, kk, group, tile, start, end, count):
        return tile[i], nj

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, num_groups=g, tm=tm, nk=nk, transpose_rhs=transpose_rhs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(nn, wl.length, nk),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=compat.tpu_compiler_params(
            (compat.PARALLEL, compat.ARBITRARY, compat.ARBITRARY), cfg.vmem_limit_bytes),
        interpret=interpret,
        name="gmm_tpu",
    )(*wl.scalars(), lhs_p, rhs_p)
    return out[:m, :n]


# ------------------------------------------------------------------------ tgmm (d rhs)

def _tgmm_kernel(group_ref, tile_ref, start_ref, end_ref, count_ref, lhs_ref, dout_ref, out_ref,
                 acc_ref, *, tm: int, length: int):
    i = pl.program_id(2)
    g = group_ref[i]
    live = i < count_ref[0]
    prev_g = group_ref[jnp.maximum(i - 1, 0)]
    next_g = group_ref[jnp.minimum(i + 1, length - 1)]

    @pl.when((i == 0) | (prev_g != g))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(live & (end_ref[g] > start_ref[g]))
    def _():
        tile, start, end = tile_ref[i], start_ref[g], end_ref[g]
        x = jnp.where(_row_mask(lhs_ref.shape, tile, tm, start, end), lhs_ref[...], 0)
        y = jnp.where(_row_mask(dout_ref.shape, tile, tm, start, end), dout_ref[...], 0)
        acc_ref[...] += lax.dot_general(x.astype(lhs_ref.dtype), y.astype(dout_ref.dtype),
                                        (((0,), (0,)), ((), ())),
                                        precision=_precision(lhs_ref.dtype),
                                        preferred_element_type=jnp.float32)

    @pl.when((i == length - 1) | (next_g != g))
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm_tpu(lhs, dout, group_sizes, num_groups: int, *, out_dtype=None,
             cfg: GroupedMatmulConfig, interpret: bool):
    """lhs [M, K], dout [M, N], group_sizes [G] -> [G, K, N]: lhs_g^T @ dout_g per group (zeros
    for empty groups)."""
    m, k = lhs.shape
    n = dout.shape[1]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    tm, tk, tn = cfg.block_m, cfg.block_k, cfg.block_n
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p, dout_p = _pad2(lhs, mp, kp), _pad2(dout, mp, np_)
    wl = work_list(group_sizes, mp, tm, visit_empty=True, tail=False)

    def lhs_map(kj, nj, i, group, tile, start, end, count):
        return tile[i], kj

    def dout_map(kj, nj, i, group, tile, start, end, count):
        return tile[i], nj

    def out_map(kj, nj, i, group, tile, start, end, count):
        return group[i], kj, nj

    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, length=wl.length),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(kp // tk, np_ // tn, wl.length),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dout_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        compiler_params=compat.tpu_compiler_params(
            (compat.PARALLEL, compat.PARALLEL, compat.ARBITRARY), cfg.vmem_limit_bytes),
        interpret=interpret,
        name="tgmm_tpu",
    )(*wl.scalars(), lhs_p, dout_p)
    return out[:, :k, :n]
