"""Shared helpers for kernel tests: adversarial random inputs, interpret switch, skip markers,
and TPU ahead-of-time compilation on a CPU host.

Index lists built by `adversarial_topk` contain, by construction, every case the kernels must
survive: rows with no valid index, -1 padding first and last, duplicate indices within a row,
heavy overlap between neighbouring queries, and the first/last entry (0 and N-1).
"""
from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from kernels_pallas import compat, registry

try:
    import pytest
except ImportError:  # helpers stay importable outside pytest
    pytest = None


# ---------------------------------------------------------------------------- random inputs

def adversarial_topk(seed: int, b: int, s: int, k: int, n: int) -> np.ndarray:
    """[b, s, k] int32 lists of entries in [0, n) with -1 = none, covering the hard cases."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(b, s, k)).astype(np.int32)
    idx[rng.random((b, s, k)) < 0.25] = -1                        # scattered -1 padding
    for bi in range(b):
        for t in range(1, s):
            if t % 3 == 1:   # heavy overlap: reuse the previous query's list, change one slot
                idx[bi, t] = idx[bi, t - 1]
                idx[bi, t, rng.integers(0, k)] = rng.integers(0, n)
    idx[:, 0, :] = -1                                             # a row with no valid index
    if s > 2:
        idx[:, 2, 0] = -1                                         # -1 first ...
        idx[:, 2, -1] = -1                                        # ... and last
        idx[:, 2, k // 2] = n - 1                                 # the last entry
    if s > 4 and k >= 2:
        idx[:, 4, :] = 0                                          # duplicates (all of row 4: entry 0)
    if s > 5 and k >= 3:
        idx[:, 5, 1] = idx[:, 5, 2] = max(n // 2, 0)              # a duplicate pair
    return idx


def packed_segment_ids(b: int, s: int, lengths: list[int]) -> np.ndarray:
    """[b, s] int32 document ids for documents of the given lengths (the last one is cut at s)."""
    ids = np.concatenate([np.full(length, i, np.int32) for i, length in enumerate(lengths)])
    if ids.size < s:
        ids = np.concatenate([ids, np.full(s - ids.size, len(lengths), np.int32)])
    return np.broadcast_to(ids[:s], (b, s)).copy()


def csa_inputs(seed: int, *, b: int, s: int, h: int, d: int, n: int, k: int,
               dtype=jnp.float32, segments: list[int] | None = None):
    """Random (q, kv, compressed, topk_idx, sink, segment_ids) for the CSA core."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    kv = jax.random.normal(ks[1], (b, s, d), jnp.float32).astype(dtype)
    comp = jax.random.normal(ks[2], (b, n, d), jnp.float32).astype(dtype)
    sink = jax.random.normal(ks[3], (h,), jnp.float32)
    idx = jnp.asarray(adversarial_topk(seed, b, s, k, n))
    seg = None if segments is None else jnp.asarray(packed_segment_ids(b, s, segments))
    return q, kv, comp, idx, sink, seg


def assert_close(name: str, got, want, tol: float):
    """Max abs error relative to max(1, max |want|), with the name in the failure message."""
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))
    assert err <= tol, f"{name}: relative max error {err:.3g} > {tol}"


# ------------------------------------------------------------------------------ environment

def interpret_default() -> bool:
    """What `interpret=None` resolves to here (True when the target platform is CPU)."""
    return registry.resolve_interpret(None)


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def has_tpu() -> bool:
    try:
        return any(d.platform == "tpu" for d in jax.devices())
    except RuntimeError:
        return False


if pytest is not None:
    requires_gpu = pytest.mark.skipif(not has_gpu(), reason="needs a GPU backend (compiled Pallas "
                                      "Triton kernels); run tools/gpu_check.sh on a GPU machine")
    requires_libtpu = pytest.mark.skipif(not compat.has_libtpu(), reason="libtpu is not installed "
                                         "(pip install the libtpu pin of requirements.txt) so "
                                         "TPU ahead-of-time compilation is unavailable")


# ------------------------------------------------------------------------ TPU AOT from a CPU

@contextlib.contextmanager
def tpu_aot(topology: str = "v5e:2x2"):
    """Context for compiling TPU programs on a CPU host: yields `shaped(shape, dtype)` that
    builds a ShapeDtypeStruct placed on the topology's first device. Use as
        with tpu_aot("v5p:2x2x1") as shaped:
            jax.jit(f).lower(shaped((8, 128), jnp.float32)).compile()
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    topo = topologies.get_topology_desc(topology, "tpu")
    dev = topo.devices[0]
    mesh = jax.sharding.Mesh(np.array([dev]), ("x",))
    sharding = jax.sharding.SingleDeviceSharding(dev)

    def shaped(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    # Pallas TPU lowering asks which chip it targets: the abstract mesh carries the device kind.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield shaped
