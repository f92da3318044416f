"""The `fsdp` sharding preset (defined in sparse_lm/sharding/presets.py: `presets.fsdp`)."""
from sparse_lm.sharding import presets


def get_config(arg=None):
    return presets.preset_config("fsdp", arg)
