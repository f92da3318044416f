"""Fully sharded data parallelism (ZeRO-3): parameters and optimizer state sharded over `fsdp`.

Every device computes on its own rows; each weight is all-gathered before use and its gradient
reduce-scattered. Memory for parameters/optimizer falls as 1/devices; communication per step is
~3x the parameter bytes (two gathers, one reduce-scatter), independent of the batch.
"""
from configs.sharding import common


def get_config(arg=None):
    c = common.preset(
        "fsdp", __doc__.strip().splitlines()[0],
        ici={"fsdp": -1},
        rules=common.fsdp_param_rules(fsdp=("fsdp",))
        + common.activation_rules(batch=("data", "fsdp")))
    return common.apply_overrides(c, arg)
