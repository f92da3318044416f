"""Checkpoints of a training run with orbax `CheckpointManager`.

One checkpoint = step directory `<workdir>/checkpoints/<step>/` with three items:
  state  the TrainState pytree (parameters, router biases / hash tables, optimizer state, step)
  data   the data iterator position of every process (JSON)
  meta   the model config and run facts (JSON), checked on resume

Saves are asynchronous (training continues while the arrays are written) and atomic: orbax
writes into a temporary directory and renames it when complete, and only finalized steps are
listed, so a crash mid-save never leaves a corrupt latest checkpoint. `keep` bounds how many
are kept. Resuming from a workdir whose checkpoints belong to another model architecture is an
error that names the differing fields.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from sparse_lm.config import ModelConfig

# Model fields that change how the model executes, not what it is: a run may resume with others.
EXECUTION_FIELDS = frozenset({"dtype", "param_dtype", "attention_impl", "remat", "moe_impl",
                              "moe_dispatch", "moe_capacity_factor"})


def _default(field: str):
    for f in dataclasses.fields(ModelConfig):
        if f.name == field:
            return f.default
    return "<no default>"


class CheckpointError(RuntimeError):
    """A workdir's checkpoints cannot be used by this run; the message says why."""


def model_config_diff(saved: dict, current: dict) -> list[str]:
    """Architecture fields that differ, as 'field: saved -> current' lines."""
    out = []
    for k in sorted(set(saved) | set(current)):
        if k in EXECUTION_FIELDS:
            continue
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, list):
            a = tuple(a)
        if isinstance(b, list):
            b = tuple(b)
        # A field added (or removed) since the checkpoint is fine at its default value.
        if a == "<absent>" and b == _default(k) or b == "<absent>" and a == _default(k):
            continue
        if a != b:
            out.append(f"model.{k}: {a!r} (checkpoint) vs {b!r} (this run)")
    return out


def _json_ready(x):
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints={keep} is invalid: must be >= 1")
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        res = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return res["meta"]

    def check_compatible(self, model_config: dict, step: int | None = None) -> None:
        """Raise CheckpointError if the checkpoint holds a different model architecture."""
        saved = self.read_meta(step).get("model", {})
        diff = model_config_diff(saved, _json_ready(model_config))
        if diff:
            raise CheckpointError(
                f"the workdir {self.directory.parent} holds checkpoints of a different model "
                f"(step {self.latest_step() if step is None else step}); differing fields:\n  "
                + "\n  ".join(diff)
                + "\nUse another --workdir, or the checkpoint's model config.")

    def save(self, step: int, state: Any, data_state: Any, meta: dict, *, force: bool = False) -> bool:
        """Start an (async) save of `state` at `step`; returns whether a save was started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(_json_ready(data_state)),
                                  meta=ocp.args.JsonSave(_json_ready(meta)))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of `step`; abstract_state gives structure, dtypes and
        shardings (ShapeDtypeStructs with `.sharding` place the arrays)."""
        res = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return res["state"], res["data"], res["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def with_sharding(abstract: Any, sharding) -> Any:
    """ShapeDtypeStructs of `abstract` placed with `sharding` (e.g. replicated)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
