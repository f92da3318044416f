"""sparse-lm: DeepSeek-V4-style sparse-attention language models in JAX/Flax NNX."""
from sparse_lm.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
