"""The distillation run: a student learns from one teacher per domain.

`distill(config, workdir)` runs `config.train.steps` updates of the student. Each step draws
`train.batch_size / len(domains)` prompts per domain (`distill.prompts`: a data source per
domain), makes the completions, scores them with the domain's teacher (`distill.teachers`: a
training workdir or a converted checkpoint per domain) and updates the student:

    distill.mode = "on_policy"   the current student samples (the cached `Decoder`, batched and
                                 jitted; it takes the student's new weights every step); loss:
                                 per-token reverse KL(student || teacher) on those samples
                                 (full vocabulary, or distill.topk: see sparse_lm.distill.losses)
                   "off_policy"  each domain's teacher samples; loss: forward KL(teacher ||
                                 student) on the teacher's samples (the baseline)
                   "sft"         no sampling: the data's continuation of each prompt; loss: the
                                 student's cross-entropy on it (multi-task SFT on the union)

The student starts from `train.init_from` (or fresh), keeps its own checkpoints in the workdir
(exact resume: prompts and sampling keys are pure functions of (seed, step)) and writes
metrics.jsonl + TensorBoard: loss, per-domain objective, reverse KL, sample length, teacher and
student log-prob of the completions. Everything (domains, teachers, prompt sources, the init
checkpoint) is checked before any compute; then `evaluate_domains` gives the final per-domain
validation bits per token.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sparse_lm.config import ConfigError, ModelConfig
from sparse_lm.distill.data import open_windows
from sparse_lm.distill.step import Objective, make_distill_step, make_teacher_forward
from sparse_lm.inference.decode import Decoder, generate, validate_sampling
from sparse_lm.model import build_model
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train import metrics as metrics_lib
from sparse_lm.train.losses import LN2, cross_entropy
from sparse_lm.train.loop import (TrainingDiverged, loss_config, make_schedule, make_tx, resolve_model_config,
                                  run_tokenizer, validate_train_config, with_init_weights)
from sparse_lm.train.steps import abstract_train_state, init_train_state

def _log(msg: str) -> None:
    print(msg, flush=True)


# Settings a resumed run must share with its checkpoints (what the rows of a step depend on).
RESUME_FIELDS = ("mode", "prompts", "teachers", "prompt_len", "new_tokens", "temperature",
                 "top_p", "topk", "stop_token")
MODES = {"on_policy": "reverse_kl", "off_policy": "forward_kl", "sft": "ce"}


@dataclasses.dataclass
class Teacher:
    domain: str
    cfg: ModelConfig
    graphdef: Any
    params: Any
    buffers: Any
    source: ckpt_lib.InitSource

    def model(self):
        return nnx.merge(self.graphdef, self.params, self.buffers)


def load_weights(path, *, step: int = -1, field: str) -> tuple[ModelConfig, Any, Any, Any, Any]:
    """(cfg, graphdef, params, buffers, source) of a training workdir (newest checkpoint, or
    `step`) or a converted checkpoint, in the dtypes its config gives."""
    source = ckpt_lib.checkpoint_source(path, step=step, field=field)
    cfg = ModelConfig.from_dict(source.model)
    graphdef, params, buffers = nnx.split(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param, ...)
    params, buffers = ckpt_lib.load_init_weights(source, params, buffers)
    return cfg, graphdef, params, buffers, source


# ---------------------------------------------------------------------------- validation
@dataclasses.dataclass
class Plan:
    """Everything `distill` checked before compute."""
    domains: list[str]
    mode: str
    objective: Objective
    prompt_len: int
    new_tokens: int
    rows: int                   # per domain per step
    temperature: float
    top_p: float
    stop_token: int
    teacher_sources: dict       # domain -> InitSource
    teacher_cfgs: dict          # domain -> ModelConfig
    prompts: dict               # domain -> WindowSource (train split)


def _domain_map(section, key: str) -> dict:
    value = section.get(key)
    d = value.to_dict() if hasattr(value, "to_dict") else dict(value or {})
    bad = [k for k, v in d.items() if not isinstance(v, str) or not v]
    if bad:
        raise ConfigError(f"distill.{key}.{bad[0]}={d[bad[0]]!r} is invalid: must be a "
                          f"non-empty path / source string")
    return d


def _int(section, key: str, lo: int) -> int:
    v = section.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ConfigError(f"distill.{key}={v!r} is invalid: must be an integer >= {lo}")
    return int(v)


def plan_run(config, student_cfg: ModelConfig, tokenizer) -> Plan:
    """Check the distill section, every teacher's config (vocabulary) and every prompt source;
    reads configs and documents only."""
    d = config.get("distill")
    if d is None:
        raise ConfigError("the config has no `distill` section (see configs/distill/*.py)")
    mode = str(d.get("mode", "on_policy"))
    if mode not in MODES:
        raise ConfigError(f"distill.mode={mode!r} is invalid: allowed values {tuple(MODES)}")
    prompts = _domain_map(d, "prompts")
    teachers = _domain_map(d, "teachers")
    if not prompts:
        raise ConfigError("distill.prompts is empty: give a prompt source per domain, e.g. "
                          "--config.distill.prompts.code=stdlib")
    domains = sorted(prompts)
    if mode != "sft":
        missing = [k for k in domains if k not in teachers]
        if missing:
            raise ConfigError(f"distill.teachers has no teacher for domain {missing[0]!r} (the "
                              f"domains of distill.prompts: {domains}; teachers: {sorted(teachers)})")
    extra = sorted(set(teachers) - set(domains))
    if extra:
        raise ConfigError(f"distill.teachers.{extra[0]} has no prompt source: distill.prompts "
                          f"names the domains {domains}")
    topk = _int(d, "topk", 0)
    if topk > student_cfg.vocab_size:
        raise ConfigError(f"distill.topk={topk} is invalid: must be in [0, vocab_size="
                          f"{student_cfg.vocab_size}] (0 = the full vocabulary)")
    if topk and mode != "on_policy":
        raise ConfigError(f"distill.topk={topk} applies to mode 'on_policy' (the reverse KL), "
                          f"not {mode!r}")
    prompt_len, new_tokens = _int(d, "prompt_len", 1), _int(d, "new_tokens", 1)
    temperature, top_p = float(d.get("temperature", 1.0)), float(d.get("top_p", 1.0))
    try:
        validate_sampling(temperature, top_p)
    except ValueError as e:
        raise ConfigError(f"distill.{e}") from None
    stop = int(d.get("stop_token", -1))
    if not -1 <= stop < student_cfg.vocab_size:
        raise ConfigError(f"distill.stop_token={stop} is invalid: must be -1 (none) or a token "
                          f"id in [0, {student_cfg.vocab_size})")
    batch = int(config.train.batch_size)
    if batch % len(domains):
        raise ConfigError(f"train.batch_size={batch} must be a multiple of the number of domains "
                          f"({len(domains)}: {domains}): every step has as many rows per domain")
    sources, cfgs = {}, {}
    for dom in domains if mode != "sft" else [k for k in domains if k in teachers]:
        field = f"distill.teachers.{dom}"
        src = ckpt_lib.checkpoint_source(teachers[dom], field=field)
        cfg = ModelConfig.from_dict(src.model)
        if cfg.vocab_size != student_cfg.vocab_size:
            raise ConfigError(f"{field}={teachers[dom]} has vocab_size={cfg.vocab_size}, the "
                              f"student {student_cfg.vocab_size}: teachers must share the "
                              f"student's vocabulary")
        sources[dom], cfgs[dom] = src, cfg
    window = prompt_len + (new_tokens if mode == "sft" else 0)
    windows = {dom: open_windows(config.data, prompts[dom], str(config.data.train_split),
                                 tokenizer, window, f"distill.prompts.{dom}") for dom in domains}
    return Plan(domains=domains, mode=mode, objective=Objective(MODES[mode], topk),
                prompt_len=prompt_len, new_tokens=new_tokens, rows=batch // len(domains),
                temperature=temperature, top_p=top_p, stop_token=stop, teacher_sources=sources,
                teacher_cfgs=cfgs, prompts=windows)


# ---------------------------------------------------------------------------- sampling
def completion_mask(completions: np.ndarray, stop_token: int) -> np.ndarray:
    """[B, N] tokens -> [B, N] bool: every token up to and including the first stop token
    (all of them when stop_token = -1 or the row has none)."""
    if stop_token < 0:
        return np.ones(completions.shape, bool)
    stops = np.cumsum(completions == stop_token, axis=1)
    return (stops - (completions == stop_token)) == 0


def sampling_seed(seed: int, step: int, domain: int) -> int:
    """The sampling seed of (run seed, step, domain): the same on resume."""
    return int(np.random.SeedSequence([seed, step, domain]).generate_state(1)[0])


def step_batch(plan: Plan, step: int, seed: int, sampler) -> dict:
    """The rows of one step: {"tokens" [B, P + N] int32, "mask" [B, N] bool}, domains in order.
    sampler(domain) -> the Decoder whose model writes that domain's completions (on/off-policy;
    called right before they are sampled)."""
    rows = []
    for i, dom in enumerate(plan.domains):
        windows = plan.prompts[dom].windows(np.random.default_rng([seed, step, i]), plan.rows)
        if plan.mode == "sft":
            rows.append(windows)
            continue
        new = generate(sampler(dom), list(windows), max_new_tokens=plan.new_tokens,
                       temperature=plan.temperature, top_p=plan.top_p,
                       seed=sampling_seed(seed, step, i), chunk_size=plan.prompt_len)
        rows.append(np.concatenate([windows, np.asarray(new, np.int32)], axis=1))
    tokens = np.concatenate(rows, axis=0)
    return {"tokens": tokens,
            "mask": completion_mask(tokens[:, plan.prompt_len:], plan.stop_token)}


# ---------------------------------------------------------------------------- evaluation
def make_bits_fn(graphdef):
    """jit((params, buffers, tokens [B, S]) -> (sum of next-token CE in nats, count))."""
    def fn(params, buffers, tokens):
        logits = nnx.merge(graphdef, params, buffers)(tokens[:, :-1], sparse=True)
        ce, n = cross_entropy(logits, tokens[:, 1:], jnp.ones(tokens[:, 1:].shape, bool))
        return ce * n, n
    return jax.jit(fn)


def evaluate_domains(model_parts, windows: dict, batch: int = 8) -> dict:
    """{domain: validation bits per token} of a model (graphdef, params, buffers) on fixed
    windows per domain ([n, S] arrays: `validation_windows`)."""
    graphdef, params, buffers = model_parts
    fn = make_bits_fn(graphdef)
    out = {}
    for dom, w in windows.items():
        total = n = 0.0
        for i in range(0, len(w), batch):
            s, c = jax.device_get(fn(params, buffers, jnp.asarray(w[i:i + batch])))
            total, n = total + float(s), n + float(c)
        out[dom] = total / max(n, 1.0) / LN2
    return out


def validation_windows(config, tokenizer, length: int, count: int, seed: int = 0) -> dict:
    """{domain: [count, length] windows of the validation split of its prompt source}."""
    prompts = _domain_map(config.distill, "prompts")
    return {dom: open_windows(config.data, prompts[dom], str(config.data.eval_split), tokenizer,
                              length, f"distill.prompts.{dom}").windows(
                                  np.random.default_rng([seed, 7, i]), count)
            for i, dom in enumerate(sorted(prompts))}


# ---------------------------------------------------------------------------- the run
# Jitted functions and Decoders by what their compilation depends on, so that the runs of one
# process (the recipe's three students, a resumed run in a test) compile each of them once.
# Bounded by the number of distinct (architecture, shapes, objective) combinations used.
_COMPILED: dict = {}


def _compiled(key, make):
    if key not in _COMPILED:
        _COMPILED[key] = make()
    return _COMPILED[key]


def decoder_for(graphdef, model) -> Decoder:
    """The process's Decoder of `graphdef`'s architecture, holding `model`'s weights."""
    dec = _COMPILED.get(("decoder", graphdef))
    if dec is None:
        return _compiled(("decoder", graphdef), lambda: Decoder(model))
    dec.load_weights(model)
    return dec


