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

A checkpoint damaged afterwards (a truncated or deleted file) is found when it is read:
`restore_newest_readable` names the step and the file in one line and falls back to the newest
step that reads (or restores exactly the step asked for); the damaged step directories can be
moved aside (`quarantine`, into <workdir>/checkpoints_unreadable/) so that the resumed run can
save that step again. Nothing is created in the workdir until the first save.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.convert.core import CONFIG_FILE as CONVERTED_CONFIG, restore_checkpoint

# Model fields that change how the model executes, not what it is: a run may resume with others
# (max_context is a serving limit: the weights do not depend on it).
EXECUTION_FIELDS = frozenset({"dtype", "param_dtype", "attention_impl", "remat", "moe_impl",
                              "moe_dispatch", "moe_capacity_factor", "max_context"})


def _default(field: str):
    for f in dataclasses.fields(ModelConfig):
        if f.name == field:
            return f.default
    return "<no default>"


class CheckpointError(RuntimeError):
    """A workdir's checkpoints cannot be used by this run; the message says why."""


def _damaged_file(step_dir: Path, error: BaseException) -> Path:
    """The file of a step directory that a read error points at: a path under `step_dir` named in
    the error (or its causes), else the smallest-by-expectation guess: an empty file, else the
    step directory itself."""
    seen, e = set(), error
    text = ""
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text += " " + str(e)
        e = e.__cause__ or e.__context__
    best = None
    root = str(step_dir)
    for tok in text.replace("'", " ").replace('"', " ").replace(",", " ").split():
        if root in tok:
            cand = Path(tok[tok.index(root):].rstrip(".:;)]"))
            if best is None or len(str(cand)) > len(str(best)):
                best = cand
    if best is not None and best != step_dir and best.exists():
        return best
    if step_dir.is_dir():
        for p in sorted(step_dir.rglob("*")):
            if not p.is_file() or p.name.endswith(".txt") or "ocdbt" in str(p.relative_to(step_dir)) \
                    or "/d/" in f"/{p.relative_to(step_dir).as_posix()}":
                continue
            try:
                json.loads(p.read_text())
            except (ValueError, OSError):
                return p
        for p in sorted(step_dir.rglob("*")):
            if p.is_file() and p.stat().st_size == 0:
                return p
    return best or step_dir


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint step that cannot be read (truncated, deleted or corrupt files)."""

    def __init__(self, step: int, path: Path, error: BaseException):
        self.step, self.error = step, error
        path = Path(path)
        self.path = _damaged_file(path, error) if path.is_dir() else path
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        if len(reason) > 240:
            reason = reason[:240] + "..."
        super().__init__(f"checkpoint step {step} is unreadable ({self.path}): {reason}")


@contextlib.contextmanager
def _stderr_of_a_failed_read():
    """While a checkpoint is read, hold what is written to file descriptor 2. A read that fails
    mid-way leaves tensorstore callbacks firing into orbax's closed event loop, each printing a
    'RuntimeError: Event loop is closed' traceback from a background thread: that noise is
    dropped (the failure is reported in one line by the caller); anything else is passed on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):          # no real fd 2 (e.g. captured by a test harness)
        yield
        return
    buf = tempfile.TemporaryFile()
    os.dup2(buf.fileno(), 2)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        _silence_closed_loop_errors()
        time.sleep(0.3)                    # let the in-flight reads of the failed restore finish
        raise
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        buf.seek(0)
        text = buf.read().decode("utf-8", "replace")
        buf.close()
        if failed:
            text = _drop_event_loop_noise(text)
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()


