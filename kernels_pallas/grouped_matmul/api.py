"""Grouped matmul registry: `out[rows of group g] = lhs[rows of g] @ rhs[g]`, the MoE's expert
product after its tokens are sorted by expert (dropless: any group sizes, zero included).

    out = grouped_matmul(lhs, rhs, group_sizes, implementation=None, interpret=None,
                         config=None, preferred_element_type=None)

lhs [M, K], rhs [G, K, N], group_sizes [G] int32 (sum <= M; rows past the sum give zeros, as in
`lax.ragged_dot`) -> [M, N] in `preferred_element_type` (default: lhs's dtype), accumulated in
fp32. Differentiable in lhs and rhs (both backward products are grouped matmuls too).

Implementations (`IMPLEMENTATIONS`):
  "ragged_dot"  `jax.lax.ragged_dot` (every platform; the reference). On GPU, XLA's ragged_dot
                is known to lower to a dense materialisation: it is the correctness reference
                there, not the fast path.
  "pallas_tpu"  Mosaic TPU megablox-style kernels (forward, d lhs, d rhs) with a custom_vjp.
  "pallas_gpu"  Pallas Triton kernels with the same structure.
  "tokamax"     `tokamax.ragged_dot` when the package is importable (an error naming the
                missing package otherwise); its own implementation is picked per platform
                ("mosaic" on TPU, "triton" on GPU; `tokamax_implementation=` overrides).
None = "pallas_tpu" on TPU, "pallas_gpu" on GPU, "ragged_dot" on CPU (logged once). Nothing
falls back silently: an implementation that cannot run here raises, naming the reason.
`interpret=None` = interpret the Pallas kernels iff the backend is CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import compat
from kernels_pallas.grouped_matmul import reference
from kernels_pallas.grouped_matmul.config import GroupedMatmulConfig, default_config
from kernels_pallas.grouped_matmul.vjp import Static, gmm_pallas, transposed_pallas

IMPLEMENTATIONS = ("ragged_dot", "pallas_tpu", "pallas_gpu", "tokamax")
_TOKAMAX_DEFAULT = {"tpu": "mosaic", "gpu": "triton", "cpu": "xla"}


def default_implementation(platform: str | None = None) -> str:
    return compat.platform_implementation("grouped_matmul", "ragged_dot", platform)


@functools.cache
def tokamax_module():
    """The `tokamax` package, or a RuntimeError naming why it cannot be used."""
    try:
        import tokamax
    except ImportError as e:
        raise RuntimeError("implementation='tokamax' needs the optional `tokamax` package "
                           f"(pip install tokamax; it needs jax>=0.11.1), which is not "
                           f"importable here: {e}") from e
    return tokamax


def tokamax_available() -> bool:
    try:
        tokamax_module()
    except RuntimeError:
        return False
    return True


def validate_inputs(lhs, rhs, group_sizes, *, transpose_rhs: bool = False):
    """Raises ValueError/TypeError naming the offending argument. The sum of group_sizes is
    checked against M when the sizes are concrete (under `jit` only shapes and dtypes can be)."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs has shape {lhs.shape}: expected [M, K]")
    if rhs.ndim != 3:
        raise ValueError(f"rhs has shape {rhs.shape}: expected [G, K, N]"
                         + (" ([G, N, K] with transpose_rhs)" if transpose_rhs else ""))
    kdim = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != kdim:
        raise ValueError(f"lhs has K={lhs.shape[1]} columns but rhs has shape {rhs.shape}: "
                         f"expected K={kdim} to match")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} has dtype {x.dtype}: expected a floating dtype")
    if lhs.dtype != rhs.dtype:
        raise TypeError(f"lhs has dtype {lhs.dtype} but rhs has {rhs.dtype}: expected the same")
    if group_sizes.dtype != jnp.int32:
        raise TypeError(f"group_sizes has dtype {group_sizes.dtype}: expected int32")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes has shape {group_sizes.shape}: expected [G] = "
                         f"{(rhs.shape[0],)} (one size per rhs group)")
    if compat.is_concrete(group_sizes):
        sizes = np.asarray(group_sizes)
        if sizes.size and int(sizes.min()) < 0:
            raise ValueError(f"group_sizes holds {int(sizes.min())}: sizes must be >= 0")
        total = int(sizes.sum())
        if total != lhs.shape[0]:
            raise ValueError(f"group_sizes sum to {total} but lhs has M={lhs.shape[0]} rows: "
                             "every row must belong to exactly one group (sum == M)")


