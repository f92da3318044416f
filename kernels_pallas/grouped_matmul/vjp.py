"""custom_vjp of the Pallas grouped matmuls (a `pallas_call` is not differentiable by itself).

For out = gmm(lhs, rhs, sizes):
  d lhs = gmm(d out, rhs, sizes, transpose_rhs=True)   (d out_g @ rhs_g^T, same visit list)
  d rhs = tgmm(lhs, d out, sizes)                      (lhs_g^T @ d out_g per group)
and with transpose_rhs (out = lhs @ rhs_g^T): d lhs = gmm(d out, rhs), d rhs = tgmm(d out, lhs).
group_sizes get no gradient (integers).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from kernels_pallas.grouped_matmul import gpu, tpu
from kernels_pallas.grouped_matmul.config import GroupedMatmulConfig


@dataclasses.dataclass(frozen=True)
class Static:
    backend: str                 # "tpu" or "gpu"
    transpose_rhs: bool
    out_dtype: str
    config: GroupedMatmulConfig
    interpret: bool


def _kernels(backend: str):
    if backend == "tpu":
        return tpu.gmm_tpu, tpu.tgmm_tpu
    return gpu.gmm_gpu, gpu.tgmm_gpu


def _gmm(lhs, rhs, sizes, st: Static, transpose_rhs: bool, out_dtype):
    gmm, _ = _kernels(st.backend)
    return gmm(lhs, rhs, sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
               cfg=st.config, interpret=st.interpret)


def _tgmm(lhs, dout, sizes, num_groups, st: Static, out_dtype):
    _, tgmm = _kernels(st.backend)
    return tgmm(lhs, dout, sizes, num_groups, out_dtype=out_dtype, cfg=st.config,
                interpret=st.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm_pallas(lhs, rhs, group_sizes, st: Static):
    return _gmm(lhs, rhs, group_sizes, st, st.transpose_rhs, st.out_dtype)


def _fwd(lhs, rhs, group_sizes, st):
    return _gmm(lhs, rhs, group_sizes, st, st.transpose_rhs, st.out_dtype), (lhs, rhs, group_sizes)


def _bwd(st, res, dout):
    lhs, rhs, sizes = res
    dout = dout.astype(lhs.dtype)
    g = rhs.shape[0]
    if st.transpose_rhs:   # out = lhs @ rhs_g^T, rhs [G, N, K]
        dlhs = _gmm(dout, rhs, sizes, st, False, lhs.dtype)
        drhs = _tgmm(dout, lhs, sizes, g, st, rhs.dtype)
    else:                  # out = lhs @ rhs_g, rhs [G, K, N]
        dlhs = _gmm(dout, rhs, sizes, st, True, lhs.dtype)
        drhs = _tgmm(lhs, dout, sizes, g, st, rhs.dtype)
    dsizes = np.zeros(sizes.shape, jax.dtypes.float0)
    return dlhs, drhs, dsizes


gmm_pallas.defvjp(_fwd, _bwd)


def transposed_pallas(lhs, dout, group_sizes, num_groups: int, st: Static):
    """The transposed grouped product alone (forward only): [G, K, N]."""
    return _tgmm(lhs, dout, group_sizes, num_groups, st, st.out_dtype)


__all__ = ["Static", "gmm_pallas", "transposed_pallas"]
