"""Test-wide setup: CPU only, deterministic, shared tiny configs and models."""
import os

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
