"""`v4_pro` model: see sparse_lm/presets.py."""
import ml_collections

from configs import model_presets


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": model_presets.v4_pro()})
