"""Export a sparse_lm checkpoint as a Hugging Face DeepSeek-V4 checkpoint: a converter checkpoint
(written by hf_to_orbax) or any step of a training run's workdir.

    python -m sparse_lm.convert.orbax_to_hf --ckpt CKPT --out DIR [options]
    python -m sparse_lm.convert.orbax_to_hf --workdir RUN [--step N] --out DIR [options]
    options: [--format=transformers|official] [--dtype=keep|bfloat16|float32] [--max-shard-gb=5]
             [--drop-mtp] [--quiet]

Writes config.json (layer_types, compress_rates, rope_parameters, ... as transformers 5.23.0
reads them, plus compress_ratios) and safetensors shards with model.safetensors.index.json.
--format=transformers uses transformers' tensor names (loadable by `DeepseekV4ForCausalLM`, which
ignores the `mtp.0.*` tensors); --format=official uses the release names (per-expert w1/w2/w3).
Tensors are written unquantised. The checkpoint is read one tensor group at a time (an orbax
partial restore), so the host holds at most one group (e.g. one layer-stack of expert weights)
plus the shard being written; a training checkpoint's optimizer state is never read, and the
export runs on any number of devices whatever sharding the run trained with. Nothing is left at
--out unless the export succeeded.
config.json keeps `num_nextn_predict_layers` (the MTP block is written when the model has it;
a checkpoint converted from transformers, which declares MTP without weights, keeps the source's
declaration); --drop-mtp writes no MTP tensors and 0.

A training run (--workdir): the model config is the one stored with the checkpoint step (--step,
default the newest); the parameters and the buffers (router biases, hash tables) are exported.
When the run's config names a tokenizer (`data.tokenizer`, see sparse_lm/data), its
tokenizer.json (and tokenizer_config.json / special_tokens_map.json beside it) is copied too.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import app, flags

from sparse_lm.config import ModelConfig
from sparse_lm.convert.core import USER_ERRORS, CheckpointLeaves, atomic_directory, write_hf
from sparse_lm.train.checkpoint import Checkpointer, CheckpointError, UnreadableCheckpoint
from sparse_lm.train.config_check import exit_with, run_main
from sparse_lm.train.evaluation import config_from_workdir
from sparse_lm.train.loop import run_tokenizer

log = logging.getLogger(__name__)
# Files of a Hugging Face tokenizer directory copied beside tokenizer.json when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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
    return _write(leaves, out, scheme=scheme, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  progress=progress, drop_mtp=drop_mtp,
                  declared=leaves.source.get("hf_num_nextn_predict_layers"))


def _write(leaves, out, *, declared=None, extra_files=(), **kw) -> list[str]:
    files = []

    def write(tmp):
        files.extend(write_hf(leaves, leaves.cfg, tmp, declared_mtp=declared, **kw))
        for src in extra_files:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
    try:
        atomic_directory(out, write)
    finally:
        leaves.close()
    return files


class TrainingCheckpointLeaves(CheckpointLeaves):
    """`leaves(paths) -> arrays` of one step of a training run: the model's parameters and
    buffers read from the step's `state` item (TrainState: params / buffers / opt_state / step,
    each model variable stored as `<path>/value`), one group at a time; the optimizer state is
    not read. `cfg` is the model config saved with that step. It sets the attributes the base
    class reads (path, meta, ckptr, sharding) itself: the base's __init__ reads a converter
    checkpoint's model_config.json, which a training step does not have."""

    def __init__(self, workdir: str | os.PathLike, step: int | None = None):
        ckpt = Checkpointer(workdir, keep=1000, async_save=False)
        try:
            steps = ckpt.all_steps()
            if not steps:
                raise CheckpointError(f"no checkpoint in {ckpt.directory}: train first "
                                      f"(python -m experiments.train --workdir={workdir} ...)")
            if step is None:
                step = steps[-1]
            ckpt.check_step(step)               # lists the steps there are
            meta = ckpt.read_meta(step)
        finally:
            ckpt.close()
        self.step, self.step_dir = step, ckpt.step_dir(step)
        self.path = str(self.step_dir / "state")
        self.source = {}
        try:
            self.cfg = ModelConfig.from_dict(meta["model"])
        except (KeyError, TypeError, ValueError) as e:
            raise UnreadableCheckpoint(step, self.step_dir / "meta", e) from None
        try:
            self.meta = ocp.StandardCheckpointer().metadata(self.path).item_metadata
        except Exception as e:                  # noqa: BLE001 - damaged step, named below
            raise UnreadableCheckpoint(step, Path(self.path), e) from e
        self.ckptr = ocp.PyTreeCheckpointer()
        self.sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def _key(self, path: tuple) -> tuple:
        """('params' | 'buffers', *path as stored, 'value')."""
        for part in ("params", "buffers"):
            node, out = self.meta[part], [part]
            try:
                for k in path:
                    k = k if k in node else str(k)
                    out.append(k)
                    node = node[k]
                return (*out, "value") if "value" in node else tuple(out)
            except (KeyError, TypeError):
                continue
        raise UnreadableCheckpoint(self.step, Path(self.path), KeyError(
            f"model variable {'.'.join(map(str, path))} is neither a parameter nor a buffer of "
            f"the saved state"))

    def __call__(self, paths):
        try:
            return super().__call__(paths)
        except UnreadableCheckpoint:
            raise
        except Exception as e:                  # noqa: BLE001 - truncated / missing array files
            raise UnreadableCheckpoint(self.step, Path(self.path), e) from e


