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
import logging
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
from sparse_lm.data.tokenizer import BYTES, check_vocab, load_tokenizer
from sparse_lm.model import build_model
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train import metrics as metrics_lib
from sparse_lm.train import optimizer as opt_lib
from sparse_lm.train.losses import LN2
from sparse_lm.train.optimizer import OptimizerConfigError
from sparse_lm.train.plan import make_plan
from sparse_lm.train.schedule import Schedule
from sparse_lm.train.steps import (LossConfig, TrainState, abstract_train_state,
                                   init_train_state, make_eval_step, make_train_step)

SCALARS = ("loss", "ce", "bits_per_byte", "mtp_ce", "balance_loss", "indexer_kl", "grad_norm",
           "update_norm", "param_norm", "lr", "mtp_weight", "target_tokens")


log = logging.getLogger(__name__)


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
    try:
        return _make_schedule(config, s)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def _make_schedule(config, s) -> Schedule:
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
    tokenizer: Any = None   # sparse_lm.data.tokenizer: ByteTokenizer or HFTokenizer


def run_tokenizer(config, workdir):
    """The tokenizer of data.tokenizer, checked against model.vocab_size. A tokenizer.json path
    that does not exist (a run config read on another machine) falls back to the copy a run
    keeps in its workdir."""
    spec = str(config.data.get("tokenizer", BYTES) or BYTES)
    copy = Path(workdir) / "tokenizer.json"
    if spec != BYTES and not Path(spec).exists() and copy.is_file():
        spec = str(copy)
    tok = load_tokenizer(spec)
    check_vocab(tok, int(config.model.vocab_size))
    return tok


