"""The `cp` sharding preset (defined in sparse_lm/sharding/presets.py: `presets.cp`)."""
from sparse_lm.sharding import presets


def get_config(arg=None):
    return presets.preset_config("cp", arg)