def _closed_loop_error(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _silence_closed_loop_errors() -> None:
    """After a failed restore, tensorstore's callbacks keep firing into orbax's closed event loop
    from background threads for a while, each printing a 'RuntimeError: Event loop is closed'
    traceback whenever it lands. Drop exactly those at the hooks Python prints them through
    (timing-independent, unlike holding stderr); every other error still prints."""
    if getattr(_silence_closed_loop_errors, "done", False):
        return
    _silence_closed_loop_errors.done = True
    # The failed restore's other reads fail too, in asyncio tasks nobody awaits any more;
    # asyncio logs each as "Task exception was never retrieved" with a traceback, later.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    prev_except, prev_unraisable, prev_thread = sys.excepthook, sys.unraisablehook, \
        threading.excepthook

    def excepthook(tp, value, tb):
        if not _closed_loop_error(value):
            prev_except(tp, value, tb)

    def unraisablehook(u):
        if not _closed_loop_error(u.exc_value):
            prev_unraisable(u)

    def thread_hook(args):
        if not _closed_loop_error(args.exc_value):
            prev_thread(args)
    sys.excepthook, sys.unraisablehook, threading.excepthook = (excepthook, unraisablehook,
                                                                thread_hook)


def _drop_event_loop_noise(text: str) -> str:
    """What a failed read printed, less the closed-event-loop tracebacks. They come from several
    threads at once, so their lines interleave (even within a line): every line that belongs to
    a traceback (its header, an indented frame, or naming the closed loop) is dropped, whatever
    the order; other lines pass."""
    noise = ("Traceback (most recent call last)", "Event loop is closed", "_check_closed",
             "call_soon_threadsafe", "asyncio/base_events.py")
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.strip() and not line[:1].isspace()
                   and not any(n in line for n in noise))


def restore_newest_readable(ckpt: "Checkpointer", abstract_state: Any, *, step: int | None = None,
                            check=None, warn=None):
    """(step, state, data_state, meta, unreadable_steps) of the requested `step` (exactly that
    one: CheckpointError listing the steps there are when it does not exist, or naming the file
    when it does not read) or, with step=None, of the newest readable checkpoint: each newer
    unreadable one is named in a warning. `check(step, meta)` runs on the meta of the candidate
    before its state is read (a refusal there, e.g. another model, is raised, not skipped).
    `warn(line)` reports the skipped steps (default: this module's logger, WARNING)."""
    warn = warn or logging.getLogger(__name__).warning
    steps = ckpt.all_steps()
    if step is not None:
        ckpt.check_step(step)
        candidates = [step]
    else:
        candidates = sorted(steps, reverse=True)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {ckpt.directory}")
    bad = []
    for s in candidates:
        try:
            meta = ckpt.read_meta(s)
            if check is not None:
                check(s, meta)
            with _stderr_of_a_failed_read():
                state, data, meta = ckpt.restore(s, abstract_state)
        except UnreadableCheckpoint as e:
            if step is not None:
                raise
            warn(f"[warning] {e}; trying the previous step")
            bad.append(s)
            continue
        if bad:
            warn(f"[warning] resuming from step {s}, the newest readable checkpoint (unreadable: "
                 f"{bad})")
        return s, state, data, meta, bad
    raise CheckpointError(f"no readable checkpoint in {ckpt.directory}: steps {bad} are all "
                          f"unreadable (see the warnings); use another --workdir")


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


