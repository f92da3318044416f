"""Convert a Hugging Face DeepSeek-V4 checkpoint into a sparse_lm (orbax) checkpoint.

    python -m sparse_lm.convert.hf_to_orbax --hf-dir DIR --out CKPT \
        [--config=configs/v4_flash.py [--config.model.FIELD=VALUE ...]] \
        [--dtype=bfloat16|float32|keep] [--mesh=expert=8,fsdp=-1 --rules=exp:expert,embed:fsdp]
        [--skip-unused]

DIR holds config.json and *.safetensors (with model.safetensors.index.json when sharded), in
any naming scheme of sparse_lm.convert.mapping.SCHEMES (transformers' state-dict names, what
transformers' save_pretrained writes, the official release names), plain, FP8 or FP4. --config is optional when
config.json is present; given both, they must agree (MTP aside: transformers checkpoints carry no
MTP weights). --dtype=keep keeps each tensor's stored dtype (FP8/FP4 -> bfloat16). With --mesh,
every array is created directly on its target sharding and each process reads only the layers
and experts of its own shards. Nothing is left at --out unless the conversion succeeded.
"""
from __future__ import annotations

import logging
import os
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from sparse_lm.config import ModelConfig
from sparse_lm.convert.core import USER_ERRORS, check_hf, load_state, save_checkpoint
from sparse_lm.convert.hf_config import read_hf_config
from sparse_lm.train.config_check import exit_with, run_main

def parse_mesh(spec: str | None):
    """'a=2,b=-1' -> jax Mesh over all devices (Auto axes), or None."""
    if not spec:
        return None
    names, sizes = [], []
    for item in spec.split(","):
        if "=" not in item:
            raise ValueError(f"--mesh item {item!r} is invalid: expected axis=size")
        k, v = item.split("=", 1)
        names.append(k.strip())
        sizes.append(int(v))
    n = jax.device_count()
    if sizes.count(-1) > 1:
        raise ValueError(f"--mesh={spec!r}: at most one axis may be -1")
    known = 1
    for s in sizes:
        known *= s if s != -1 else 1
    sizes = [n // known if s == -1 else s for s in sizes]
    prod = 1
    for s in sizes:
        prod *= s
    if prod != n:
        raise ValueError(f"--mesh={spec!r} covers {prod} devices but {n} are available")
    return jax.make_mesh(tuple(sizes), tuple(names),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def parse_rules(spec: str | None) -> dict:
    rules = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        if ":" not in item:
            raise ValueError(f"--rules item {item!r} is invalid: expected logical:mesh_axis")
        k, v = item.split(":", 1)
        axes = tuple(a for a in v.split("+") if a)
        rules[k.strip()] = axes[0] if len(axes) == 1 else axes
    return rules


def convert(hf_dir: str, out: str, *, config: ModelConfig | None = None, dtype=None, mesh=None,
            rules=None, progress: bool = True, skip_unused: bool = False,
            allow_non_finite: bool = False) -> ModelConfig:
    """Library form of the CLI: HF directory -> our checkpoint at `out` (atomic).

    The checkpoint's source record keeps the naming scheme, the tensors skipped (only with
    skip_unused) and config.json's `num_nextn_predict_layers` (transformers checkpoints declare
    an MTP layer without its weights; the exporter writes the declaration back)."""
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} already exists; remove it or choose another path")
    t0 = time.time()
    report = check_hf(hf_dir, config=config, skip_unused=skip_unused)
    cfg, _, _, pure = load_state(hf_dir, config=config, dtype=dtype, mesh=mesh, rules=rules,
                                 progress=progress, skip_unused=skip_unused,
                                 allow_non_finite=allow_non_finite)
    source = {"hf_dir": os.path.abspath(hf_dir), "dtype": str(dtype or "keep"),
              "scheme": report.scheme, "skipped_tensors": report.skipped}
    if os.path.exists(os.path.join(hf_dir, "config.json")):
        declared = read_hf_config(hf_dir).get("num_nextn_predict_layers")
        if declared is not None:
            source["hf_num_nextn_predict_layers"] = int(declared)
    save_checkpoint(out, pure, cfg, source=source)
    logging.info("wrote %s in %.1fs", out, time.time() - t0)
    return cfg


def define_flags():
    """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
    global _HF_DIR, _OUT, _CONFIG, _DTYPE, _MESH, _RULES, _QUIET, _SKIP_UNUSED, _NON_FINITE
    _HF_DIR = flags.DEFINE_string("hf-dir", None, "Hugging Face checkpoint directory")
    _OUT = flags.DEFINE_string("out", None, "output checkpoint directory (must not exist)")
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "optional config file whose `model` field holds ModelConfig values",
        lock_config=True)
    _DTYPE = flags.DEFINE_enum("dtype", "keep", ["keep", "bfloat16", "float32"],
                               "parameter dtype; keep = as stored (FP8/FP4 dequantise to bfloat16)")
    _MESH = flags.DEFINE_string("mesh", None, "target mesh as axis=size pairs, e.g. "
                                "expert=8,fsdp=-1 (-1 = all remaining devices)")
    _RULES = flags.DEFINE_string("rules", None, "logical axis -> mesh axis rules, e.g. "
                                 "exp:expert,embed:fsdp (unlisted logical axes are replicated)")
    _QUIET = flags.DEFINE_bool("quiet", False, "no progress bar")
    _SKIP_UNUSED = flags.DEFINE_bool("skip-unused", False, "convert a checkpoint that also holds "
                                     "tensors this model does not use (they are listed and "
                                     "skipped); without it they are an error")
    _NON_FINITE = flags.DEFINE_bool("allow-non-finite", False, "keep NaN/inf weights (without "
                                    "it a tensor holding one is an error naming it)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _HF_DIR.value or not _OUT.value:
        raise app.UsageError("--hf-dir and --out are required")
    config = ModelConfig.from_dict(_CONFIG.value.model) if _CONFIG.value is not None else None
    dtype = None if _DTYPE.value == "keep" else _DTYPE.value
    try:
        cfg = convert(_HF_DIR.value, _OUT.value, config=config, dtype=dtype,
                      mesh=parse_mesh(_MESH.value), rules=parse_rules(_RULES.value),
                      progress=not _QUIET.value, skip_unused=_SKIP_UNUSED.value,
                      allow_non_finite=_NON_FINITE.value)
    except USER_ERRORS as e:     # the message names the file/tensor/field; no traceback needed
        exit_with(e)
    print(f"wrote {_OUT.value}: {cfg.num_layers} layers, mtp_depth={cfg.mtp_depth}, "
          f"dtype={cfg.dtype}")


if __name__ == "__main__":
    define_flags()
    run_main(main, config_flag="config")
