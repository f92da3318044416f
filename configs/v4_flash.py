"""`v4_flash` model: see sparse_lm/presets.py."""
import ml_collections

from configs import model_presets


def get_config() -> ml_collections.ConfigDict:
    # The full-size model as it trains on accelerators (what compare_sharding compiles): bf16
    # compute over fp32 parameters, every layer rematerialized.
    model = model_presets.v4_flash()
    model.update(dict(dtype="bfloat16", remat="full"))
    return ml_collections.ConfigDict({"model": model})