def setup(config, workdir) -> Run:
    t = config.train
    n_proc = jax.process_count()
    if int(t.batch_size) < 1 or int(t.batch_size) % max(n_proc, jax.device_count()):
        raise ConfigError(f"train.batch_size={t.batch_size} must be a multiple of the number of "
                         f"devices ({jax.device_count()}) and processes ({n_proc})")
    if int(t.seq_len) < 1:
        raise ConfigError(f"train.seq_len={t.seq_len} is invalid: must be >= 1")
    model_cfg = resolve_model_config(config)
    tokenizer = run_tokenizer(config, workdir)
    align = pipeline.resolve_align(config.data, model_cfg)
    if int(t.seq_len) % align:
        raise ConfigError(f"train.seq_len={t.seq_len} must be a multiple of the document "
                         f"alignment {align} (data.align, default the largest compress ratio)")
    if config.get("sharding"):     # a sharding preset: mesh, rules, sharded steps
        plan = make_plan(str(config.sharding), model_cfg, make_tx(config))
        return Run(config=config, model_cfg=plan.model_cfg, workdir=Path(workdir), mesh=plan.mesh,
                   batch_sharding=plan.batch_sharding, replicated=plan.replicated,
                   local_batch=int(t.batch_size) // n_proc, align=align, plan=plan,
                   tokenizer=tokenizer)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    P = jax.sharding.PartitionSpec
    return Run(config=config, model_cfg=model_cfg, workdir=Path(workdir), mesh=mesh,
               batch_sharding=jax.sharding.NamedSharding(mesh, P("data")),
               replicated=jax.sharding.NamedSharding(mesh, P()),
               local_batch=int(t.batch_size) // n_proc, align=align, tokenizer=tokenizer)


def make_tx(config):
    return opt_lib.make_optimizer(opt_lib.OptimizerConfig.from_dict(config.optimizer),
                                  make_schedule(config))


# Fields the data position (the iterator state a checkpoint stores) depends on: a resumed run
# with other values would continue from a position computed for other shapes or other data.
DATA_POSITION_FIELDS = ("train.batch_size", "train.seq_len", "data.source", "data.data_dir",
                        "data.text_key", "data.train_split", "data.val_fraction",
                        "data.stdlib_root", "data.align", "data.chunk_docs",
                        "data.synthetic_docs", "data.synthetic_length", "data.synthetic_needles",
                        "data.synthetic_filler", "data.seed")


def data_position(run: Run, corpus: dict) -> dict:
    """{field: value} of everything the data position depends on (DATA_POSITION_FIELDS, the
    resolved document alignment, the process count and the corpus fingerprint)."""
    c = run.config
    out = {}
    for name in DATA_POSITION_FIELDS:
        sec, key = name.split(".")
        v = c[sec].get(key)
        out[name] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    out["data.align"] = int(run.align)          # resolved (0 = the model's largest ratio)
    out["processes"] = jax.process_count()
    out["corpus.fingerprint"] = corpus.get("fingerprint")
    out["tokenizer.fingerprint"] = run.tokenizer.fingerprint if run.tokenizer else BYTES
    return out


def data_position_diff(saved_meta: dict, current: dict) -> list[str]:
    """'field: saved (checkpoint) vs current (this run)' for every data-position field that
    differs. Checkpoints written before the record existed are compared on what they hold."""
    saved = dict(saved_meta.get("data_position") or {})
    if not saved:        # older checkpoints: batch size, sequence length, corpus
        corpus = saved_meta.get("corpus") or {}
        saved = {"train.batch_size": saved_meta.get("batch_size"),
                 "train.seq_len": saved_meta.get("seq_len"),
                 "processes": saved_meta.get("processes"),
                 "corpus.fingerprint": corpus.get("fingerprint")}
    out = []
    for k in sorted(saved):
        if k not in current or saved[k] is None:
            continue
        if saved[k] != current[k]:
            out.append(f"{k}: {saved[k]!r} (checkpoint) vs {current[k]!r} (this run)")
    return out


def run_meta(run: Run, corpus: dict) -> dict:
    meta = {"model": run.model_cfg.to_dict(), "corpus": corpus,
            "seq_len": int(run.config.train.seq_len), "batch_size": int(run.config.train.batch_size),
            "processes": jax.process_count(), "devices": jax.device_count()}
    try:
        meta["data_position"] = data_position(run, corpus)
    except (KeyError, AttributeError):     # a config without a data section (tests)
        pass
    if run.plan is not None:
        meta["sharding"] = run.plan.metadata()
    return meta


def resolved_config_doc(run: Run, corpus: dict) -> dict:
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
    return doc


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_resolved_config(run: Run, corpus: dict, *, start_step: int | None = None) -> Path | None:
    """<workdir>/config.json: the resolved config, derived model facts and the corpus record,
    written atomically (temp file + rename). Every start also keeps a copy in
    <workdir>/config_history/<UTC time>_step<start>.json, so the configs a workdir has seen stay
    on record. Call it only once the run has been validated (it is what evaluate and generate
    read)."""
    if jax.process_index() != 0:
        return None
    run.workdir.mkdir(parents=True, exist_ok=True)
    doc = resolved_config_doc(run, corpus)
    if start_step is not None:
        doc["started"] = {"step": int(start_step),
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    text = json.dumps(doc, indent=2, default=str)
    hist = run.workdir / "config_history"
    hist.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, n = f"{stamp}_step{start_step if start_step is not None else 0}", 0
    while (hist / f"{name}{'.' + str(n) if n else ''}.json").exists():
        n += 1
    _atomic_write(hist / f"{name}{'.' + str(n) if n else ''}.json", text)
    p = run.workdir / "config.json"
    _atomic_write(p, text)
    return p


def keep_tokenizer_copy(run: Run) -> None:
    """<workdir>/tokenizer.json: a copy of the run's tokenizer file, so that the workdir alone
    decodes what its checkpoints generate (generate, evaluate, export)."""
    path = getattr(run.tokenizer, "path", None)
    if jax.process_index() != 0 or path is None:
        return
    dest = run.workdir / "tokenizer.json"
    if not dest.exists() or dest.resolve() != Path(path).resolve():
        _atomic_write(dest, Path(path).read_text())


def _gather_data_states(state: dict) -> list[dict]:
    """Every process's iterator position (the checkpoint stores all of them). Positions are
    JSON-able trees (grain's iterator state), exchanged as padded UTF-8 JSON."""
    if jax.process_count() == 1:
        return [state]
    data = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, sizes.reshape(-1))]


