"""Model config read from a Hugging Face DeepSeek-V4 config.json.

    --config=configs/hf.py:/data/DeepSeek-V4-Flash            (a directory holding config.json)
    --config=configs/hf.py:/data/DeepSeek-V4-Flash/config.json

The mapping (compress_ratios / layer_types, rope scaling, expert counts, hash layers, ...) and its
errors for fields this model cannot represent are in `sparse_lm/convert/hf_config.py`.
"""
import json
import os

import ml_collections

from sparse_lm.convert.hf_config import from_hf_config
from sparse_lm.presets import model_config_dict


def get_config(path: str = "") -> ml_collections.ConfigDict:
    if not path:
        raise ValueError("configs/hf.py needs a path: --config=configs/hf.py:/path/to/config.json "
                         "(or the checkpoint directory)")
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        cfg = from_hf_config(json.load(f))
    return ml_collections.ConfigDict({"model": model_config_dict(cfg.to_dict())})
