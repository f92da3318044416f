"""Golden PartitionSpec dumps: what every preset does to every parameter kind.

    python -m tests.sharding.golden_specs          # rewrite tests/sharding/golden/*.json

A dump maps each parameter path (layer indices folded to *) to "shape -> PartitionSpec" for a
preset on a device count, resolved from the mesh sizes alone (no devices needed). The test
compares the current resolution with the checked-in files, so any change to the rules, the
presets or the model's logical names shows up as a reviewed diff of these files.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
CASES = [("tiny", 8), ("v4_flash", 64), ("v4_flash", 256)]


@functools.cache
def abstract_params(model: str):
    from flax import nnx

    from configs import model_presets
    from sparse_lm.config import ModelConfig
    from sparse_lm.model import build_model
    cfg = ModelConfig.from_dict(getattr(model_presets, model)())
    _, params, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param, ...)
    return params


def dump(preset_name: str, model: str, devices: int) -> dict:
    from sparse_lm.sharding import partition
    from sparse_lm.sharding.mesh import resolve_axis_sizes
    from sparse_lm.sharding.presets import load_preset
    preset = load_preset(preset_name)
    sizes = resolve_axis_sizes(preset.ici, devices)
    return {"preset": preset_name, "model": model, "devices": devices, "mesh": sizes,
            "specs": partition.spec_dump(abstract_params(model), sizes, preset.rules)}


def path(preset_name: str, model: str, devices: int) -> Path:
    return GOLDEN / f"{preset_name}__{model}__{devices}.json"


def main():
    from sparse_lm.sharding.presets import PRESETS
    GOLDEN.mkdir(exist_ok=True)
    for model, n in CASES:
        for p in PRESETS:
            path(p, model, n).write_text(json.dumps(dump(p, model, n), indent=1) + "\n")
            print("wrote", path(p, model, n))


if __name__ == "__main__":
    main()