def _log(msg: str) -> None:
    """A line of the run's own output on stdout (process 0): what launchers and tests read
    (the resume and its warnings). Diagnostics go to `log` (absl's handler, --verbosity)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _info(msg: str, *args) -> None:
    if jax.process_index() == 0:
        log.info(msg, *args, stacklevel=2)      # the caller's line in the log prefix


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


# ---------------------------------------------------------------------------- validation
class EvaluationFailed(RuntimeError):
    """An evaluation during training failed; the checkpoint of that step was saved first."""


def _int_field(t, key: str, default, lo: int | None = None, what: str = "") -> int:
    v = t.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        try:
            if float(v) != int(v):
                raise ValueError
            v = int(v)
        except (TypeError, ValueError):
            raise ConfigError(f"train.{key}={v!r} is invalid: must be an integer{what}") from None
    if lo is not None and int(v) < lo:
        raise ConfigError(f"train.{key}={v} is invalid: must be >= {lo}{what}")
    return int(v)


def validate_train_config(config) -> None:
    """Every `train` / `schedule` / `optimizer` field the loop reads, checked before anything is
    built or written (ConfigError / OptimizerConfigError naming the field and what is allowed)."""
    t = config.train
    _int_field(t, "steps", 1, 1)
    _int_field(t, "log_every", 10, 1)
    _int_field(t, "eval_every", 0, 0, " (0 = no evaluation during training)")
    _int_field(t, "eval_batches", 1, 0, " (0 = the whole validation split)")
    _int_field(t, "checkpoint_every", 0, 0, " (0 = only at the end)")
    _int_field(t, "keep_checkpoints", 3, 1)
    sparse = _int_field(t, "sparse_start_step", 0, 0)
    warm = _int_field(t, "indexer_warmup_steps", 0, 0)
    if warm > sparse:
        raise ConfigError(f"train.indexer_warmup_steps={warm} is invalid: must be in "
                          f"[0, train.sparse_start_step={sparse}]")
    _int_field(t, "restore_step", -1, -1, " (-1 = the newest readable checkpoint)")
    _int_field(t, "init_from_step", -1, -1, " (-1 = the newest checkpoint of train.init_from)")
    _int_field(t, "inject_nan_at_step", -1, None)
    if float(t.get("peak_flops", 0.0)) < 0:
        raise ConfigError(f"train.peak_flops={t.peak_flops} is invalid: must be >= 0 (0 = auto)")
    make_tx(config)                       # schedule and optimizer fields


def _open_source(data_cfg, split: str, what: str):
    src = str(data_cfg.source)
    try:
        source = pipeline.make_source(data_cfg, split)
        n = len(source)
    except DataError:
        raise
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DataError(f"the {what} split {split!r} of data.source={src!r} cannot be read: "
                        f"{type(e).__name__}: {e}") from None
    if n == 0:
        raise DataError(f"the {what} split {split!r} of data.source={src!r} is empty (0 documents)")
    return source


# ---------------------------------------------------------------------------- training
def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Validate everything (config, schedule, data sources, checkpoint compatibility and
    readability), then start: only then is anything written to the workdir."""
    t_wall = time.perf_counter()
    t = config.train
    validate_train_config(config)
    run = setup(config, workdir)
    cfg = run.model_cfg
    pidx, pcount = jax.process_index(), jax.process_count()

    # Data: every source is opened and checked before the first step.
    train_src = _open_source(config.data, config.data.train_split, "train")
    corpus = {**pipeline.describe_source(train_src), "tokenizer": run.tokenizer.describe()}
    it = pipeline.TrainIterator(train_src, seq_len=int(t.seq_len), local_batch=run.local_batch,
                                align=run.align, seed=int(config.data.seed),
                                chunk=bool(config.data.chunk_docs), process_index=pidx,
                                process_count=pcount, tokenizer=run.tokenizer,
                                prefetch=int(config.data.get("prefetch", 2)))
    eval_every = int(t.eval_every)
    eval_batches = None
    if eval_every > 0:
        eval_src = _open_source(config.data, config.data.eval_split, "validation")
        try:
            eval_batches = pipeline.eval_batches(eval_src, seq_len=int(t.seq_len),
                                                 local_batch=run.local_batch, align=run.align,
                                                 num_batches=int(t.eval_batches),
                                                 process_index=pidx, process_count=pcount,
                                                 tokenizer=run.tokenizer)
        except (OSError, ValueError) as e:
            raise DataError(f"the validation split {config.data.eval_split!r} of data.source="
                            f"{config.data.source!r} cannot be read: {type(e).__name__}: {e}") from None
        if not eval_batches:
            raise DataError(f"the validation split {config.data.eval_split!r} of data.source="
                            f"{config.data.source!r} gives no batch of train.seq_len="
                            f"{t.seq_len} tokens; use another data.eval_split, or "
                            f"train.eval_every=0 to train without evaluation")

    # Model, optimizer, state; the checkpoint to resume from.
    schedule = make_schedule(config)
    tx = run.plan.tx if run.plan is not None else make_tx(config)
    model_fn = lambda: build_model(cfg, seed=int(config.seed))
    ckpt = ckpt_lib.Checkpointer(run.workdir, keep=int(t.keep_checkpoints),
                                 async_save=bool(t.async_checkpoint))
    meta = run_meta(run, corpus)
    total = int(t.steps)
    requested = int(t.get("restore_step", -1))
    allow_data = bool(t.get("allow_data_change", False))
    existing = ckpt.all_steps()
    if requested >= 0 and requested not in existing:
        ckpt.check_step(requested)
    # train.init_from: checked now (path, step, model config), read once the fresh state exists;
    # a workdir with checkpoints of its own resumes from them instead.
    init_src = None
    if str(t.get("init_from", "") or "") and not existing:
        init_src = ckpt_lib.resolve_init_source(str(t.init_from), meta["model"],
                                                step=int(t.get("init_from_step", -1)))
        meta["init_from"] = init_src.describe()
    unreadable, superseded, data_diff = [], [], []
    latest = None

    def check(step, saved_meta):
        nonlocal data_diff
        ckpt_lib.check_model(saved_meta, meta["model"], ckpt.directory.parent, step)
        data_diff = data_position_diff(saved_meta, meta.get("data_position", {}))
        if data_diff and not allow_data:
            raise ckpt_lib.CheckpointError(
                f"the checkpoint step {step} in {ckpt.directory} was saved with other data "
                f"settings; its data position does not apply to this run: " + "; ".join(data_diff)
                + ". Use the checkpoint's values, another --workdir, or "
                "--config.train.allow_data_change=true to resume anyway")
        if step > total:
            raise ConfigError(f"train.steps={total} is below the checkpoint step {step} in "
                              f"{ckpt.directory}: give train.steps > {step}, or "
                              f"--config.train.restore_step with a step <= {total}")

    if existing:
        graphdef, abstract = abstract_train_state(model_fn, tx)
        placed = (run.plan.abstract_state() if run.plan is not None
                  else ckpt_lib.with_sharding(abstract, run.replicated))
        latest, state, data_states, _, unreadable = ckpt_lib.restore_newest_readable(
            ckpt, placed, step=requested if requested >= 0 else None, check=check, warn=_log)
        superseded = [s_ for s_ in existing if s_ > latest and s_ not in unreadable]
        if len(data_states) != pcount or pidx >= len(data_states):
            raise ckpt_lib.CheckpointError(
                f"the checkpoint step {latest} holds the data positions of {len(data_states)} "
                f"process(es), this run has {pcount}")
        if data_diff:
            _log(f"[warning] train.allow_data_change: resuming step {latest} with other data "
                 f"settings ({'; '.join(data_diff)})")
        source_changed = any(not d.startswith(("train.batch_size", "train.seq_len"))
                             for d in data_diff)
        if not source_changed:
            it.restore(data_states[pidx])
    elif run.plan is not None:       # created directly in the preset's layout
        graphdef, state = run.plan.graphdef, run.plan.init_state(seed=int(config.seed))
    else:
        graphdef, state = init_train_state(model_fn(), tx)
        state = jax.device_put(state, run.replicated)
    if init_src is not None:
        state = with_init_weights(state, init_src, tx)
        _log(f"[init] model weights from {init_src.kind} {init_src.path}"
             + (f" step {init_src.step}" if init_src.step is not None else "")
             + "; fresh optimizer state, step 0")
    elif existing and str(t.get("init_from", "") or ""):
        _log(f"[init] train.init_from={t.init_from} is not used: the workdir has checkpoints "
             f"of its own (resuming)")
    start = int(jax.device_get(state.step))
    if start >= total:
        ckpt.close()
        line = (f"[done] nothing to train: the checkpoint is at step {start} = train.steps; "
                f"workdir {run.workdir} unchanged")
        return {"steps": total, "resumed_from": start, "compile_s": {}, "last_eval": {},
                "history": [], "workdir": str(run.workdir), "corpus": corpus, "line": line,
                "trained_steps": 0}

    # ---- validated: the run starts; from here on the workdir is written.
    if pidx == 0:
        moved = ckpt.quarantine(unreadable, into="checkpoints_unreadable")
        moved += ckpt.quarantine(superseded, into="checkpoints_superseded")
        for m in moved:
            _info("[checkpoint] moved %s aside to %s", m.name, m)
    write_resolved_config(run, corpus, start_step=start)
    keep_tokenizer_copy(run)
    writer = metrics_lib.MetricsWriter(run.workdir, enabled=pidx == 0,
                                       tensorboard=bool(t.get("tensorboard", True)))
    _info(f"[data] {corpus.get('source')}: {len(train_src)} train documents, fingerprint "
          f"{corpus.get('fingerprint')}; tokenizer {run.tokenizer.name} ({run.tokenizer.vocab_size} "
          f"tokens); rows of {t.seq_len}+1 tokens, documents aligned to {run.align}; global "
          f"batch {t.batch_size} ({run.local_batch} per process)")
    if latest is not None:
        writer.truncate_after(latest)
        _log(f"[resume] restored step {latest} from {ckpt.directory}")
    split = opt_lib.split_summary(state.params)
    if pidx == 0:
        _atomic_write(run.workdir / "optimizer_split.json", json.dumps(split, indent=1))
    _info("[optimizer] " + "; ".join(f"{lab}: {g['tensors']} tensors, {g['params']:,} parameters"
                                     for lab, g in split.items())
          + f" (per tensor: {run.workdir / 'optimizer_split.json'})")
    sparse_start = int(t.sparse_start_step)
    impl = cfg.attention_impl          # None = the platform's default
    lcfg = loss_config(config)
    warm = int(t.get("indexer_warmup_steps", 0))

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

    def run_eval(step, sparse):
        if os.environ.get("SPARSE_LM_FAULT_EVAL_ERROR"):      # test hook (tests/faults)
            raise OSError("injected evaluation failure (SPARSE_LM_FAULT_EVAL_ERROR)")
        res = evaluate_bpb(eval_fns[sparse], state.params, state.buffers, eval_batches, run)
        res["sparse"] = float(sparse)
        writer.write(step, res, kind="eval")
        return res

    # Throughput bookkeeping.
    tokens_per_step = int(t.batch_size) * int(t.seq_len)
    peak, peak_src = metrics_lib.peak_flops_per_device(float(t.get("peak_flops", 0.0)))
    fpt = {s: metrics_lib.train_flops_per_token(cfg, int(t.seq_len), s) for s in (False, True)}
    _info(f"[mfu] model FLOPs per token: sparse {fpt[True]:.3g}, dense warm-up {fpt[False]:.3g}; "
          f"peak {peak:.3g} FLOP/s per device ({peak_src})")

    log_every, ckpt_every = int(t.log_every), int(t.checkpoint_every)
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
            saved_now = (ckpt_every > 0 and done % ckpt_every == 0) or done == total
            if saved_now:        # before the evaluation: an evaluation failure costs no checkpoint
                ckpt.save(done, state, _gather_data_states(it.state()), meta, force=True)
            if eval_every > 0 and (done % eval_every == 0 or done == total):
                try:
                    last_eval = run_eval(done, done >= sparse_start)
                except Exception as e:       # noqa: BLE001 - re-raised after saving this step
                    if not saved_now:
                        ckpt.save(done, state, _gather_data_states(it.state()), meta, force=True)
                    raise EvaluationFailed(
                        f"the evaluation at step {done} failed ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}); checkpoint step {done} is saved: "
                        f"re-run to resume (train.eval_every=0 trains without evaluation)") from e
                if progress is not None:
                    progress.write(f"[eval] step {done}: validation {last_eval['bits_per_byte']:.3f} "
                                   f"bits/byte ({'sparse' if done >= sparse_start else 'dense'})")
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()       # waits for in-flight async saves: the last good checkpoint is complete
        writer.close()
        it.close()
    last = history[-1] if history else {}
    parts = [f"[done] steps {start}->{total} in {time.perf_counter() - t_wall:.1f} s"
             + (f" (resumed from step {start})" if start else "")]
    if last:
        parts.append(f"train {last.get('bits_per_byte', float('nan')):.3f} bits/byte")
    if last_eval:
        parts.append(f"validation {last_eval['bits_per_byte']:.3f} bits/byte")
    parts.append(f"checkpoints {ckpt_lib.list_steps(ckpt.directory)}")
    parts.append(f"workdir {run.workdir}")
    return {"steps": total, "resumed_from": start if start else None, "compile_s": compile_s,
            "last_eval": last_eval, "history": history, "workdir": str(run.workdir),
            "corpus": corpus, "line": "; ".join(parts), "trained_steps": total - start}


