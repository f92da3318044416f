"""NNX modules: parameters with logical axis names, calling the functional core in `sparse_lm.ops`."""
from sparse_lm.model.transformer import DeepseekV4, ModelOutput, build_model

__all__ = ["DeepseekV4", "ModelOutput", "build_model"]
