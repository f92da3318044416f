"""Pallas Triton (GPU) grouped matmuls: the forward product and the transposed one.

gmm:  one program per (visit, N tile) of the visit list (`plan.work_list`): it multiplies its
      row tile by its group's weights over the whole K (tk at a time, fp32 accumulator) and
      stores only its group's rows (masked store; a tile shared by two groups is written by two
      programs on disjoint rows, so no atomics are needed). Rows past sum(group_sizes) belong
      to a tail "group" whose programs store zeros. Visits past the real count return at once.
tgmm: one program per (group, K tile, N tile): it walks the group's rows (dynamic trip count
      from the group offsets) accumulating lhs^T @ dout in fp32 and stores the [tk, tn] block;
      an empty group stores zeros. Rows of other groups are masked in both operands.
Every dot is a Triton tile product (`compat.triton_dot`): nothing falls back to a dense
per-expert loop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import compat
from kernels_pallas.grouped_matmul.config import GroupedMatmulConfig
from kernels_pallas.grouped_matmul.plan import work_list


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad2(x, rows: int, cols: int):
    pr, pc = rows - x.shape[0], cols - x.shape[1]
    return x if not (pr or pc) else jnp.pad(x, ((0, pr), (0, pc)))


def _scalar(ref, i):
    return compat.triton_load(ref.at[pl.ds(i, 1)])[0]


def _gmm_kernel(group_ref, tile_ref, start_ref, end_ref, count_ref, lhs_ref, rhs_ref, out_ref, *,
                num_groups: int, tm: int, tk: int, tn: int, nk: int, nn: int,
                transpose_rhs: bool):
    pid = pl.program_id(0)
    i, nj = pid // nn, pid % nn

    @pl.when(i < _scalar(count_ref, 0))
    def _():
        g, tile = _scalar(group_ref, i), _scalar(tile_ref, i)
        start, end = _scalar(start_ref, g), _scalar(end_ref, g)
        gi = jnp.minimum(g, num_groups - 1)
        rows = pl.ds(tile * tm, tm)
        cols = pl.ds(nj * tn, tn)

        def body(kk, acc):
            a = compat.triton_load(lhs_ref.at[rows, pl.ds(kk * tk, tk)])
            if transpose_rhs:
                b = compat.triton_load(rhs_ref.at[gi, cols, pl.ds(kk * tk, tk)])
                return acc + compat.triton_dot(a, b, trans_b=True)
            b = compat.triton_load(rhs_ref.at[gi, pl.ds(kk * tk, tk), cols])
            return acc + compat.triton_dot(a, b)

        acc = jnp.zeros((tm, tn), jnp.float32)
        acc = lax.cond(g < num_groups, lambda a: lax.fori_loop(0, nk, body, a), lambda a: a, acc)
        r = tile * tm + jnp.arange(tm, dtype=jnp.int32)
        mask = (r >= start) & (r < end)
        compat.triton_store(out_ref.at[rows, cols], acc.astype(out_ref.dtype),
                            mask=mask[:, None])


def gmm_gpu(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None,
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
    nn = np_ // tn
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, num_groups=g, tm=tm, tk=tk, tn=tn, nk=kp // tk, nn=nn,
                          transpose_rhs=transpose_rhs),
        grid=(wl.length * nn,),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        compiler_params=None if interpret else compat.triton_compiler_params(
            cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="gmm_gpu",
    )(*wl.scalars(), lhs_p, rhs_p)
    return out[:m, :n]


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, out_ref, *, tm: int, tk: int, tn: int,
                 nk: int, nn: int):
    pid = pl.program_id(0)
    g, rest = pid // (nk * nn), pid % (nk * nn)
    kj, nj = rest // nn, rest % nn
    start, end = _scalar(start_ref, g), _scalar(end_ref, g)
    t0 = start // tm
    t1 = jnp.where(end > start, (end - 1) // tm + 1, t0)
    kcols, ncols = pl.ds(kj * tk, tk), pl.ds(nj * tn, tn)

    def body(t, acc):
        r = t * tm + jnp.arange(tm, dtype=jnp.int32)
        mask = ((r >= start) & (r < end))[:, None]
        a = compat.triton_load(lhs_ref.at[pl.ds(t * tm, tm), kcols], mask=mask, other=0)
        b = compat.triton_load(dout_ref.at[pl.ds(t * tm, tm), ncols], mask=mask, other=0)
        return acc + compat.triton_dot(a, b, trans_a=True)

    acc = lax.fori_loop(t0, t1, body, jnp.zeros((tk, tn), jnp.float32))
    compat.triton_store(out_ref.at[g, kcols, ncols], acc.astype(out_ref.dtype))


def tgmm_gpu(lhs, dout, group_sizes, num_groups: int, *, out_dtype=None,
             cfg: GroupedMatmulConfig, interpret: bool):
    """lhs [M, K], dout [M, N], group_sizes [G] -> [G, K, N]: lhs_g^T @ dout_g per group."""
    m, k = lhs.shape
    n = dout.shape[1]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    tm, tk, tn = cfg.block_m, cfg.block_k, cfg.block_n
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tk), _round_up(n, tn)
    lhs_p, dout_p = _pad2(lhs, mp, kp), _pad2(dout, mp, np_)
    wl = work_list(group_sizes, mp, tm, visit_empty=True, tail=False)
    nk, nn = kp // tk, np_ // tn
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, nk=nk, nn=nn),
        grid=(num_groups * nk * nn,),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
        compiler_params=None if interpret else compat.triton_compiler_params(
            cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="tgmm_gpu",
    )(wl.start, wl.end, lhs_p, dout_p)
    return out[:, :k, :n]