def with_init_weights(state: TrainState, source, tx) -> TrainState:
    """`state` (fresh, step 0) with the model variables of `source` (`resolve_init_source`) in
    the same dtypes and shardings, and the optimizer state initialised for them."""
    params, buffers = ckpt_lib.load_init_weights(source, state.params, state.buffers)
    opt_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return TrainState(params, buffers, opt_state, state.step)


# ---------------------------------------------------------------------------- restore for eval
def load_for_eval(config, workdir, step: int | None = None, *, log=None):
    """(run, model, step) of the latest readable (or the given) checkpoint in workdir, built on
    this host. Reads only: nothing is created in the workdir."""
    log = log or _log
    if not Path(workdir).is_dir():
        raise ckpt_lib.CheckpointError(f"the workdir {workdir} does not exist: give the --workdir "
                                       f"of a training run (python -m experiments.train "
                                       f"--workdir={workdir} ...)")
    run = setup(config, workdir)
    ckpt = ckpt_lib.Checkpointer(run.workdir, keep=1000, async_save=False)
    if not ckpt.all_steps():
        raise ckpt_lib.CheckpointError(f"no checkpoint in {ckpt.directory}: train first "
                                       f"(python -m experiments.train --workdir={workdir} ...)")
    model_dict = run.model_cfg.to_dict()
    tx = make_tx(config)
    graphdef, abstract = abstract_train_state(lambda: build_model(run.model_cfg), tx)
    placed = (run.plan.abstract_state() if run.plan is not None
              else ckpt_lib.with_sharding(abstract, run.replicated))
    step, state, _, _, _ = ckpt_lib.restore_newest_readable(
        ckpt, placed, step=step,
        check=lambda s, m: ckpt_lib.check_model(m, model_dict, run.workdir, s), warn=log)
    ckpt.close()
    return run, nnx.merge(graphdef, state.params, state.buffers), step


# Errors a launcher reports as one line, without a traceback: the user's input (exit status 2)
# and a run that started and failed (exit status 1).
USER_ERRORS = (ConfigError, DataError, OptimizerConfigError, ckpt_lib.CheckpointError,
               FileNotFoundError)
RUN_ERRORS = (TrainingDiverged, EvaluationFailed)
KNOWN_ERRORS = USER_ERRORS + RUN_ERRORS