def _check_implementation(implementation):
    if implementation is None:
        implementation = default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is invalid: allowed values "
                         f"{IMPLEMENTATIONS + (None,)}")
    return implementation


def _static(implementation, lhs, n, transpose_rhs, out_dtype, config, interpret) -> Static:
    backend = "tpu" if implementation == "pallas_tpu" else "gpu"
    interpret = compat.resolve_interpret(interpret)
    if config is not None and not isinstance(config, GroupedMatmulConfig):
        raise TypeError(f"config={config!r} is invalid: expected a GroupedMatmulConfig or None")
    m, k = lhs.shape
    if config is None:
        config = default_config(backend, compiled=not interpret, m=m, k=k, n=n)
    config.validate_for(backend, compiled=not interpret, dtype=lhs.dtype)
    return Static(backend, bool(transpose_rhs), str(jnp.dtype(out_dtype)), config, interpret)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   implementation: str | None = None, interpret: bool | None = None,
                   config: GroupedMatmulConfig | None = None, preferred_element_type=None,
                   transpose_rhs: bool = False, tokamax_implementation: str | None = None):
    """lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs), group_sizes [G] int32
    -> [M, N] in preferred_element_type (default lhs.dtype)."""
    implementation = _check_implementation(implementation)
    validate_inputs(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if implementation == "ragged_dot":
        return reference.ragged_dot(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                                    out_dtype=out_dtype)
    if implementation == "tokamax":
        tok = tokamax_module()
        impl = tokamax_implementation or _TOKAMAX_DEFAULT.get(compat.backend(), "xla")
        r = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        out = tok.ragged_dot(lhs, r, group_sizes, preferred_element_type=jnp.float32,
                             implementation=impl)
        return out.astype(out_dtype)
    st = _static(implementation, lhs, n, transpose_rhs, out_dtype, config, interpret)
    return gmm_pallas(lhs, rhs, group_sizes, st)


def grouped_matmul_transposed(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array,
                              num_groups: int, *, implementation: str | None = None,
                              interpret: bool | None = None,
                              config: GroupedMatmulConfig | None = None,
                              preferred_element_type=None):
    """The weight-gradient product on its own: [G, K, N] with out[g] = lhs_g^T @ dout_g
    (zeros for empty groups); lhs [M, K], dout [M, N]. "ragged_dot" uses XLA's transpose rule
    of `lax.ragged_dot`; the Pallas implementations run their tgmm kernel (forward only)."""
    implementation = _check_implementation(implementation)
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"lhs {lhs.shape} and dout {dout.shape}: expected [M, K] and [M, N]")
    validate_inputs(lhs, jax.ShapeDtypeStruct((num_groups, lhs.shape[1], 1), lhs.dtype),
                    group_sizes)
    if dout.dtype != lhs.dtype:
        raise TypeError(f"dout has dtype {dout.dtype} but lhs has {lhs.dtype}: expected the same")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    if implementation in ("ragged_dot", "tokamax"):
        zeros = jnp.zeros((num_groups, lhs.shape[1], dout.shape[1]), lhs.dtype)
        _, vjp = jax.vjp(lambda r: jax.lax.ragged_dot(lhs, r, group_sizes,
                                                      preferred_element_type=jnp.float32), zeros)
        return vjp(dout.astype(jnp.float32))[0].astype(out_dtype)
    st = _static(implementation, lhs, dout.shape[1], False, out_dtype, config, interpret)
    return transposed_pallas(lhs, dout, group_sizes, num_groups, st)