def list_steps(directory: Path) -> list[int]:
    """Finalized step directories under `directory` (orbax names them by the step number)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit())


def check_model(saved_meta: dict, model_config: dict, workdir, step: int) -> None:
    """CheckpointError naming the differing fields when the checkpoint's meta holds another
    model architecture than `model_config`."""
    diff = model_config_diff(saved_meta.get("model", {}), _json_ready(model_config))
    if diff:
        raise CheckpointError(
            f"the workdir {workdir} holds checkpoints of a different model (step {step}); "
            f"differing fields: " + "; ".join(diff)
            + ". Use another --workdir, or the checkpoint's model config.")


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
        self._keep, self._async = keep, async_save
        self._saved = False
        self.manager = self._make_manager()

    def _make_manager(self):
        # create=False: reading a workdir (or validating a run that then fails) creates nothing;
        # the directory is made by the first save.
        options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=False,
                                               enable_async_checkpointing=self._async)
        return ocp.CheckpointManager(self.directory, options=options,
                                     item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_step(self, step: int) -> None:
        """CheckpointError listing the steps there are when `step` is not one of them."""
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"step {step} has no checkpoint in {self.directory}; steps "
                                  f"there: {steps or 'none'}")

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            res = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:           # noqa: BLE001 - a damaged checkpoint, named below
            raise UnreadableCheckpoint(step, self.step_dir(step), e) from e
        if not isinstance(res.get("meta"), dict):
            raise UnreadableCheckpoint(step, self.step_dir(step) / "meta",
                                       ValueError("the meta item is missing or not a JSON object"))
        return res["meta"]

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def check_compatible(self, model_config: dict, step: int | None = None) -> None:
        """Raise CheckpointError if the checkpoint holds a different model architecture."""
        saved = self.read_meta(step).get("model", {})
        diff = model_config_diff(saved, _json_ready(model_config))
        if diff:
            raise CheckpointError(
                f"the workdir {self.directory.parent} holds checkpoints of a different model "
                f"(step {self.latest_step() if step is None else step}); differing fields: "
                + "; ".join(diff)
                + ". Use another --workdir, or the checkpoint's model config.")

    def save(self, step: int, state: Any, data_state: Any, meta: dict, *, force: bool = False) -> bool:
        """Start an (async) save of `state` at `step`; returns whether a save was started."""
        if not self._saved:
            # The first save makes the directory and a manager that writes into it. Every
            # process does this unconditionally (not only where the directory is missing), so
            # that all processes of a multi-host run make the same collective calls: a check of
            # exists() raced with the process that created it.
            self.directory.mkdir(parents=True, exist_ok=True)
            self.manager.close()
            self.manager = self._make_manager()
            self._saved = True
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(_json_ready(data_state)),
                                  meta=ocp.args.JsonSave(_json_ready(meta)))
        started = self.manager.save(step, args=args, force=force)
        _fault_hook_kill_in_save(step)
        return started

    def quarantine(self, steps, into: str = "checkpoints_unreadable") -> list[Path]:
        """Move the step directories `steps` (unreadable ones, or ones newer than the step a run
        resumes from) to <workdir>/<into>/<step>[.<n>] (kept, not deleted), so that the resumed
        run can save those steps again; returns the new paths."""
        out = []
        if not steps:
            return out
        self.manager.wait_until_finished()
        dest_root = self.directory.parent / into
        dest_root.mkdir(exist_ok=True)
        for step in steps:
            src = self.step_dir(step)
            if not src.exists():
                continue
            dest, n = dest_root / str(step), 0
            while dest.exists():
                n += 1
                dest = dest_root / f"{step}.{n}"
            os.replace(src, dest)
            out.append(dest)
        self.manager.close()
        self.manager = self._make_manager()
        return out

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        """(state, data_state, meta) of `step`; abstract_state gives structure, dtypes and
        shardings (ShapeDtypeStructs with `.sharding` place the arrays). UnreadableCheckpoint
        (naming the step and the file) when it cannot be read."""
        try:
            res = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:          # noqa: BLE001 - truncated / missing files of a step
            raise UnreadableCheckpoint(step, self.step_dir(step), e) from e
        if res.get("data") is None:
            raise UnreadableCheckpoint(step, self.step_dir(step) / "data",
                                       ValueError("the data item is missing"))
        return res["state"], res["data"], res["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _fault_hook_kill_in_save(step: int) -> None:
    """Test hook (tests/faults): SPARSE_LM_FAULT_KILL_IN_SAVE="<step>:<seconds>" SIGKILLs this
    process that many seconds after the save of <step> started (an async save still in flight)."""
    spec = os.environ.get("SPARSE_LM_FAULT_KILL_IN_SAVE")
    if not spec:
        return
    at, _, delay = spec.partition(":")
    if int(at) == int(step):
        import signal                     # only for this test hook
        time.sleep(float(delay or 0))
        os.kill(os.getpid(), signal.SIGKILL)


def with_sharding(abstract: Any, sharding) -> Any:
    """ShapeDtypeStructs of `abstract` placed with `sharding` (e.g. replicated)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


# ---------------------------------------------------------------------------- train.init_from
# A run may start from the model weights of another run (fine-tuning): `train.init_from` names a
# training workdir (its newest checkpoint, or `train.init_from_step`) or a checkpoint converted
# from Hugging Face weights (sparse_lm.convert: <dir>/model_config.json + <dir>/model). Only the
# model's variables are taken (parameters, router biases, hash tables); the optimizer state is
# fresh and the step is 0.
@dataclasses.dataclass(frozen=True)
class InitSource:
    """Checked (not yet read) origin of a run's initial weights."""
    path: Path
    kind: str                  # "workdir" | "converted"
    step: int | None           # the workdir's checkpoint step; None for a converted checkpoint
    model: dict                # the model config the weights belong to

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "step": self.step}


