"""`tiny` model: see configs/model_presets.py."""
import ml_collections

from configs import model_presets


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": model_presets.tiny()})
