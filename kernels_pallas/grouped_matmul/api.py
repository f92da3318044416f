"""Grouped matmul registry: `out[rows of group g] = lhs[rows of g] @ rhs[g]`, the MoE's expert
product after its tokens are sorted by expert (dropless: any group sizes, zero included).

    out = grouped_matmul(lhs, rhs, group_sizes, implementation=None, interpret=None,
                         config=None, preferred_element_type=None)

lhs [M, K], rhs [G, K, N], group_sizes [G] int32 (sum <= M; rows past the sum give zeros, as in
`lax.ragged_dot`) -> [M, N] in `preferred_element_type` (default: lhs's dtype), accumulated in
fp32. Differentiable in lhs and rhs (both backward products are grouped matmuls too).

Implementations (`OP`, a `kernels_pallas.registry.Op`):
  "reference"   `jax.lax.ragged_dot` (every platform). On GPU, XLA's ragged_dot is known to
                lower to a dense materialisation: it is the correctness reference there, not
                the fast path. The old name "ragged_dot" is an alias (one deprecation note).
  "pallas_tpu"  Mosaic TPU megablox-style kernels (forward, d lhs, d rhs) with a custom_vjp.
  "pallas_gpu"  Pallas Triton kernels with the same structure.
  "tokamax"     `tokamax.ragged_dot` when the package is importable (an error naming the
                missing package otherwise); its own implementation is picked per target
                platform ("mosaic" on TPU, "triton" on GPU; `tokamax_implementation=` overrides).
None = the target platform's preference: "pallas_tpu" on TPU, "pallas_gpu" on GPU (where the
tiles take the shapes, else "reference", logged once), "reference" on CPU. An explicitly named
implementation that cannot run raises, naming the reason. `interpret=None` = interpret the
Pallas kernels iff the target platform is CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import compat, registry
from kernels_pallas.grouped_matmul import reference
from kernels_pallas.grouped_matmul.config import GroupedMatmulConfig, default_config
from kernels_pallas.grouped_matmul.vjp import Static, gmm_pallas, transposed_pallas

_TOKAMAX_DEFAULT = {"tpu": "mosaic", "gpu": "triton", "cpu": "xla"}


@functools.cache
def tokamax_module():
    """The `tokamax` package, or a RuntimeError naming why it cannot be used."""
    try:   # optional package: importing this module must not need it
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


def _family(implementation: str) -> str:
    return "tpu" if implementation == "pallas_tpu" else "gpu"


def _config(implementation, lhs, n, config, interpret) -> GroupedMatmulConfig:
    m, k = lhs.shape
    if config is None:
        config = default_config(_family(implementation), compiled=not interpret, m=m, k=k, n=n)
    return config


def _static(implementation, lhs, n, transpose_rhs, out_dtype, config, interpret) -> Static:
    config = _config(implementation, lhs, n, config, interpret)
    config.validate_for(_family(implementation), compiled=not interpret, dtype=lhs.dtype)
    return Static(_family(implementation), bool(transpose_rhs), str(jnp.dtype(out_dtype)),
                  config, interpret)


def _tile_check(implementation):
    def check(lhs, *_, n, config, interpret, **__):
        cfg = _config(implementation, lhs, n, config, interpret)
        return registry.problem_of(cfg.validate_for, _family(implementation),
                                   compiled=not interpret, dtype=lhs.dtype)
    return check


# ------------------------------------------------------------------ forward: grouped_matmul

def _gmm_reference(lhs, rhs, group_sizes, *, n, transpose_rhs, out_dtype, config,
                   tokamax_implementation):
    return reference.ragged_dot(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs,
                                out_dtype=out_dtype)


def _gmm_tokamax(lhs, rhs, group_sizes, *, n, transpose_rhs, out_dtype, config,
                 tokamax_implementation, platform):
    tok = tokamax_module()
    impl = tokamax_implementation or _TOKAMAX_DEFAULT.get(platform, "xla")
    r = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out = tok.ragged_dot(lhs, r, group_sizes, preferred_element_type=jnp.float32,
                         implementation=impl)
    return out.astype(out_dtype)


def _gmm_pallas(implementation):
    def run(lhs, rhs, group_sizes, *, n, transpose_rhs, out_dtype, config,
            tokamax_implementation, interpret):
        st = _static(implementation, lhs, n, transpose_rhs, out_dtype, config, interpret)
        return gmm_pallas(lhs, rhs, group_sizes, st)
    return registry.Implementation(implementation, run, platforms=(_family(implementation),),
                                   check=_tile_check(implementation), interpretable=True)


_PREFERENCE = {"cpu": ("reference",), "tpu": ("pallas_tpu", "reference"),
               "gpu": ("pallas_gpu", "reference")}
_ALIASES = {"ragged_dot": "reference", "tpu": "pallas_tpu", "gpu": "pallas_gpu",
            "pallas": registry.pallas_for}

OP = registry.Op(
    "grouped_matmul",
    [registry.Implementation("reference", _gmm_reference),
     _gmm_pallas("pallas_tpu"), _gmm_pallas("pallas_gpu"),
     registry.Implementation("tokamax", _gmm_tokamax, takes_platform=True)],
    preference=_PREFERENCE, aliases=_ALIASES)
IMPLEMENTATIONS = OP.names
default_implementation = OP.default_implementation


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   implementation: str | None = None, interpret: bool | None = None,
                   config: GroupedMatmulConfig | None = None, preferred_element_type=None,
                   transpose_rhs: bool = False, tokamax_implementation: str | None = None,
                   platform: str | None = None):
    """lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs), group_sizes [G] int32
    -> [M, N] in preferred_element_type (default lhs.dtype). platform: the target (None =
    `registry.current_platform()`)."""
    implementation = OP.canonical(implementation, platform)
    validate_inputs(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs)
    if config is not None and not isinstance(config, GroupedMatmulConfig):
        raise TypeError(f"config={config!r} is invalid: expected a GroupedMatmulConfig or None")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return OP(lhs, rhs, group_sizes, n=n, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
              config=config, tokamax_implementation=tokamax_implementation,
              implementation=implementation, interpret=interpret, platform=platform)


# --------------------------------------------- weight gradient: grouped_matmul_transposed

def _tgmm_xla(lhs, dout, group_sizes, num_groups, *, n, out_dtype, config):
    """XLA's transpose rule of `lax.ragged_dot` (also what "tokamax" uses here)."""
    zeros = jnp.zeros((num_groups, lhs.shape[1], dout.shape[1]), lhs.dtype)
    _, vjp = jax.vjp(lambda r: jax.lax.ragged_dot(lhs, r, group_sizes,
                                                  preferred_element_type=jnp.float32), zeros)
    return vjp(dout.astype(jnp.float32))[0].astype(out_dtype)


