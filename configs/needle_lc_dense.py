"""The dense arm of configs/needle_lc.py: the same `lc_small` with every layer a full causal
attention over the 512-byte row (`sparse_lm.inference.dense.full_attention_config`: window-only
layers, window = seq_len), trained on the same data with the same two-stage curriculum (the
commands in configs/needle_lc.py's docstring with this config, less the sparse_start_step
overrides).
"""
import ml_collections

from configs import needle_lc
from sparse_lm.config import ModelConfig
from sparse_lm.inference.dense import full_attention_config
from sparse_lm.presets import model_config_dict


def get_config() -> ml_collections.ConfigDict:
    c = needle_lc.get_config()
    dense = full_attention_config(ModelConfig.from_dict(c.model), window=needle_lc.SEQ_LEN)
    c.model = model_config_dict(dense.to_dict())
    c.train.sparse_start_step = 0
    return c
