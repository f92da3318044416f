"""Named sharding presets: `configs/sharding/<name>.py` files resolved to a `ShardingPreset`.

    preset = load_preset("fsdp_tp")                 # a named preset
    preset = load_preset("fsdp_ep:expert=16")       # with overrides (get_config's argument)
    preset = load_preset("configs/sharding/cp.py:context=8")   # any preset file
    mesh = preset.make_mesh()                       # over jax.devices()
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

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
        module = importlib.import_module(f"configs.sharding.{target}")
    try:
        c = module.get_config(arg or None)
    except ValueError as e:
        raise ShardingError(f"sharding preset {spec!r}: {e}") from None
    return from_config(c)
