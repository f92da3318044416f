"""Context parallelism: the sequence split over `context`, parameters FSDP over fsdp x context.

For long sequences: each device holds S/context queries of a row; keys/values and the
compressed entries are all-gathered along the sequence (the compressor's overlapping windows
need the previous shard's last tokens, which the gather provides). Activation memory per device
falls with the context size; the gathers grow with the sequence.
"""
from configs.sharding import common

FSDP = ("fsdp", "context")


def get_config(arg=None):
    c = common.preset(
        "cp", __doc__.strip().splitlines()[0],
        ici={"fsdp": -1, "context": 4},
        rules=common.fsdp_param_rules(fsdp=FSDP)
        + common.activation_rules(batch=("data", "fsdp"), length=("context",)))
    return common.apply_overrides(c, arg)