def run_tokenizer_files(workdir: str | os.PathLike) -> list[str]:
    """The tokenizer files of a training run: its data.tokenizer as the run resolves it
    (`loop.run_tokenizer`: the named tokenizer.json, else the copy in the workdir; checked
    against model.vocab_size) plus the tokenizer_config.json / special_tokens_map.json beside
    it; [] for the byte-level vocabulary ("bytes")."""
    tokenizer = run_tokenizer(config_from_workdir(workdir), workdir)
    path = getattr(tokenizer, "path", None)          # None: byte-level, no file
    if path is None:
        return []
    return [str(path)] + [str(path.parent / f) for f in TOKENIZER_FILES[1:]
                          if (path.parent / f).is_file()]


def export_run(workdir: str | os.PathLike, out: str, *, step: int | None = None,
               scheme: str = "transformers", dtype=None, max_shard_bytes: int = 5 * 2**30,
               progress: bool = True, drop_mtp: bool = False) -> list[str]:
    """A training run's checkpoint `step` (default the newest) -> HF directory at `out`
    (atomic): config.json, safetensors shards, the run's tokenizer files if it used one.
    Loadable by `load_hf(out)`, which then computes the logits of the training checkpoint."""
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} already exists; remove it or choose another path")
    if not Path(workdir).is_dir():
        raise FileNotFoundError(f"--workdir={workdir} does not exist: give the workdir of a "
                                f"training run (python -m experiments.train --workdir=...)")
    leaves = TrainingCheckpointLeaves(workdir, step)      # checkpoints first: the clearer error
    try:
        tokenizer = run_tokenizer_files(workdir)
    except BaseException:
        leaves.close()
        raise
    log.info("exporting step %d of %s (%s)", leaves.step, workdir,
             f"tokenizer {tokenizer[0]}" if tokenizer else "byte-level, no tokenizer")
    return _write(leaves, out, scheme=scheme, dtype=dtype, max_shard_bytes=max_shard_bytes,
                  progress=progress, drop_mtp=drop_mtp, extra_files=tokenizer)


def define_flags():
    """Command-line flags (defined only when run as a program, so the module imports cleanly)."""
    global _CKPT, _WORKDIR, _STEP, _OUT, _FORMAT, _DTYPE, _SHARD, _QUIET, _DROP_MTP
    _CKPT = flags.DEFINE_string("ckpt", None, "sparse_lm checkpoint directory (from hf_to_orbax)")
    _WORKDIR = flags.DEFINE_string("workdir", None, "training run directory (instead of --ckpt)")
    _STEP = flags.DEFINE_integer("step", None, "with --workdir: checkpoint step (default: newest)")
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
    if bool(_CKPT.value) == bool(_WORKDIR.value) or not _OUT.value:
        raise app.UsageError("--out and one of --ckpt (a converter checkpoint) or --workdir (a "
                             "training run) are required")
    if _STEP.value is not None and not _WORKDIR.value:
        raise app.UsageError("--step goes with --workdir (a converter checkpoint has one step)")
    kw = dict(scheme=_FORMAT.value, dtype=None if _DTYPE.value == "keep" else _DTYPE.value,
              max_shard_bytes=int(_SHARD.value * 2**30), progress=not _QUIET.value,
              drop_mtp=_DROP_MTP.value)
    try:
        if _WORKDIR.value:
            files = export_run(_WORKDIR.value, _OUT.value, step=_STEP.value, **kw)
        else:
            files = export(_CKPT.value, _OUT.value, **kw)
    except USER_ERRORS + (CheckpointError,) as e:  # the message names the file/tensor/field
        exit_with(e)
    tok = " + tokenizer" if os.path.exists(os.path.join(_OUT.value, "tokenizer.json")) else ""
    print(f"wrote {_OUT.value}: config.json + {len(files)} safetensors file(s){tok}")


if __name__ == "__main__":
    define_flags()
    run_main(main, config_flag=None)