def checkpoint_source(path, *, step: int = -1, field: str = "train.init_from") -> InitSource:
    """The InitSource of `path` (a training workdir or a converted checkpoint), reading configs
    only; CheckpointError naming `field` when the path does not exist, holds neither kind of
    checkpoint or has no (or not that) step. step: a workdir checkpoint step; -1 = its newest."""
    p = Path(path).absolute()
    where = f"{field}={path}"
    step_field = "train.init_from_step" if field == "train.init_from" else "the step"
    if not p.is_dir():
        raise CheckpointError(f"{where}: no such directory; give a training workdir (with "
                              f"checkpoints/) or a converted checkpoint (with {CONVERTED_CONFIG})")
    if (p / CONVERTED_CONFIG).is_file():
        if step >= 0:
            raise CheckpointError(f"{where} is a converted checkpoint (one set of weights): "
                                  f"{step_field}={step} applies to training workdirs only")
        try:
            meta = json.loads((p / CONVERTED_CONFIG).read_text())
            saved = dict(meta["model_config"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{where}: {p / CONVERTED_CONFIG} is not a converted "
                                  f"checkpoint's config ({type(e).__name__}: {e})") from None
        source = InitSource(p, "converted", None, saved)
    elif (p / "checkpoints").is_dir():
        ckpt = Checkpointer(p, keep=1000, async_save=False)
        try:
            steps = ckpt.all_steps()
            if not steps:
                raise CheckpointError(f"{where}: no checkpoint in {ckpt.directory}")
            chosen = steps[-1] if step < 0 else step
            ckpt.check_step(chosen)
            saved = dict(ckpt.read_meta(chosen).get("model") or {})
        finally:
            ckpt.close()
        source = InitSource(p, "workdir", chosen, saved)
    else:
        raise CheckpointError(f"{where} is neither a training workdir (no checkpoints/ in it) nor "
                              f"a converted checkpoint (no {CONVERTED_CONFIG} in it)")
    return source


def resolve_init_source(path, model_config: dict, *, step: int = -1) -> InitSource:
    """`checkpoint_source` of train.init_from, and CheckpointError when it holds another model
    architecture than `model_config` (the differing fields are named; execution fields such as
    dtype may differ)."""
    where = f"train.init_from={path}"
    source = checkpoint_source(path, step=step)
    diff = model_config_diff(source.model, _json_ready(model_config))
    if diff:
        raise CheckpointError(f"{where} holds weights of a different model ({source.kind}"
                              + (f" step {source.step}" if source.step is not None else "")
                              + "); differing fields: " + "; ".join(diff)
                              + ". Set the model config to the checkpoint's.")
    return source


def load_init_weights(source: InitSource, abstract_params: Any, abstract_buffers: Any):
    """(params, buffers) of `source`, in the dtypes and shardings of the abstract states
    (nnx.State of ShapeDtypeStructs, with .sharding to place them). CheckpointError naming the
    path when the arrays cannot be read or do not fit."""
    target = {"params": abstract_params, "buffers": abstract_buffers}
    try:
        if source.kind == "workdir":
            item = jax.tree.map(_placed, target)
            restored = ocp.PyTreeCheckpointer().restore(
                source.path / "checkpoints" / str(source.step) / "state",
                args=ocp.args.PyTreeRestore(item=item,
                                            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                            partial_restore=True))
            return restored["params"], restored["buffers"]
        model, _ = restore_checkpoint(str(source.path))
        _, params, buffers = nnx.split(model, nnx.Param, ...)
        cast = lambda x, a: jax.device_put(x.astype(a.dtype), _placed(a).sharding)
        return (jax.tree.map(cast, params, abstract_params),
                jax.tree.map(cast, buffers, abstract_buffers))
    except CheckpointError:
        raise
    except Exception as e:             # noqa: BLE001 - named in one line with the path
        raise CheckpointError(f"train.init_from={source.path}: the weights cannot be read into "
                              f"this model ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                              ) from e


def _placed(x):
    """A ShapeDtypeStruct with a sharding (the first device's when it has none)."""
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
