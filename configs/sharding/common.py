"""Shared pieces of the sharding preset files: defined in `sparse_lm/sharding/presets.py`.

Re-exported here for preset files of one's own (`load_preset("path/to/file.py:arg")`):

    from configs.sharding import common

    def get_config(arg=None):
        c = common.preset("mine", "what it is", ici={"fsdp": -1},
                          rules=common.fsdp_param_rules(fsdp=("fsdp",))
                          + common.activation_rules(batch=("data", "fsdp")))
        return common.apply_overrides(c, arg)
"""
from sparse_lm.sharding.mesh import AXES  # noqa: F401
from sparse_lm.sharding.presets import (activation_rules, apply_overrides,  # noqa: F401
                                        fsdp_param_rules, preset)
