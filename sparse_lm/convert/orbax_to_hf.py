"""Export a sparse_lm checkpoint (written by hf_to_orbax) as a Hugging Face DeepSeek-V4 checkpoint.

    python -m sparse_lm.convert.orbax_to_hf --ckpt CKPT --out DIR \
        [--format=transformers|official] [--dtype=keep|bfloat16|float32] [--max-shard-gb=5]
        [--drop-mtp]

Writes config.json (layer_types, compress_rates, rope_parameters, ... as transformers 5.23.0
reads them, plus compress_ratios) and safetensors shards with model.safetensors.index.json.
--format=transformers uses transformers' tensor names (loadable by `DeepseekV4ForCausalLM`, which
ignores the `mtp.0.*` tensors); --format=official uses the release names (per-expert w1/w2/w3).
Tensors are written unquantised. The checkpoint is read one tensor group at a time (an orbax
partial restore), so the host holds at most one group (e.g. one layer-stack of expert weights)
plus the shard being written. Nothing is left at --out unless the export succeeded.
config.json keeps `num_nextn_predict_layers` (the MTP block is written when the model has it;
a checkpoint converted from transformers, which declares MTP without weights, keeps the source's
declaration); --drop-mtp writes no MTP tensors and 0.
"""
from __future__ import annotations

import os

from absl import app, flags

from sparse_lm.convert.core import USER_ERRORS, CheckpointLeaves, atomic_directory, write_hf
from sparse_lm.train.config_check import exit_with, run_main


def export(ckpt: str, out: str, *, scheme: str = "transformers", dtype=None,
           max_shard_bytes: int = 5 * 2**30, progress: bool = True,
           drop_mtp: bool = False) -> list[str]:
    """Library form of the CLI: our checkpoint -> HF directory at `out` (atomic).

    config.json describes what is written: with MTP weights, `num_nextn_predict_layers` =
    mtp_depth and the `mtp.0.*` tensors; a checkpoint converted from a transformers directory
    (which declares MTP layers but holds no MTP weights) keeps the source's declaration;
    drop_mtp=True writes no MTP tensors and `num_nextn_predict_layers: 0`.
    """
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} already exists; remove it or choose another path")
    leaves = CheckpointLeaves(ckpt)        # reads one tensor group at a time
    declared = leaves.source.get("hf_num_nextn_predict_layers")
    files = []
    try:
        atomic_directory(out, lambda tmp: files.extend(
            write_hf(leaves, leaves.cfg, tmp, scheme=scheme, dtype=dtype,
                     max_shard_bytes=max_shard_bytes, progress=progress, drop_mtp=drop_mtp,
                     declared_mtp=declared)))
    finally:
        leaves.close()
    return files


def define_flags():
    """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
    global _CKPT, _OUT, _FORMAT, _DTYPE, _SHARD, _QUIET, _DROP_MTP
    _CKPT = flags.DEFINE_string("ckpt", None, "sparse_lm checkpoint directory (from hf_to_orbax)")
    _OUT = flags.DEFINE_string("out", None, "output Hugging Face directory (must not exist)")
    _FORMAT = flags.DEFINE_enum("format", "transformers", ["transformers", "official"],
                                "tensor naming scheme")
    _DTYPE = flags.DEFINE_enum("dtype", "keep", ["keep", "bfloat16", "float32"], "tensor dtype")
    _SHARD = flags.DEFINE_float("max-shard-gb", 5.0, "maximum shard size in GiB")
    _QUIET = flags.DEFINE_bool("quiet", False, "no progress bar")
    _DROP_MTP = flags.DEFINE_bool("drop-mtp", False, "write no MTP tensors and "
                                  "num_nextn_predict_layers: 0 (default: keep the MTP block)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not _CKPT.value or not _OUT.value:
        raise app.UsageError("--ckpt and --out are required")
    try:
        files = export(_CKPT.value, _OUT.value, scheme=_FORMAT.value,
                       dtype=None if _DTYPE.value == "keep" else _DTYPE.value,
                       max_shard_bytes=int(_SHARD.value * 2**30), progress=not _QUIET.value,
                       drop_mtp=_DROP_MTP.value)
    except USER_ERRORS as e:     # the message names the file/tensor/field; no traceback needed
        exit_with(e)
    print(f"wrote {_OUT.value}: config.json + {len(files)} safetensors file(s)")


if __name__ == "__main__":
    define_flags()
    run_main(main, config_flag=None)
