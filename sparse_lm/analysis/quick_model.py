"""A trained model for the notebooks: load the checkpoint of a workdir, or train a small one.

    qm = load_or_train(workdir)          # workdir=None: a small model trained (once) for you
    qm.model, qm.config, qm.model_cfg, qm.step, qm.workdir

Training goes through the training package (`sparse_lm.train.loop.train`): the same data,
optimizer, router-bias rule, indexer warm-up, checkpoints and `metrics.jsonl` as any run. The
quick config is a 4-layer model with every layer kind (SWA with hash routing, CSA, HCA, CSA; MTP)
trained on the embedded stdlib corpus for 100 steps of 8 x 256 bytes (about two minutes of CPU
time). It keeps a checkpoint every 10 steps so the router-bias trajectory can be read back from
them (`internals.bias_trajectory`). A trained default run is reused: the default workdir is named
by a hash of the quick config, so a changed config never resumes an old run.

Fast mode (environment variable SPARSE_LM_NOTEBOOK_FAST=1, used by CI): four steps of small
batches without the warm-up stage (one compiled train step), enough to exercise every code path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from sparse_lm import presets
from sparse_lm.config import ModelConfig
from sparse_lm.data import pipeline
from sparse_lm.train.checkpoint import Checkpointer
from sparse_lm.train.defaults import base
from sparse_lm.train.loop import load_for_eval, train

FAST_ENV = "SPARSE_LM_NOTEBOOK_FAST"
WORKDIR_ENV = "SPARSE_LM_NOTEBOOK_WORKDIR"


def fast_mode() -> bool:
    """True when SPARSE_LM_NOTEBOOK_FAST is set to 1/true/yes (CI runs the notebooks this way)."""
    v = os.environ.get(FAST_ENV, "").strip().lower()
    if v in ("", "0", "false", "no"):
        return False
    if v in ("1", "true", "yes"):
        return True
    raise ValueError(f"{FAST_ENV}={v!r} is invalid: allowed values 1/true/yes or 0/false/no")


def quick_model_config() -> ml_collections.ConfigDict:
    """The small model: 4 layers [swa (hash-routed), csa, hca, csa] + MTP, 128 wide, 8 experts."""
    return presets.four_layer(hidden_size=128, head_dim=32, q_lora_rank=64, sliding_window=32,
                              compress_ratio_hca=16, index_head_dim=16, index_topk=8,
                              moe_intermediate_size=128, yarn_original_max_position=256)


def quick_config(fast: bool | None = None) -> ml_collections.ConfigDict:
    """Full training config (sparse_lm/train/defaults.py fields) of the quick run."""
    fast = fast_mode() if fast is None else fast
    c = base()
    c.model = quick_model_config()
    if fast:
        # One compiled train step (no dense warm-up stage), four steps, a checkpoint each.
        c.train.update(dict(steps=4, batch_size=4, seq_len=256, sparse_start_step=0,
                            log_every=1, eval_every=0, eval_batches=2, checkpoint_every=1,
                            keep_checkpoints=100, tensorboard=False, async_checkpoint=False))
        c.schedule.update(dict(peak_lr=3e-3, warmup_steps=1, decay_steps=3, final_lr=3e-4))
    else:
        # 100 steps of 8 x 256 bytes (205K tokens): the dense warm-up for 40 steps, then sparse.
        c.train.update(dict(steps=100, batch_size=8, seq_len=256, sparse_start_step=40,
                            log_every=5, eval_every=0, eval_batches=4, checkpoint_every=10,
                            keep_checkpoints=100, tensorboard=False))
        c.schedule.update(dict(peak_lr=3e-3, warmup_steps=10, decay_steps=60, final_lr=3e-4))
    # A higher bias rate than the default makes the aux-loss-free balancing visible in a short run.
    c.loss.update(dict(router_bias_rate=1e-2))
    return c


def config_hash(config: ml_collections.ConfigDict) -> str:
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:10]


def default_workdir(config: ml_collections.ConfigDict) -> Path:
    """$SPARSE_LM_NOTEBOOK_WORKDIR, else runs/notebook_quick_<config hash> under the repository."""
    env = os.environ.get(WORKDIR_ENV, "").strip()
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    return root / "runs" / f"notebook_quick_{config_hash(config)}"


def config_from_workdir(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config a run recorded in <workdir>/config.json."""
    p = Path(workdir) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: {workdir} is not a training workdir "
                                f"(train one with python -m experiments.train --workdir=...)")
    return ml_collections.ConfigDict(json.loads(p.read_text())["config"])


