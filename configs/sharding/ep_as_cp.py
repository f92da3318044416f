"""The `ep_as_cp` sharding preset (defined in sparse_lm/sharding/presets.py: `presets.ep_as_cp`)."""
from sparse_lm.sharding import presets


def get_config(arg=None):
    return presets.preset_config("ep_as_cp", arg)