class Distiller:
    """One distillation step at a time for a checked `Plan`: sample the rows (the current
    student's cached Decoder, which takes its new weights every step; or each teacher's), score
    them with each domain's teacher (one jitted forward per teacher architecture, inference
    mode), update the student (`make_distill_step`, state donated). `update_key` names what the
    update's compilation depends on besides the architecture (the optimizer and schedule
    settings): runs with equal keys share one compiled update."""

    def __init__(self, plan: Plan, teachers: dict, graphdef, tx, schedule, loss_cfg, seed: int,
                 update_key=None):
        self.plan, self.teachers, self.graphdef, self.seed = plan, teachers, graphdef, seed
        make = lambda: make_distill_step(graphdef, tx, schedule, loss_cfg, plan.objective,
                                         prompt_len=plan.prompt_len)
        self.update = (make() if update_key is None else _compiled(
            ("update", graphdef, update_key, schedule, loss_cfg, plan.objective,
             plan.prompt_len), make))
        self.forwards = {tc.graphdef: _compiled(
            ("teacher", tc.graphdef, plan.prompt_len, plan.new_tokens),
            lambda g=tc.graphdef: make_teacher_forward(g, plan.prompt_len, plan.new_tokens))
            for tc in teachers.values()}
        self.off_policy = plan.mode == "off_policy"

    def score(self, tokens: jax.Array) -> jax.Array:
        """Teacher completion logits [B, N, V] of a step's rows, each domain by its teacher."""
        rows = self.plan.rows
        return jnp.concatenate([
            self.forwards[self.teachers[dom].graphdef](
                self.teachers[dom].params, self.teachers[dom].buffers,
                tokens[i * rows:(i + 1) * rows])
            for i, dom in enumerate(self.plan.domains)], axis=0)

    def __call__(self, state, step: int):
        """(new state, metrics on the host: `distill_step`'s, with the rows in `tokens`)."""
        def sampler(dom):        # called right before the domain's rows are sampled
            if self.off_policy:
                tc = self.teachers[dom]
                return decoder_for(tc.graphdef, tc.model())
            # on-policy: the student as it is now
            return decoder_for(self.graphdef, nnx.merge(self.graphdef, state.params, state.buffers))
        batch = {k: jnp.asarray(v)
                 for k, v in step_batch(self.plan, step, self.seed, sampler).items()}
        if len(self.teachers) == len(self.plan.domains):
            batch["teacher_logits"] = self.score(batch["tokens"])
        state, m = self.update(state, batch)
        return state, jax.device_get(m)


