"""The one place for JAX 0.11.2 (GPU machines) vs 0.12.x (CPU machines, CI) differences.

Kernels import Pallas names from here instead of reaching into version-specific places.
What this module relies on, checked against both wheels (see shared notes `jax_versions.md`):

* `pl.BlockSpec(block_shape, index_map, memory_space=...)`, `pl.pallas_call(...)`, `pl.ANY`
  (the "leave it in HBM" memory space), `pl.ds`, `pl.program_id`, `pl.when`, `pl.cdiv`:
  identical on both.
* TPU: `pltpu.CompilerParams(dimension_semantics=..., vmem_limit_bytes=...)`,
  `pltpu.PrefetchScalarGridSpec`, `pltpu.make_async_copy`, `pltpu.SemaphoreType.DMA`,
  `pltpu.VMEM`, `pltpu.SMEM`: identical on both.
* Triton: `jax.experimental.pallas.triton.{load, store, dot, atomic_add, CompilerParams}`:
  identical on both. `pl.dot` is gone (0.12) / a `None` stub (0.11.2): never use it.
* `pltpu.MemorySpace.SMEM/VMEM`, `pltpu.SMEM`, `pltpu.VMEM` exist on both.

Which implementation runs and whether Pallas is interpreted is not a version difference: that
is `kernels_pallas.registry`.

Things present only in 0.12 (`plgpu.sum/max/store`, `jax.no_collectives`, tuple
`Buffered(buffer_count)`, ...) are not used anywhere in the kernels.
"""
from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:  # The Triton backend ships with jaxlib on both versions; keep the import failure readable.
    from jax.experimental.pallas import triton as pl_triton
except ImportError as e:  # pragma: no cover - depends on the jaxlib build
    pl_triton = None
    _TRITON_IMPORT_ERROR = e
else:
    _TRITON_IMPORT_ERROR = None

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
SUPPORTED_JAX = ((0, 11, 2), (0, 12, 0))  # the two lines we test against (0.11.2 GPU, 0.12.x CPU)

ANY = pl.ANY            # "leave it where it is" (HBM on TPU); the operand is DMA'd by hand.
SMEM = pltpu.SMEM
VMEM = pltpu.VMEM
DMA = pltpu.SemaphoreType.DMA
PARALLEL = "parallel"
ARBITRARY = "arbitrary"


def backend() -> str:
    """The default backend's platform name: "cpu", "gpu" or "tpu" (the host's; which platform
    a call compiles for is `kernels_pallas.registry.current_platform`)."""
    return jax.default_backend()


def is_concrete(x) -> bool:
    """True unless x is a tracer (a value checks can read on the host)."""
    return not isinstance(x, jax.core.Tracer)


def tpu_compiler_params(dimension_semantics: tuple[str, ...],
                        vmem_limit_bytes: int | None = None):
    """Mosaic TPU compiler parameters (the class is `pltpu.CompilerParams` on both versions)."""
    kw = {"dimension_semantics": tuple(dimension_semantics)}
    if vmem_limit_bytes is not None:
        kw["vmem_limit_bytes"] = int(vmem_limit_bytes)
    return pltpu.CompilerParams(**kw)


def _need_triton():
    if pl_triton is None:
        raise RuntimeError(f"the Pallas Triton backend cannot be imported: {_TRITON_IMPORT_ERROR}")
    return pl_triton


def triton_compiler_params(num_warps: int, num_stages: int):
    """Pallas-Triton compiler parameters. Passing these (not `plgpu.CompilerParams`) picks the
    Triton backend on GPU."""
    return _need_triton().CompilerParams(num_warps=num_warps, num_stages=num_stages)


def triton_load(ref, *, mask=None, other=None):
    """Triton-backend load (`pl.load` is not the Triton one)."""
    return _need_triton().load(ref, mask=mask, other=other)


def triton_store(ref, val, *, mask=None):
    return _need_triton().store(ref, val, mask=mask)


def triton_atomic_add(ref, idx, val, *, mask=None):
    return _need_triton().atomic_add(ref, idx, val, mask=mask)


def triton_dot(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """2-D matmul with an fp32 result for the Triton backend (`pl.dot` no longer exists).

    fp32 operands use full precision (no TF32) so compiled results match the fp32 reference.
    """
    precision = lax.Precision.HIGHEST if (a.dtype == jax.numpy.float32
                                          or b.dtype == jax.numpy.float32) else None
    return _need_triton().dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


@functools.cache
def has_libtpu() -> bool:
    """True if a libtpu wheel is importable (needed for TPU AOT compilation on a CPU host)."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True
