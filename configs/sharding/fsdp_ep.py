"""FSDP plus expert parallelism: routed experts split over `expert`, tokens sent to their experts.

Each device keeps E/expert routed experts whole (no weight gathers for them); the dense part is
FSDP-sharded over fsdp x expert, and the batch is split over every axis. Tokens travel with an
all-to-all to the devices that own their experts and back (moe_dispatch).
"""
from configs.sharding import common

FSDP = ("fsdp", "expert")


def get_config(arg=None):
    rules = [(n, ("expert",) if n == "exp" else axes)
             for n, axes in common.fsdp_param_rules(fsdp=FSDP)]
    c = common.preset(
        "fsdp_ep", __doc__.strip().splitlines()[0],
        ici={"fsdp": -1, "expert": 8},
        rules=rules + common.activation_rules(batch=("data", "fsdp", "expert")),
        moe_dispatch="ragged_a2a")
    return common.apply_overrides(c, arg)