def _tgmm_pallas(implementation):
    def run(lhs, dout, group_sizes, num_groups, *, n, out_dtype, config, interpret):
        st = _static(implementation, lhs, n, False, out_dtype, config, interpret)
        return transposed_pallas(lhs, dout, group_sizes, num_groups, st)
    return registry.Implementation(implementation, run, platforms=(_family(implementation),),
                                   check=_tile_check(implementation), interpretable=True)


TRANSPOSED_OP = registry.Op(
    "grouped_matmul_transposed",
    [registry.Implementation("reference", _tgmm_xla),
     _tgmm_pallas("pallas_tpu"), _tgmm_pallas("pallas_gpu"),
     registry.Implementation("tokamax", _tgmm_xla)],
    preference=_PREFERENCE, aliases=_ALIASES)
def grouped_matmul_transposed(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array,
                              num_groups: int, *, implementation: str | None = None,
                              interpret: bool | None = None,
                              config: GroupedMatmulConfig | None = None,
                              preferred_element_type=None):
    """The weight-gradient product on its own: [G, K, N] with out[g] = lhs_g^T @ dout_g
    (zeros for empty groups); lhs [M, K], dout [M, N]. "reference" (and "tokamax") use XLA's
    transpose rule of `lax.ragged_dot`; the Pallas implementations run their tgmm kernel
    (forward only)."""
    implementation = TRANSPOSED_OP.canonical(implementation)
    if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
        raise ValueError(f"lhs {lhs.shape} and dout {dout.shape}: expected [M, K] and [M, N]")
    validate_inputs(lhs, jax.ShapeDtypeStruct((num_groups, lhs.shape[1], 1), lhs.dtype),
                    group_sizes)
    if dout.dtype != lhs.dtype:
        raise TypeError(f"dout has dtype {dout.dtype} but lhs has {lhs.dtype}: expected the same")
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    return TRANSPOSED_OP(lhs, dout, group_sizes, num_groups, n=dout.shape[1],
                         out_dtype=out_dtype, config=config, implementation=implementation,
                         interpret=interpret)
