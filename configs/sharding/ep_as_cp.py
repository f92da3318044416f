"""Expert axis reused as context parallelism: attention splits the sequence over `expert`.

Same parameter layout as fsdp_ep, but outside the MoE the `expert` axis splits the sequence
(queries) instead of the batch, so long sequences with few rows per device still use every
device; keys/values (and the compressed entries) are all-gathered along the sequence.
"""
from configs.sharding import common

FSDP = ("fsdp", "expert")


def get_config(arg=None):
    rules = [(n, ("expert",) if n == "exp" else axes)
             for n, axes in common.fsdp_param_rules(fsdp=FSDP)]
    c = common.preset(
        "ep_as_cp", __doc__.strip().splitlines()[0],
        ici={"fsdp": -1, "expert": 8},
        rules=rules + common.activation_rules(batch=("data", "fsdp"), length=("expert",)),
        moe_dispatch="ragged_a2a")
    return common.apply_overrides(c, arg)
