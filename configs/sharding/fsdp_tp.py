"""The `fsdp_tp` sharding preset (defined in sparse_lm/sharding/presets.py: `presets.fsdp_tp`)."""
from sparse_lm.sharding import presets


def get_config(arg=None):
    return presets.preset_config("fsdp_tp", arg)
