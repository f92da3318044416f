"""The end-to-end distillation recipe on offline data (configs/distill/recipe.py).

    python -m experiments.distill_recipe --root=runs/distill_recipe \
        [--base_steps=300 --specialist_steps=150 --student_steps=100] \
        [--record=benchmarks/distill/recipe.json] [--students_tag=_150] \
        [--modes=on_policy,off_policy,sft --topk=0]

1. docs corpus: the docstrings and comments of the stdlib, one JSONL line per file;
2. base: the recipe model trained on the stdlib corpus (experiments.train's loop);
3. specialists: the base fine-tuned (train.init_from) on each domain: code (stdlib), docs
   (the JSONL corpus), retrieval (synthetic associative recall);
4. students, each from the base with the same steps, rows, prompts and seed:
   on_policy (reverse KL on the student's samples), off_policy (forward KL on the teachers'
   samples), sft (cross-entropy on the data's continuations: multi-task SFT on the union);
5. the per-domain validation table (bits per token on fixed windows of each domain's
   validation split) of the base, every specialist and every student, written to --record with
   the wall time of each stage.

Every stage is resumable: a finished stage is read back, an interrupted one resumes from its
checkpoints. The runs share a persistent compilation cache under --root.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from sparse_lm.train.config_check import run_main

_ROOT = flags.DEFINE_string("root", "runs/distill_recipe", "Directory of every run of the recipe.")
_BASE = flags.DEFINE_integer("base_steps", 300, "Steps of the base model on the stdlib corpus.")
_SPEC = flags.DEFINE_integer("specialist_steps", 150, "Fine-tuning steps of each specialist.")
_STUDENT = flags.DEFINE_integer("student_steps", 100, "Steps of each student (all three modes).")
_RECORD = flags.DEFINE_string("record", "benchmarks/distill/recipe.json", "JSON record to write.")
_MODES = flags.DEFINE_list("modes", "on_policy,off_policy,sft", "The students to train.")
_TOPK = flags.DEFINE_integer("topk", 0, "On-policy students: reverse KL over the student's top-k "
                             "(renormalised); 0 = the full vocabulary.")
_TAG = flags.DEFINE_string("students_tag", "", "Suffix of the students' workdirs: other student "
                           "settings (e.g. --student_steps) beside the same base and specialists.")

MODES = ("on_policy", "off_policy", "sft")


def write_docs_corpus(path: Path, val_fraction: float) -> int:
    """The docs domain: docstrings + comments of every stdlib file (>= 200 characters)."""
    from sparse_lm.data.stdlib_corpus import StdlibCorpus     # after flag parsing (jax-free)
    from sparse_lm.distill.data import docstrings_and_comments
    n = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for split in ("train", "validation"):
            corpus = StdlibCorpus(split, val_fraction=val_fraction)
            for i in range(len(corpus)):
                text = docstrings_and_comments(bytes(corpus[i]))
                if len(text) >= 200:
                    f.write(json.dumps({"text": text}) + "\n")
                    n += 1
    os.replace(tmp, path)
    return n


def main(argv):
    del argv
    import jax                       # after flag parsing: jax starts here
    from configs.distill import recipe
    from sparse_lm.distill.loop import distill, evaluate_domains, load_weights, validation_windows
    from sparse_lm.train.loop import run_tokenizer, train

    root = Path(_ROOT.value)
    root.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str((root / "jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    t0 = time.perf_counter()
    stages = {}

    def stage(name, fn):
        t = time.perf_counter()
        out = fn()
        stages[name] = round(time.perf_counter() - t, 1)
        print(f"[recipe] {name}: {stages[name]} s", flush=True)
        return out

    def config(steps, lr, **train):
        c = recipe.get_config()
        c.distill.prompts = recipe.domain_sources(str(root))
        c.distill.teachers = {d: str(root / f"specialist_{d}") for d in recipe.DOMAINS}
        c.train.update(dict(steps=steps, seq_len=128, checkpoint_every=steps, progress=False,
                            **train))
        c.schedule.update(dict(peak_lr=lr, warmup_steps=max(1, steps // 10),
                               decay_steps=steps - max(1, steps // 10), final_lr=lr / 10))
        return c

    docs = root / "docstrings.jsonl"
    if not docs.exists():
        stage("docs_corpus", lambda: write_docs_corpus(docs, 0.05))
    base = config(_BASE.value, 3e-3, init_from="")
    base.data.source = "stdlib"
    stage("base", lambda: train(base, root / "base"))
    sources = recipe.domain_sources(str(root))
    for dom in recipe.DOMAINS:
        c = config(_SPEC.value, 1e-3, init_from=str(root / "base"))
        c.data.source = sources[dom]
        stage(f"specialist_{dom}", lambda c=c, dom=dom: train(c, root / f"specialist_{dom}"))
    modes = list(_MODES.value)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise app.UsageError(f"--modes={','.join(modes)}: {bad[0]!r} is not one of {MODES}")
    results = {}
    for mode in modes:
        c = config(_STUDENT.value, 1e-3, init_from=str(root / "base"))
        c.distill.mode = mode
        c.distill.topk = _TOPK.value if mode == "on_policy" else 0
        results[mode] = stage(f"student_{mode}", lambda c=c, mode=mode: distill(
            c, root / f"student_{mode}{_TAG.value}"))

    # The table: every model on the same validation windows of every domain.
    c = config(_STUDENT.value, 1e-3)
    tokenizer = run_tokenizer(c, root)
    val = validation_windows(c, tokenizer, int(c.distill.eval_len), int(c.distill.eval_windows))
    table = {}

    def evaluate_all():
        for name in ["base"] + [f"specialist_{d}" for d in recipe.DOMAINS]:
            _, g, p, b, _ = load_weights(root / name, field=name)
            table[name] = evaluate_domains((g, p, b), val)
        for mode in modes:
            table[f"student_{mode}"] = results[mode]["validation"]
    stage("evaluation", evaluate_all)
    spec = {d: table[f"specialist_{d}"][d] for d in recipe.DOMAINS}
    gap = {name: {d: (row[d] - spec[d]) / spec[d] for d in recipe.DOMAINS}
           for name, row in table.items()}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    record = {
        "what": "per-domain validation bits per token (fixed windows of each domain's "
                "validation split) of the base, each specialist and the three students",
        "command": " ".join(["python -m experiments.distill_recipe"] + sys.argv[1:]),
        "commit": commit, "dirty_worktree": dirty,
        "steps": {"base": _BASE.value, "specialist": _SPEC.value, "student": _STUDENT.value},
        "student_config": json.loads(config(_STUDENT.value, 1e-3).to_json_best_effort()),
        "domains": dict(sources),
        "validation": {"windows_per_domain": int(c.distill.eval_windows),
                       "window_tokens": int(c.distill.eval_len)},
        "bits_per_token": table,
        "relative_gap_to_own_specialist": gap,
        "student_final_train_metrics": {m: (results[m]["history"] or [{}])[-1] for m in modes},
        "on_policy_topk": _TOPK.value,
        "wall_s": {"stages": stages, "total": round(time.perf_counter() - t0, 1)},
        "runtime": {"jax": jax.__version__, "backend": jax.default_backend(),
                    "cpu_count": os.cpu_count()},
    }
    out = Path(_RECORD.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[recipe] wrote {out}; total {record['wall_s']['total']} s", flush=True)
    for name, row in table.items():
        print(f"  {name:22s} " + "  ".join(f"{d} {row[d]:.3f}" for d in recipe.DOMAINS),
              flush=True)


if __name__ == "__main__":
    from sparse_lm.train.loop import USER_ERRORS     # imported here: --help does not start jax
    run_main(main, config_flag=None, user_errors=USER_ERRORS)
