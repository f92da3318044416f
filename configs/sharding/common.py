"""Shared pieces of the sharding preset files.

A preset is a ConfigDict with
  name, description   what it is and when to use it
  ici                 mesh axis sizes inside a slice ({data, fsdp, tensor, expert, context}, one -1 = fill)
  dcn                 mesh axis sizes across slices (multi-slice; all 1 on a single slice)
  rules               logical axis rules: (logical name, mesh axes) pairs
  moe_dispatch        "" (keep the model's `moe_dispatch`) or a dispatcher to use with this preset
  moe_capacity_factor < 0 (keep the model's) or the expert-parallel capacity factor (0 = no drop)

`get_config(arg)` takes overrides "axis=N,dcn_axis=N,moe_dispatch=NAME,moe_capacity_factor=F", e.g.
`fsdp_ep:expert=16` or `configs/sharding/fsdp_tp.py:tensor=8`.
"""
import ml_collections

AXES = ("data", "fsdp", "tensor", "expert", "context")


def activation_rules(batch, length=(), tensor=()):
    """Rules for activation names: batch over `batch` axes, queries' length over `length`."""
    return [
        ("activation_batch", tuple(batch)),
        ("activation_length", tuple(length)),
        ("activation_kv_length", ()),           # keys/values are all-gathered along the sequence
        ("activation_embed", ()),
        ("activation_heads", tuple(tensor)),
        ("activation_kv", ()),
        ("activation_hc", ()),
        ("activation_mlp", tuple(tensor)),
        ("activation_exp", ("expert",)),
        ("activation_vocab", tuple(tensor)),
        ("activation_tokens", tuple(batch) + tuple(length)),
    ]


def fsdp_param_rules(fsdp, tensor=()):
    """Parameter rules. Tensor-parallel names (heads, output groups, MLP, vocab) prefer `tensor`;
    every name may then take the `fsdp` axes and, as a last resort, the tensor axes too (pure
    storage sharding: parameters and optimizer state are never replicated where they can be
    split). Preferences resolve per array in passes (see sparse_lm/sharding/rules.py)."""
    t, f = tuple(tensor), tuple(fsdp)
    tp = t + f                      # tensor first, then fsdp
    fs = f + t                      # fsdp first, then tensor as storage
    return [
        ("vocab", tp),
        ("embed", fs),
        ("embed_out", tp),
        ("q_lora", fs),
        ("heads", tp),
        ("kv", fs),
        ("o_groups", t),
        ("o_lora", tp),
        ("index_heads", tp),
        ("exp", fs),
        ("mlp", tp),
        ("hc_embed", fs),
        ("layers", ()),
    ]


def preset(name, description, ici, rules, *, dcn=None, moe_dispatch=""):
    c = ml_collections.ConfigDict()
    c.name = name
    c.description = description
    c.ici = ml_collections.ConfigDict({a: int(ici.get(a, 1)) for a in AXES})
    c.dcn = ml_collections.ConfigDict({a: int((dcn or {"data": -1}).get(a, 1)) for a in AXES})
    c.rules = [(n, list(axes)) for n, axes in rules]
    c.moe_dispatch = moe_dispatch
    c.moe_capacity_factor = -1.0          # < 0: keep the model's moe_capacity_factor
    return c


def apply_overrides(c, arg):
    """'tensor=8,dcn_data=2,moe_dispatch=a2a_padded' -> c with those fields set."""
    if not arg:
        return c
    for item in str(arg).split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"sharding preset override {item!r} must look like axis=N, "
                             f"dcn_axis=N or moe_dispatch=NAME (axes: {AXES})")
        k, v = (s.strip() for s in item.split("=", 1))
        if k == "moe_dispatch":
            c.moe_dispatch = v
        elif k == "moe_capacity_factor":
            c.moe_capacity_factor = float(v)
        elif k in AXES:
            c.ici[k] = int(v)
        elif k.startswith("dcn_") and k[4:] in AXES:
            c.dcn[k[4:]] = int(v)
        else:
            raise ValueError(f"sharding preset override {k!r} is unknown; allowed: {list(AXES)}, "
                             f"{['dcn_' + a for a in AXES]}, moe_dispatch, moe_capacity_factor")
    return c
