"""Named sharding presets, defined here, resolved to a `ShardingPreset`.

    preset = load_preset("fsdp_tp")                 # a named preset
    preset = load_preset("fsdp_ep:expert=16")       # with overrides (axis=N, dcn_axis=N, ...)
    preset = load_preset("path/to/my_preset.py:context=8")   # any preset file (get_config(arg))
    mesh = preset.make_mesh()                       # over jax.devices()

A preset is a ConfigDict with
  name, description   what it is and when to use it
  ici                 mesh axis sizes inside a slice ({data, fsdp, tensor, expert, context}, one -1 = fill)
  dcn                 mesh axis sizes across slices (multi-slice; all 1 on a single slice)
  rules               logical axis rules: (logical name, mesh axes) pairs
  moe_dispatch        "" (keep the model's `moe_dispatch`) or a dispatcher to use with this preset
  moe_capacity_factor < 0 (keep the model's) or the expert-parallel capacity factor (0 = no drop)

`preset_config(name, arg)` builds the ConfigDict of a named preset; `arg` takes overrides
"axis=N,dcn_axis=N,moe_dispatch=NAME,moe_capacity_factor=F". The files in configs/sharding/ are
thin `get_config(arg)` wrappers of it, for `--config`-style use.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from sparse_lm.sharding import mesh as mesh_lib
from sparse_lm.sharding.mesh import AXES, ShardingError
from sparse_lm.sharding.rules import Rules, normalize_rules, rules_table

PRESETS = ("dp", "fsdp", "fsdp_tp", "fsdp_ep", "ep_as_cp", "cp")
MOE_DISPATCH = ("local", "a2a_padded", "ragged_a2a")


@dataclasses.dataclass(frozen=True)
class ShardingPreset:
    name: str
    description: str
    ici: Mapping[str, int]
    dcn: Mapping[str, int]
    rules: Rules
    moe_dispatch: str = ""           # "" = keep the model config's choice
    moe_capacity_factor: float = -1.0   # < 0 = keep the model config's

    def __post_init__(self):
        for what, sizes in (("ici", self.ici), ("dcn", self.dcn)):
            unknown = sorted(set(sizes) - set(AXES))
            if unknown:
                raise ShardingError(f"preset {self.name!r}: {what} has unknown axis name(s) "
                                    f"{unknown}; valid axes: {list(AXES)}")
        if self.moe_dispatch not in ("",) + MOE_DISPATCH:
            raise ShardingError(f"preset {self.name!r}: moe_dispatch={self.moe_dispatch!r} is "
                                f"invalid: allowed values {('',) + MOE_DISPATCH}")

    def make_mesh(self, devices: Sequence | None = None, *, slices: int | None = None):
        return mesh_lib.make_mesh(self.ici, self.dcn, devices, slices=slices)

    def with_moe_dispatch(self, model_cfg):
        """The model config with this preset's dispatcher (and capacity) applied."""
        kw = {}
        if self.moe_dispatch and self.moe_dispatch != model_cfg.moe_dispatch:
            kw["moe_dispatch"] = self.moe_dispatch
        if self.moe_capacity_factor >= 0 and self.moe_capacity_factor != model_cfg.moe_capacity_factor:
            kw["moe_capacity_factor"] = self.moe_capacity_factor
        return model_cfg.replace(**kw) if kw else model_cfg

    def metadata(self, mesh=None) -> dict[str, Any]:
        """What a run records: the preset, its sizes and the rules (resolved on `mesh` if given)."""
        sizes = mesh_lib.axis_sizes(mesh) if mesh is not None else None
        return {"name": self.name, "description": self.description, "ici": dict(self.ici),
                "dcn": dict(self.dcn), "mesh": sizes, "moe_dispatch": self.moe_dispatch,
                "moe_capacity_factor": self.moe_capacity_factor,
                "rules": rules_table(self.rules, sizes)}


def from_config(c) -> ShardingPreset:
    """ShardingPreset from a preset ConfigDict (or a plain dict with the same fields)."""
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    missing = sorted({"name", "ici", "rules"} - set(d))
    if missing:
        raise ShardingError(f"sharding preset config is missing field(s) {missing}")
    return ShardingPreset(name=str(d["name"]), description=str(d.get("description", "")),
                          ici={k: int(v) for k, v in dict(d["ici"]).items()},
                          dcn={k: int(v) for k, v in dict(d.get("dcn") or {}).items()},
                          rules=normalize_rules(d["rules"]),
                          moe_dispatch=str(d.get("moe_dispatch", "") or ""),
                          moe_capacity_factor=float(d.get("moe_capacity_factor", -1.0)))


