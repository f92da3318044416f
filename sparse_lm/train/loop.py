"""The training loop: config -> model, data, optimizer, checkpoints, metrics; resumable.

`train(config, workdir)` runs `config.train.steps` optimizer steps (resuming from the latest
checkpoint in the workdir if there is one) and returns a summary dict. The same function runs on
one CPU, one accelerator, or every process of a multi-host slice (data parallel over all devices;
each process feeds its own rows).

Stages: steps < train.sparse_start_step run the CSA layers dense (every visible compressed entry)
while the indexer learns from its KL loss to the attention distribution; the last
train.indexer_warmup_steps of them train only the indexers (everything else frozen, the V3.2
warm-up recipe); later steps use the indexer's top-k (sparse).

Failure handling: a non-finite metric stops the run with `TrainingDiverged`, naming the step and
the metrics that went bad; nothing from that step is saved, so the latest checkpoint is the last
good one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from sparse_lm.config import ConfigError, ModelConfig
from sparse_lm.data import pipeline
from sparse_lm.data.tfds_source import DataError
from sparse_lm.model import build_model
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train import metrics as metrics_lib
from sparse_lm.train import optimizer as opt_lib
from sparse_lm.train.losses import LN2
from sparse_lm.train.optimizer import OptimizerConfigError
from sparse_lm.train.plan import make_plan
from sparse_lm.train.schedule import Schedule
from sparse_lm.train.steps import (LossConfig, abstract_train_state, init_train_state,
                                   make_eval_step, make_train_step)

SCALARS = ("loss", "ce", "bits_per_byte", "mtp_ce", "balance_loss", "indexer_kl", "grad_norm",
           "update_norm", "param_norm", "lr", "mtp_weight", "target_tokens")


class TrainingDiverged(RuntimeError):
    """A metric became NaN or infinite; the message names the step and the metrics."""


# ---------------------------------------------------------------------------- config resolution
# Keys of `train` that older runs wrote into config.json, each now a field of the model config
# (one knob per choice): the old key is read once with a deprecation warning.
LEGACY_TRAIN_KEYS = {"implementation": "attention_impl", "compute_dtype": "dtype"}


def _legacy_model_overrides(config) -> dict:
    """{model field: value} for the legacy `train` keys an old config carries (warned once each)."""
    t = config.get("train") or {}
    out = {}
    for key, field in LEGACY_TRAIN_KEYS.items():
        if key not in t:
            continue
        value = t[key]
        if key == "implementation":
            value = value or None              # "" meant the model's default
        elif value == "auto":                  # the old default: bfloat16 on accelerators
            value = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        elif value == "model":
            value = None
        if value is not None and value != config.model.get(field):
            out[field] = value
        warnings.warn(f"train.{key} is deprecated and will be removed: set model.{field} instead"
                      + (f" (read as model.{field}={value!r})" if field in out else
                         " (ignored: the model config already says so)"),
                      FutureWarning, stacklevel=3)
    return out


def resolve_model_config(config) -> ModelConfig:
    """ModelConfig from config.model: its `dtype` is the compute dtype and its `attention_impl`
    the attention implementation (None = the platform's default). Legacy `train.compute_dtype` /
    `train.implementation` keys of older runs' config.json are mapped onto them."""
    d = config.model.to_dict()
    d.update(_legacy_model_overrides(config))
    return ModelConfig.from_dict(d)


def make_schedule(config) -> Schedule:
    s = config.schedule
    return Schedule(peak_lr=float(s.peak_lr), total_steps=int(config.train.steps),
                    warmup_steps=int(s.warmup_steps), decay_steps=int(s.decay_steps),
                    final_lr=float(s.final_lr), mtp_weight=float(s.mtp_weight),
                    mtp_weight_decay=float(s.mtp_weight_decay))


def loss_config(config) -> LossConfig:
    return LossConfig(**config.loss.to_dict())


@dataclasses.dataclass
class Run:
    """Everything `train` and `evaluate` build from a config."""
    config: Any
    model_cfg: ModelConfig
    workdir: Path
    mesh: Any
    batch_sharding: Any
    replicated: Any
    local_batch: int
    align: int
    plan: Any = None     # sparse_lm.train.plan.ShardingPlan when config.sharding names a preset


def setup(config, workdir) -> Run:
    t = config.train
    n_proc = jax.process_count()
    if int(t.batch_size) % max(n_proc, jax.device_count()):
        raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of the number of "
                         f"devices ({jax.device_count()}) and processes ({n_proc})")
    if int(t.seq_len) < 1:
        raise ValueError(f"train.seq_len={t.seq_len} is invalid: must be >= 1")
    model_cfg = resolve_model_config(config)
    align = pipeline.resolve_align(config.data, model_cfg)
    if int(t.seq_len) % align:
        raise ValueError(f"train.seq_len={t.seq_len} must be a multiple of the document "
                         f"alignment {align} (data.align, default the largest compress ratio)")
    if config.get("sharding"):     # a sharding preset: mesh, rules, sharded steps
        plan = make_plan(str(config.sharding), model_cfg, make_tx(config))
        return Run(config=config, model_cfg=plan.model_cfg, workdir=Path(workdir), mesh=plan.mesh,
                   batch_sharding=plan.batch_sharding, replicated=plan.replicated,
                   local_batch=int(t.batch_size) // n_proc, align=align, plan=plan)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    P = jax.sharding.PartitionSpec
    return Run(config=config, model_cfg=model_cfg, workdir=Path(workdir), mesh=mesh,
               batch_sharding=jax.sharding.NamedSharding(mesh, P("data")),
               replicated=jax.sharding.NamedSharding(mesh, P()),
               local_batch=int(t.batch_size) // n_proc, align=align)


def make_tx(config):
    return opt_lib.make_optimizer(opt_lib.OptimizerConfig.from_dict(config.optimizer),
                                  make_schedule(config))


def run_meta(run: Run, corpus: dict) -> dict:
    meta = {"model": run.model_cfg.to_dict(), "corpus": corpus,
            "seq_len": int(run.config.train.seq_len), "batch_size": int(run.config.train.batch_size),
            "processes": jax.process_count(), "devices": jax.device_count()}
    if run.plan is not None:
        meta["sharding"] = run.plan.metadata()
    return meta


def write_resolved_config(run: Run, corpus: dict) -> None:
    """<workdir>/config.json: the resolved config, derived model facts and the corpus record."""
    if jax.process_index() != 0:
        return
    run.workdir.mkdir(parents=True, exist_ok=True)
    cfg = run.model_cfg
    doc = {"config": json.loads(run.config.to_json_best_effort()),
           "resolved_model": cfg.to_dict(),
           "derived": {"layer_kinds": list(cfg.layer_kinds), "compress_ratios": list(cfg.compress_ratios),
                       "routing": [s.routing for s in cfg.layers], "document_align": run.align},
           "corpus": corpus,
           "runtime": {"jax": jax.__version__, "backend": jax.default_backend(),
                       "devices": jax.device_count(), "processes": jax.process_count(),
                       "device_kind": jax.devices()[0].device_kind}}
    if run.plan is not None:
        doc["sharding"] = run.plan.metadata()
    p = run.workdir / "config.json"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, p)


def _gather_data_states(state: dict) -> list[dict]:
    """Every process's iterator position (the checkpoint stores all of them)."""
    if jax.process_count() == 1:
        return [state]
    keys = sorted(state)
    vec = np.asarray([int(state[k]) for k in keys], np.int64)
    allv = np.asarray(multihost_utils.process_allgather(vec))
    return [dict(zip(keys, map(int, row))) for row in allv.reshape(jax.process_count(), -1)]


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _finite_check(step: int, host: dict, latest: int | None) -> None:
    bad = [k for k in SCALARS if k in host and not math.isfinite(host[k])]
    if bad:
        vals = ", ".join(f"{k}={host[k]}" for k in bad)
        raise TrainingDiverged(
            f"step {step}: non-finite metric(s) {vals}. Stopped without saving this step; the "
            f"last good checkpoint is step {latest}" if latest is not None else
            f"step {step}: non-finite metric(s) {vals}. Stopped without saving; no checkpoint "
            f"was written before it")


# ---------------------------------------------------------------------------- evaluation
def evaluate_bpb(eval_fn, params, buffers, batches, run: Run) -> dict:
    """Validation bits/byte (and MTP CE) over fixed batches."""
    ce = n = mce = mn = 0.0
    recall = None
    for b in batches:
        r = jax.device_get(eval_fn(params, buffers, pipeline.to_global(b, run.batch_sharding)))
        ce += float(r["ce_sum"])
        n += float(r["tokens"])
        if "mtp_ce_sum" in r:
            mce += float(r["mtp_ce_sum"])
            mn += float(r["mtp_tokens"])
        recall = r["indexer_recall"] if recall is None else recall + r["indexer_recall"]
    out = {"bits_per_byte": ce / max(n, 1) / LN2, "tokens": n}
    if mn:
        out["mtp_bits_per_byte"] = mce / mn / LN2
    if recall is not None and batches:
        out.update(metrics_lib.indexer_metrics(run.model_cfg, np.asarray(recall) / len(batches)))
    return out


# ---------------------------------------------------------------------------- training
def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    t = config.train
    run = setup(config, workdir)
    cfg = run.model_cfg
    pidx, pcount = jax.process_index(), jax.process_count()

    # Data.
    train_src = pipeline.make_source(config.data, config.data.train_split)
    corpus = pipeline.describe_source(train_src)
    it = pipeline.TrainIterator(train_src, seq_len=int(t.seq_len), local_batch=run.local_batch,
                                align=run.align, seed=int(config.data.seed),
                                chunk=bool(config.data.chunk_docs), process_index=pidx,
                                process_count=pcount)
    write_resolved_config(run, corpus)
    _log(f"[data] {corpus.get('source')}: {len(train_src)} train documents, fingerprint "
         f"{corpus.get('fingerprint')}; rows of {t.seq_len}+1 tokens, documents aligned to "
         f"{run.align}; global batch {t.batch_size} ({run.local_batch} per process)")

    # Model, optimizer, state.
    schedule = make_schedule(config)
    tx = run.plan.tx if run.plan is not None else make_tx(config)
    model_fn = lambda: build_model(cfg, seed=int(config.seed))
    ckpt = ckpt_lib.Checkpointer(run.workdir, keep=int(t.keep_checkpoints),
                                 async_save=bool(t.async_checkpoint))
    writer = metrics_lib.MetricsWriter(run.workdir, enabled=pidx == 0,
                                       tensorboard=bool(t.get("tensorboard", True)))
    latest = ckpt.latest_step()
    meta = run_meta(run, corpus)
    if latest is not None:
        ckpt.check_compatible(meta["model"])
        saved_corpus = ckpt.read_meta(latest).get("corpus", {})
        if saved_corpus.get("fingerprint") != corpus.get("fingerprint"):
            _log(f"[warning] the corpus fingerprint changed since the checkpoint "
                 f"({saved_corpus.get('fingerprint')} -> {corpus.get('fingerprint')}): the resumed "
                 f"run reads different data than the interrupted one would have")
        graphdef, abstract = abstract_train_state(model_fn, tx)
        placed = (run.plan.abstract_state() if run.plan is not None
                  else ckpt_lib.with_sharding(abstract, run.replicated))
        state, data_states, _ = ckpt.restore(latest, placed)
        it.restore(data_states[pidx])
        writer.truncate_after(latest)
        _log(f"[resume] restored step {latest} from {ckpt.directory}")
    elif run.plan is not None:       # created directly in the preset's layout
        graphdef, state = run.plan.graphdef, run.plan.init_state(seed=int(config.seed))
    else:
        graphdef, state = init_train_state(model_fn(), tx)
        state = jax.device_put(state, run.replicated)
    split = opt_lib.split_summary(state.params)
    _log("[optimizer] parameter split (Muon: matrices, each expert / layer / group separately; "
         "AdamW: the rest)\n" + opt_lib.format_split(split))
    if pidx == 0:
        (run.workdir / "optimizer_split.json").write_text(json.dumps(split, indent=1))
    start = int(jax.device_get(state.step))
    total = int(t.steps)
    sparse_start = int(t.sparse_start_step)
    impl = cfg.attention_impl          # None = the platform's default
    lcfg = loss_config(config)
    warm = int(t.get("indexer_warmup_steps", 0))
    if not 0 <= warm <= sparse_start:
        raise ValueError(f"train.indexer_warmup_steps={warm} is invalid: must be in "
                         f"[0, train.sparse_start_step={sparse_start}]")

    def stage(step):
        if step >= sparse_start:
            return "sparse"
        return "indexer_warmup" if step >= sparse_start - warm else "dense"
    steps = {}

    def step_fn(name):
        if name not in steps and run.plan is not None:
            steps[name] = run.plan.train_step(schedule, lcfg, sparse=name == "sparse",
                                              implementation=impl,
                                              only_indexer=name == "indexer_warmup")
        if name not in steps:
            steps[name] = make_train_step(graphdef, tx, schedule, lcfg, sparse=name == "sparse",
                                          implementation=impl,
                                          only_indexer=name == "indexer_warmup")
        return steps[name]
    eval_fns = {s: (run.plan.eval_step(sparse=s, implementation=impl) if run.plan is not None
                    else make_eval_step(graphdef, sparse=s, implementation=impl))
                for s in (False, True)}
    eval_src = None
    eval_batches = None

    def run_eval(step, sparse):
        nonlocal eval_src, eval_batches
        if eval_batches is None:
            eval_src = pipeline.make_source(config.data, config.data.eval_split)
            eval_batches = pipeline.eval_batches(eval_src, seq_len=int(t.seq_len),
                                                 local_batch=run.local_batch, align=run.align,
                                                 num_batches=int(t.eval_batches),
                                                 process_index=pidx, process_count=pcount)
        res = evaluate_bpb(eval_fns[sparse], state.params, state.buffers, eval_batches, run)
        res["sparse"] = float(sparse)
        writer.write(step, res, kind="eval")
        return res

    # Throughput bookkeeping.
    tokens_per_step = int(t.batch_size) * int(t.seq_len)
    peak, peak_src = metrics_lib.peak_flops_per_device(float(t.get("peak_flops", 0.0)))
    fpt = {s: metrics_lib.train_flops_per_token(cfg, int(t.seq_len), s) for s in (False, True)}
    _log(f"[mfu] model FLOPs per token: sparse {fpt[True]:.3g}, dense warm-up {fpt[False]:.3g}; "
         f"peak {peak:.3g} FLOP/s per device ({peak_src})")

    log_every, eval_every, ckpt_every = int(t.log_every), int(t.eval_every), int(t.checkpoint_every)
    nan_step = int(t.get("inject_nan_at_step", -1))
    acc_counts = None
    acc = {}
    n_acc = 0
    last_eval = {}
    history = []
    t_log = time.perf_counter()
    steps_since_log = 0
    compile_s = {}
    progress = None
    if pidx == 0 and bool(t.get("progress", True)):
        progress = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True,
                        mininterval=1.0)
    try:
        for step in range(start, total):
            sparse = step >= sparse_start
            st_name = stage(step)
            batch = next(it)
            gbatch = pipeline.to_global(batch, run.batch_sharding)
            if step == nan_step:      # test hook: poison the parameters
                state = dataclasses.replace(state, params=jax.tree.map(lambda x: x * jnp.nan, state.params))
            t0 = time.perf_counter()
            state, m = step_fn(st_name)(state, gbatch)
            host = jax.device_get(m)
            dt = time.perf_counter() - t0
            if st_name not in compile_s:
                compile_s[st_name] = dt
                t_log = time.perf_counter()        # exclude compilation from throughput
                steps_since_log = 0
            else:
                steps_since_log += 1
            scal = {k: float(host[k]) for k in SCALARS if k in host}
            _finite_check(step, scal, ckpt.latest_step())
            counts = np.asarray(host["expert_counts"], np.float64)
            acc_counts = counts if acc_counts is None else acc_counts + counts
            for k, v in scal.items():
                acc[k] = acc.get(k, 0.0) + v
            acc["indexer_recall"] = acc.get("indexer_recall", 0.0) + np.asarray(host["indexer_recall"])
            acc["packing"] = acc.get("packing", 0.0) + float(np.mean(batch["segment_ids"][:, :-1] > 0))
            n_acc += 1
            done = step + 1
            if done % log_every == 0 or done == total:
                now = time.perf_counter()
                rate = (steps_since_log * tokens_per_step / (now - t_log)) if steps_since_log else float("nan")
                rec = {k: v / n_acc for k, v in acc.items() if k not in ("indexer_recall", "packing")}
                rec["packing_efficiency"] = acc["packing"] / n_acc
                rec["sparse"] = float(sparse)
                rec["indexer_only"] = float(st_name == "indexer_warmup")
                rec["tokens_per_s"] = rate
                rec["step_time_s"] = tokens_per_step / rate if steps_since_log else float("nan")
                rec["mfu"] = rate * fpt[sparse] / (peak * jax.device_count())
                rec["tokens_seen"] = float(done * tokens_per_step)
                rec.update(metrics_lib.routing_metrics(cfg, acc_counts))
                rec.update(metrics_lib.indexer_metrics(cfg, acc["indexer_recall"] / n_acc))
                writer.write(done, rec)
                history.append({"step": done, **rec})
                acc, acc_counts, n_acc = {}, None, 0
                t_log, steps_since_log = time.perf_counter(), 0
                if progress is not None:
                    progress.set_postfix({"bpb": f"{rec['bits_per_byte']:.3f}",
                                          "tok/s": f"{rate:.0f}", "lr": f"{rec['lr']:.2e}",
                                          "cv": f"{rec['moe/load_cv_mean']:.2f}",
                                          "stage": st_name}, refresh=False)
            if eval_every > 0 and (done % eval_every == 0 or done == total):
                last_eval = run_eval(done, done >= sparse_start)
                if progress is not None:
                    progress.write(f"[eval] step {done}: validation {last_eval['bits_per_byte']:.3f} "
                                   f"bits/byte ({'sparse' if done >= sparse_start else 'dense'})")
            if (ckpt_every > 0 and done % ckpt_every == 0) or done == total:
                ckpt.save(done, state, _gather_data_states(it.state()), meta, force=True)
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()       # waits for in-flight async saves: the last good checkpoint is complete
        writer.close()
    return {"steps": total, "resumed_from": start if start else None, "compile_s": compile_s,
            "last_eval": last_eval, "history": history, "workdir": str(run.workdir),
            "corpus": corpus}


# ---------------------------------------------------------------------------- restore for eval
def load_for_eval(config, workdir, step: int | None = None):
    """(run, model, step) of the latest (or given) checkpoint in workdir, built on this host."""
    run = setup(config, workdir)
    ckpt = ckpt_lib.Checkpointer(run.workdir, keep=1000, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ckpt_lib.CheckpointError(f"no checkpoint in {ckpt.directory}: train first "
                                       f"(python -m experiments.train --workdir={workdir} ...)")
    ckpt.check_compatible(run.model_cfg.to_dict(), step)
    tx = make_tx(config)
    graphdef, abstract = abstract_train_state(lambda: build_model(run.model_cfg), tx)
    placed = (run.plan.abstract_state() if run.plan is not None
              else ckpt_lib.with_sharding(abstract, run.replicated))
    state, _, _ = ckpt.restore(step, placed)
    ckpt.close()
    return run, nnx.merge(graphdef, state.params, state.buffers), step


# Errors a launcher reports as one line, without a traceback.
KNOWN_ERRORS = (ConfigError, DataError, OptimizerConfigError, ckpt_lib.CheckpointError,
                TrainingDiverged, FileNotFoundError)