def update_key(config) -> str:
    """What a run's compiled update depends on besides the architecture, schedule, loss and
    objective (`Distiller`'s update_key): the optimizer settings."""
    return json.dumps(config.optimizer.to_dict(), sort_keys=True)


def load_teachers(plan: Plan) -> dict:
    """{domain: Teacher} of the plan's (checked) teacher sources."""
    out = {}
    for dom, src in plan.teacher_sources.items():
        cfg, g, p, b, _ = load_weights(src.path, step=src.step if src.kind == "workdir" else -1,
                                       field=f"distill.teachers.{dom}")
        out[dom] = Teacher(dom, cfg, g, p, b, src)
    return out


def distill(config, workdir) -> dict:
    """Validate, then run; returns a summary dict (steps, per-domain final validation, line)."""
    t_wall = time.perf_counter()
    validate_train_config(config)
    t = config.train
    if config.get("sharding"):
        raise ConfigError(f"sharding={config.sharding!r}: experiments.distill runs the student "
                          f"data parallel on one device only (no sharding presets yet); set "
                          f"--config.sharding=")
    if jax.device_count() > 1 or jax.process_count() > 1:
        raise ConfigError(f"experiments.distill runs on one device; this process sees "
                          f"{jax.device_count()} (set e.g. CUDA_VISIBLE_DEVICES to one device)")
    workdir = Path(workdir)
    student_cfg = resolve_model_config(config)
    tokenizer = run_tokenizer(config, workdir)
    plan = plan_run(config, student_cfg, tokenizer)
    d = config.distill
    eval_len, eval_count = _int(d, "eval_len", 2), _int(d, "eval_windows", 0)
    val = validation_windows(config, tokenizer, eval_len, eval_count) if eval_count else {}
    tx = make_tx(config)
    seed = int(config.seed)
    total = int(t.steps)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=int(t.keep_checkpoints), async_save=False)
    meta = {"model": student_cfg.to_dict(), "distill": json.loads(d.to_json_best_effort())}
    existing = ckpt.all_steps()
    init_src = None
    if existing:
        saved = ckpt.read_meta(existing[-1])
        ckpt_lib.check_model(saved, meta["model"], workdir, existing[-1])
        changed = [f"distill.{k}: {saved['distill'].get(k)!r} (checkpoint) vs {meta['distill'][k]!r}"
                   for k in RESUME_FIELDS if saved.get("distill", {}).get(k) != meta["distill"][k]]
        if changed:
            raise ckpt_lib.CheckpointError(
                f"the workdir {workdir} holds a distillation run with other settings (step "
                f"{existing[-1]}): " + "; ".join(changed) + ". Use another --workdir or the "
                "checkpoint's settings")
    elif str(t.get("init_from", "") or ""):
        init_src = ckpt_lib.resolve_init_source(str(t.init_from), meta["model"],
                                                step=int(t.get("init_from_step", -1)))
        meta["init_from"] = init_src.describe()

    # ---- checked: compute starts (teachers read, student built or restored)
    teachers = load_teachers(plan)
    model_fn = lambda: build_model(student_cfg, seed=seed)
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    latest = None
    if existing:
        graphdef, abstract = abstract_train_state(model_fn, tx)
        latest, state, _, _, _ = ckpt_lib.restore_newest_readable(
            ckpt, ckpt_lib.with_sharding(abstract, replicated), warn=_log)
        _log(f"[resume] restored step {latest} from {ckpt.directory}")
    else:
        graphdef, state = init_train_state(model_fn(), tx)
        if init_src is not None:
            state = with_init_weights(state, init_src, tx)
            _log(f"[init] student weights from {init_src.kind} {init_src.path}"
                 + (f" step {init_src.step}" if init_src.step is not None else ""))
    state = jax.device_put(state, replicated)    # where the step's outputs live: one compile
    start = int(jax.device_get(state.step))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(
        {"config": json.loads(config.to_json_best_effort()), "resolved_model": student_cfg.to_dict(),
         "teachers": {k: s.describe() for k, s in plan.teacher_sources.items()}}, indent=2))
    writer = metrics_lib.MetricsWriter(workdir, tensorboard=bool(t.get("tensorboard", True)))
    if latest is not None:
        writer.truncate_after(latest)

    run_step = Distiller(plan, teachers, graphdef, tx, make_schedule(config), loss_config(config),
                         seed, update_key=update_key(config))
    log_every, ckpt_every = int(t.log_every), int(t.checkpoint_every)
    acc, n_acc, history = {}, 0, []
    progress = (tqdm(total=total, initial=start, desc=f"distill:{plan.mode}", dynamic_ncols=True,
                     mininterval=1.0) if bool(t.get("progress", True)) else None)
    try:
        for step in range(start, total):
            state, host = run_step(state, step)
            if not np.isfinite(float(host["loss"])):
                raise TrainingDiverged(f"step {step}: non-finite loss {float(host['loss'])}; the last "
                                   f"checkpoint is step {ckpt.latest_step()}")
            rec = domain_metrics(plan, host)
            for k, v in rec.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            done = step + 1
            if done % log_every == 0 or done == total:
                out = {k: v / n_acc for k, v in acc.items()}
                writer.write(done, out)
                history.append({"step": done, **out})
                acc, n_acc = {}, 0
                if progress is not None:
                    progress.set_postfix({"loss": f"{out['loss']:.3f}", "lr": f"{out['lr']:.1e}"},
                                         refresh=False)
            if (ckpt_every > 0 and done % ckpt_every == 0) or done == total:
                ckpt.save(done, state, {"step": done}, meta, force=True)
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()
        writer.close()
    final = {}
    if val:
        final = evaluate_domains((graphdef, state.params, state.buffers), val)
        with metrics_lib.MetricsWriter(workdir, tensorboard=False) as writer:
            writer.write(total, {f"bits_per_token/{k}": v for k, v in final.items()}, kind="eval")
    line = (f"[done] distill:{plan.mode} steps {start}->{total} in "
            f"{time.perf_counter() - t_wall:.1f} s; "
            + ", ".join(f"{k} {v:.3f} bits/token" for k, v in final.items())
            + f"; workdir {workdir}")
    return {"steps": total, "resumed_from": start or None, "history": history,
            "validation": final, "line": line, "workdir": str(workdir), "state": state,
            "graphdef": graphdef}


def domain_metrics(plan: Plan, host: dict) -> dict:
    """Scalars of one step: loss, lr, grad_norm and per domain (mean over its rows) objective,
    reverse KL, sample length, teacher / student log-prob of the completions."""
    rec = {k: float(host[k]) for k in ("loss", "objective", "grad_norm", "update_norm", "lr")}
    names = {"objective_row": "objective", "reverse_kl_row": "kl", "length_row": "sample_len",
             "teacher_logprob_row": "teacher_logprob", "student_logprob_row": "student_logprob"}
    for i, dom in enumerate(plan.domains):
        rows = slice(i * plan.rows, (i + 1) * plan.rows)
        for key, name in names.items():
            if key in host:
                rec[f"{name}/{dom}"] = float(np.mean(host[key][rows]))
    return rec