@dataclasses.dataclass
class QuickModel:
    """A restored model and where it came from."""
    model: Any                      # DeepseekV4 with the checkpoint's parameters
    config: ml_collections.ConfigDict
    model_cfg: Any                  # resolved sparse_lm.config.ModelConfig
    step: int
    workdir: Path
    trained_seconds: float | None   # None when an existing checkpoint was loaded

    def describe(self) -> str:
        c = self.model_cfg
        how = (f"trained here in {self.trained_seconds:.0f} s" if self.trained_seconds is not None
               else "loaded from its checkpoint")
        kinds = ", ".join(f"{s.kind}/{s.routing}" for s in c.layers)
        return (f"{self.workdir} step {self.step} ({how}); {c.num_layers} layers [{kinds}], "
                f"hidden {c.hidden_size}, {c.n_routed_experts} experts top-{c.num_experts_per_tok}, "
                f"CSA ratio {c.compress_ratio_csa} top-{c.index_topk}, HCA ratio "
                f"{c.compress_ratio_hca}, window {c.sliding_window}")


def _latest_step(workdir: Path) -> int | None:
    if not (workdir / "checkpoints").is_dir():
        return None
    ck = Checkpointer(workdir, keep=1000, async_save=False)
    try:
        return ck.latest_step()
    finally:
        ck.close()


def load_or_train(workdir: str | os.PathLike | None = None, *, fast: bool | None = None,
                  config: ml_collections.ConfigDict | None = None) -> QuickModel:
    """Restore the latest checkpoint of `workdir`; train the quick model first if it has none.

    workdir=None uses `default_workdir` (trained once, then reused). A workdir with a config.json
    is loaded with its own recorded config; an empty or new one gets the quick config (or
    `config`) trained into it.
    """
    if config is None:
        config = quick_config(fast)
    wd = Path(workdir) if workdir is not None else default_workdir(config)
    trained = None
    if (wd / "config.json").exists() and _latest_step(wd) is not None:
        config = config_from_workdir(wd)
        latest = _latest_step(wd)
        if latest < int(config.train.steps) and workdir is None:
            trained = _train(train, config, wd)     # an interrupted default run: finish it
    else:
        trained = _train(train, config, wd)
    run, model, step = load_for_eval(config, wd)
    return QuickModel(model=model, config=config, model_cfg=run.model_cfg, step=step, workdir=wd,
                      trained_seconds=trained)


def _train(train_fn, config, wd: Path) -> float:
    """Run the training loop; its console text (data, optimizer split, MFU lines) goes to
    <workdir>/train.log, its progress bar stays on stderr."""
    t0, c0 = time.perf_counter(), time.process_time()
    wd.mkdir(parents=True, exist_ok=True)
    log = wd / "train.log"
    print(f"[quick_model] training {config.train.steps} steps of the quick model into {wd} "
          f"(console log: {log.name})", flush=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), warnings.catch_warnings():
        # tqdm.auto without ipywidgets falls back to the text bar; its warning says so
        warnings.filterwarnings("ignore", message="IProgress not found")
        summary = train_fn(config, wd)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    hist = summary.get("history") or [{}]
    last = hist[-1]
    comp = sum(summary.get("compile_s", {}).values())
    print(f"[quick_model] trained in {dt:.0f} s wall, {cpu:.0f} s of CPU time (compiling: "
          f"{comp:.0f} s wall); last logged step {last.get('step')}: "
          f"{last.get('bits_per_byte', float('nan')):.3f} bits/byte", flush=True)
    return dt


# ---------------------------------------------------------------------------- real text
def validation_rows(config, rows: int, seq_len: int | None = None) -> dict:
    """The first `rows` packed rows of the run's validation split (documents in order, aligned
    as in training): {"tokens" [rows, S], "segment_ids" [rows, S]} (0 = padding)."""
    s = int(config.train.seq_len if seq_len is None else seq_len)
    src = pipeline.make_source(config.data, config.data.eval_split)
    align = pipeline.resolve_align(config.data, ModelConfig.from_dict(config.model.to_dict()))
    batch = pipeline.eval_batches(src, seq_len=s, local_batch=rows, align=align, num_batches=1)
    if not batch:
        raise ValueError(f"the validation split of {config.data.source!r} yields no row of {s}")
    b = batch[0]
    return {"tokens": b["tokens"][:, :s], "segment_ids": b["segment_ids"][:, :s]}


def long_documents(config, count: int, length: int, *, skip: int = 0) -> list[tuple[str, bytes]]:
    """(name, first `length` bytes) of the first `count` validation documents that are at least
    `length` bytes long (after skipping `skip` of them): real, unpacked long-context inputs."""
    src = pipeline.make_source(config.data, config.data.eval_split)
    names = getattr(src, "paths", None)
    out = []
    for i in range(len(src)):
        doc = np.asarray(src[i])
        if len(doc) < length:
            continue
        if skip:
            skip -= 1
            continue
        out.append((names[i] if names is not None else f"document {i}", doc[:length].tobytes()))
        if len(out) == count:
            break
    if len(out) < count:
        raise ValueError(f"only {len(out)} validation documents have >= {length} bytes")
    return out
