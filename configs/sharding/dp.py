"""Pure data parallelism: every device holds every parameter and optimizer state.

The simplest and, while the model fits, the fastest on one host: one all-reduce of the gradients
per step. It cannot hold a large model: per device it needs the whole parameter + optimizer state.
"""
from configs.sharding import common


def get_config(arg=None):
    c = common.preset(
        "dp", __doc__.strip().splitlines()[0],
        ici={"data": -1},
        rules=common.activation_rules(batch=("data",)))
    return common.apply_overrides(c, arg)