def load_preset(spec: str | Any) -> ShardingPreset:
    """`name[:overrides]`, `path/to/file.py[:overrides]`, a ConfigDict or a ShardingPreset."""
    if isinstance(spec, ShardingPreset):
        return spec
    if not isinstance(spec, str):
        return from_config(spec)
    target, _, arg = spec.partition(":")
    target = target.strip()
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ShardingError(f"sharding preset file {target} does not exist; named presets: "
                                f"{list(PRESETS)}")
        mod_spec = importlib.util.spec_from_file_location(f"_sharding_preset_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        if target not in PRESETS:
            raise ShardingError(f"unknown sharding preset {target!r}; valid presets: "
                                f"{list(PRESETS)} (or a path to a preset .py file)")
        module = None
    try:
        c = module.get_config(arg or None) if module is not None else preset_config(target, arg)
    except ValueError as e:
        raise ShardingError(f"sharding preset {spec!r}: {e}") from None
    return from_config(c)


# ---------------------------------------------------------------------------- preset configs
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
    """A preset ConfigDict (every axis present in ici and dcn; dcn defaults to data=-1)."""
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


def _first_line(fn) -> str:
    return fn.__doc__.strip().splitlines()[0]


def dp():
    """Pure data parallelism: every device holds every parameter and optimizer state.

    The simplest and, while the model fits, the fastest on one host: one all-reduce of the
    gradients per step. It cannot hold a large model: per device it needs the whole parameter +
    optimizer state.
    """
    return preset("dp", _first_line(dp), ici={"data": -1},
                  rules=activation_rules(batch=("data",)))


def fsdp():
    """Fully sharded data parallelism (ZeRO-3): parameters and optimizer state sharded over `fsdp`.

    Every device computes on its own rows; each weight is all-gathered before use and its
    gradient reduce-scattered. Memory for parameters/optimizer falls as 1/devices; communication
    per step is ~3x the parameter bytes (two gathers, one reduce-scatter), independent of the batch.
    """
    return preset("fsdp", _first_line(fsdp), ici={"fsdp": -1},
                  rules=fsdp_param_rules(fsdp=("fsdp",)) + activation_rules(batch=("data", "fsdp")))


def fsdp_tp():
    """FSDP plus tensor parallelism: query heads, output groups, MLP and vocab split over `tensor`.

    Tensor parallelism cuts the per-device activation memory and the FSDP gather size of the
    weights by the tensor size, at the price of activation all-reduces / all-gathers inside every
    layer (keep `tensor` inside fast links: a host or an ICI ring). KV is one shared head (MQA),
    so it stays replicated over `tensor`.
    """
    return preset("fsdp_tp", _first_line(fsdp_tp), ici={"fsdp": -1, "tensor": 4},
                  rules=fsdp_param_rules(fsdp=("fsdp",), tensor=("tensor",))
                  + activation_rules(batch=("data", "fsdp"), tensor=("tensor",)))


def _expert_param_rules(fsdp_axes):
    """FSDP rules over `fsdp_axes`, with the routed experts split over `expert` alone."""
    return [(n, ("expert",) if n == "exp" else axes)
            for n, axes in fsdp_param_rules(fsdp=fsdp_axes)]


def fsdp_ep():
    """FSDP plus expert parallelism: routed experts split over `expert`, tokens sent to their experts.

    Each device keeps E/expert routed experts whole (no weight gathers for them); the dense part
    is FSDP-sharded over fsdp x expert, and the batch is split over every axis. Tokens travel with
    an all-to-all to the devices that own their experts and back (moe_dispatch).
    """
    return preset("fsdp_ep", _first_line(fsdp_ep), ici={"fsdp": -1, "expert": 8},
                  rules=_expert_param_rules(("fsdp", "expert"))
                  + activation_rules(batch=("data", "fsdp", "expert")),
                  moe_dispatch="ragged_a2a")


def ep_as_cp():
    """Expert axis reused as context parallelism: attention splits the sequence over `expert`.

    Same parameter layout as fsdp_ep, but outside the MoE the `expert` axis splits the sequence
    (queries) instead of the batch, so long sequences with few rows per device still use every
    device; keys/values (and the compressed entries) are all-gathered along the sequence.
    """
    return preset("ep_as_cp", _first_line(ep_as_cp), ici={"fsdp": -1, "expert": 8},
                  rules=_expert_param_rules(("fsdp", "expert"))
                  + activation_rules(batch=("data", "fsdp"), length=("expert",)),
                  moe_dispatch="ragged_a2a")


def cp():
    """Context parallelism: the sequence split over `context`, parameters FSDP over fsdp x context.

    For long sequences: each device holds S/context queries of a row; keys/values and the
    compressed entries are all-gathered along the sequence (the compressor's overlapping windows
    need the previous shard's last tokens, which the gather provides). Activation memory per
    device falls with the context size; the gathers grow with the sequence.
    """
    return preset("cp", _first_line(cp), ici={"fsdp": -1, "context": 4},
                  rules=fsdp_param_rules(fsdp=("fsdp", "context"))
                  + activation_rules(batch=("data", "fsdp"), length=("context",)))


BUILDERS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    "dp": dp, "fsdp": fsdp, "fsdp_tp": fsdp_tp, "fsdp_ep": fsdp_ep, "ep_as_cp": ep_as_cp, "cp": cp}
assert tuple(BUILDERS) == PRESETS


def preset_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The ConfigDict of the named preset with `arg`'s overrides applied."""
    if name not in BUILDERS:
        raise ShardingError(f"unknown sharding preset {name!r}; valid presets: {list(PRESETS)}")
    return apply_overrides(BUILDERS[name](), arg)
