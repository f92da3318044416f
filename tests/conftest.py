"""Test-wide setup: CPU only, deterministic, shared tiny configs and models."""
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from configs import model_presets  # noqa: E402
from sparse_lm.config import ModelConfig  # noqa: E402


def tiny_config(**overrides) -> ModelConfig:
    """The `tiny` preset (every layer kind, hash + score routing, MTP) with overrides."""
    return ModelConfig.from_dict(model_presets.tiny()).replace(**overrides)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return tiny_config()


def subprocess_env(cache_dir) -> dict:
    """Environment for entry points run as subprocesses in tests: CPU, a persistent compilation
    cache in `cache_dir` shared by the test's runs, unbuffered output, the checkout on the path."""
    root = Path(__file__).resolve().parents[1]
    e = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(root) + os.pathsep + e.get("PYTHONPATH", "")
    return e
