"""Test-wide setup: CPU only, deterministic, shared tiny configs and models."""
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU backend generates machine code with LLVM at -O0. Compiling dominates these tests
# (tiny shapes): -O0 cuts it by about a third, and the optimized HLO (fusion, SPMD partitioning:
# what tests read from compiled programs) is the same text as at the default level. Set in the
# environment so that the entry points and workers run in subprocesses inherit it.
_XLA_TEST_FLAG = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_TEST_FLAG}".strip()

import pytest  # noqa: E402

from configs import model_presets  # noqa: E402
from sparse_lm.config import ModelConfig  # noqa: E402


def tiny_config(**overrides) -> ModelConfig:
    """The `tiny` preset (every layer kind, hash + score routing, MTP) with overrides."""
    return ModelConfig.from_dict(model_presets.tiny()).replace(**overrides)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory) -> Path:
    """One persistent compilation cache for the entry points that tests run in subprocesses,
    shared by both pytest-xdist workers (their base temp dirs have a common parent), so that a
    program compiled by one test's subprocess (the tiny model's train step) is read by the
    others'. Safe to share: JAX writes an entry once, and an entry it cannot read (one being
    written by the other worker) is a warning and a compile, never a wrong program."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / "jax_cache"
    path.mkdir(exist_ok=True)
    return path


def subprocess_env(cache_dir) -> dict:
    """Environment for entry points run as subprocesses in tests: CPU, a persistent compilation
    cache in `cache_dir` shared by the test's runs, unbuffered output, the checkout on the path."""
    root = Path(__file__).resolve().parents[1]
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(root) + os.pathsep + e.get("PYTHONPATH", "")
    return e
