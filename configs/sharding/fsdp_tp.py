"""FSDP plus tensor parallelism: query heads, output groups, MLP and vocab split over `tensor`.

Tensor parallelism cuts the per-device activation memory and the FSDP gather size of the
weights by the tensor size, at the price of activation all-reduces / all-gathers inside every
layer (keep `tensor` inside fast links: a host or an ICI ring). KV is one shared head (MQA), so it
stays replicated over `tensor`.
"""
from configs.sharding import common


def get_config(arg=None):
    c = common.preset(
        "fsdp_tp", __doc__.strip().splitlines()[0],
        ici={"fsdp": -1, "tensor": 4},
        rules=common.fsdp_param_rules(fsdp=("fsdp",), tensor=("tensor",))
        + common.activation_rules(batch=("data", "fsdp"), tensor=("tensor",)))
    return common.apply_overrides(c, arg)
