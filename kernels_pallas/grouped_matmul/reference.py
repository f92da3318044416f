"""Reference grouped matmuls in plain XLA: `lax.ragged_dot` (every platform; the numbers the
kernels are tested against) and its transposed product, for the backward of the kernels' tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_dot(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, out_dtype=None):
    """lhs [M, K], rhs [G, K, N] ([G, N, K] if transpose_rhs), group_sizes [G] int32 -> [M, N]
    (rows past sum(group_sizes) are zero). Differentiable through XLA's own rules."""
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype or lhs.dtype)


def grouped_transposed(lhs, dout, group_sizes, num_groups: int, *, out_dtype=None):
    """[G, K, N] with out[g] = lhs[rows of g]^T @ dout[rows of g] (zeros for empty groups), via a
    one-hot mask over rows: O(G M K N), for tests only."""
    m = lhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(m)
    onehot = ((rows[None, :] >= starts[:, None])
              & (rows[None, :] < ends[:, None])).astype(jnp.float32)
    out = jnp.einsum("gm,mk,mn->gkn", onehot, lhs.astype(jnp.float32), dout.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return out.astype(out_dtype or lhs.dtype)
