"""Retrieval by context length (issue 24): trained models asked for needles at 8K ... 1M.

    python -m experiments.retrieval --sparse-workdir=/tmp/retrieval/sparse \
        --dense-workdir=/tmp/retrieval/dense [--arms=sparse,dense] \
        [--contexts=8192,32768,131072,524288,1048576] [--depths=0.05,0.25,0.5,0.75,0.95] \
        [--chunk=1024] [--dense-chunk=256] [--budget-s=1500] [--dense-budget-s=600] \
        [--train-examples=64] [--stop-by=HH:MM] [--out=benchmarks/long_context]

The arms are the checkpoints of two training runs (configs/needle_lc.py and its dense twin
configs/needle_lc_dense.py, trained at 512 bytes). For each context, one prompt: the long-context
prompt (`experiments.long_context.build_prompt`: stdlib-corpus bytes with a needle
`# key XXXX = 123456` at each depth, distinct keys) without its trailing question, prefilled
once in chunks (`Decoder`, max_len = context), then every needle asked from that prefix cache
(`sparse_lm.inference.retrieval.ask_needles`: the question on a copy of the cache, 6 digits
decoded greedily, scored exact / per digit).

  sparse  the trained sparse model on its compressed cache (YaRN reaches 1M).
  dense   the trained dense model with its window widened to the context
          (`full_attention_config`, the same weights) over a full KV cache.

The wall-time budget is stated up front and enforced per arm: a context runs only while its
prefill, projected from the arm's last ones (`projected_s`: dense quadratic; sparse linear
after one cell, then by the power of the context the last two grew with, clamped to [1, 2]),
fits in what is left of `--budget-s` (sparse) / `--dense-budget-s` (dense), and ends before the
`--stop-by` clock time when given; a skipped cell is recorded with its projection and reason.
Wall time is recorded per cell. Before the grid, each arm's
accuracy at its training length (teacher forced, `needle_accuracy`, the training distribution:
3 needles in stdlib filler) is measured. Each arm's rows are merged into
`<out>/retrieval.json` (running one arm keeps the other's record); the plot is
`<out>/retrieval.png`.
"""
from __future__ import annotations

import calendar
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

from experiments.long_context import _git, build_prompt, timed_prefill
from sparse_lm.data.pipeline import stdlib_pool
from sparse_lm.inference import Decoder, full_attention_config, init_full_kv_cache
from sparse_lm.inference.retrieval import ask_needles, question, summarize
from sparse_lm.inference.sharded import with_config
from sparse_lm.train.config_check import UserError, run_main
from sparse_lm.train.evaluation import config_from_workdir, needle_accuracy
from sparse_lm.train.loop import load_for_eval

ARMS = ("sparse", "dense")
VALUE_LEN = 6
FLAGS = flags.FLAGS


def prompt_prefix(context: int, depths: list[float], seed: int):
    """(prefix tokens, needles): the long-context prompt of `context` tokens less room for a
    question and the decoded digits, its trailing question cut off (each needle is asked
    separately from the prefix's cache)."""
    q = len(question("abcd"))
    tokens, needles = build_prompt(context - VALUE_LEN, depths, seed)
    if len({n["key"] for n in needles}) != len(needles):
        raise UserError(f"--seed={seed}: the prompt's needles share a key; pick another seed")
    assert np.array_equal(tokens[-q:], question(needles[0]["key"]))
    return tokens[:-q], needles


def arm_model(arm: str, workdir: str):
    """(model, step, config) of an arm's newest checkpoint."""
    config = config_from_workdir(workdir)
    _, model, step = load_for_eval(config, workdir)
    kinds = set(model.cfg.layer_kinds)
    if (arm == "dense") != (kinds == {"swa"}):
        raise UserError(f"--{arm}-workdir={workdir} holds a model with layers {sorted(kinds)}: "
                        f"the {arm} arm needs " + ("window-only layers (configs/needle_lc_dense.py)"
                                                   if arm == "dense" else "compressed layers"))
    return model, step, config


def train_record(workdir: str) -> dict:
    """The training run's last logged train record: step, loss, cross-entropy, bits/byte."""
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()
            if x.strip()]
    last = [r for r in rows if r.get("kind") == "train"][-1]
    return {k: last[k] for k in ("step", "loss", "ce", "bits_per_byte")}


def run_cell(arm, model, context, depths, *, chunk, seed, bar) -> dict:
    """One (arm, context) cell: prefill the prefix once, ask every needle, score."""
    if arm == "dense":
        cfg = full_attention_config(model.cfg, window=context)
        dec = Decoder(with_config(model, cfg))
        cache = init_full_kv_cache(cfg, 1, context)
    else:
        dec = Decoder(model)
        cache = dec.init_cache(1, context)
    prefix, needles = prompt_prefix(context, depths, seed)
    t0 = time.perf_counter()
    _, cache, pre = timed_prefill(dec, cache, prefix, chunk, bar)
    t1 = time.perf_counter()
    rows = ask_needles(dec, cache, needles)
    ask_s = time.perf_counter() - t1
    return {"arm": arm, "context": context, "chunk": chunk, "needles": rows, **summarize(rows),
            "prefill_wall_s": pre["prefill_wall_s"], "prefill_s": pre["prefill_s"],
            "compile_s": pre["compile_s"], "prefill_tokens_per_s": pre["prefill_tokens_per_s"],
            "ask_s": ask_s, "wall_s": time.perf_counter() - t0}


def projected_s(arm: str, cells: list[dict], context: int) -> float | None:
    """The prefill seconds of `context` projected from the arm's last cell; None before the
    first. Dense: quadratic (its short cells grow near-linearly while compile and projections
    dominate, so a fitted power underestimates the long ones). Sparse: linear after one cell,
    then the power of the context the last two prefills grew with, clamped to [1, 2]."""
    if not cells:
        return None
    last = cells[-1]
    if arm == "dense":
        power = 2.0
    elif len(cells) == 1:
        power = 1.0
    else:
        prev = cells[-2]
        power = float(np.clip(np.log(last["prefill_s"] / prev["prefill_s"])
                              / np.log(last["context"] / prev["context"]), 1.0, 2.0))
    return last["prefill_s"] * (context / last["context"]) ** power


def run_arm(arm, workdir, contexts, depths, *, chunk, budget_s, seed, train_examples,
            progress, stop_by=None, save=None, log=print) -> dict:
    """The arm's record: its training figures, then its cells in context order within the
    budget and, when stop_by (seconds since the epoch) is given, only while the cell's projected
    prefill ends before it; save(record) is called after each cell (a cut run keeps what it
    measured)."""
    model, step, config = arm_model(arm, workdir)
    seq = int(config.data.synthetic_length)
    needles = int(config.data.get("synthetic_needles", 1))
    trained = needle_accuracy(model, [seq], train_examples, sparse=True, pool=stdlib_pool(),
                              seed=seed + 1, needles=needles)[seq]
    log(f"[{arm}] step {step}: at the training length {seq}, {needles} needles: exact "
        f"{trained['exact']:.3f}, digits {trained['bytes']:.3f} (teacher forced, "
        f"{train_examples} examples)")
    out = {"workdir": workdir, "checkpoint_step": step, "budget_s": budget_s,
           "train_config": {k: config.data[k] for k in ("source", "synthetic_length",
                                                         "synthetic_needles", "synthetic_filler")},
           "training": {**train_record(workdir), "at_train_length": {
               "length": seq, "needles": needles, "examples": train_examples, **trained}},
           "cells": [], "skipped": []}
    spent = 0.0
    for context in contexts:
        proj = projected_s(arm, out["cells"], context)
        over_budget = proj is not None and spent + proj > budget_s
        too_late = proj is not None and stop_by is not None and time.time() + proj > stop_by
        if over_budget or too_late:
            why = "budget" if over_budget else "stop_by"
            out["skipped"].append({"context": context, "projected_prefill_s": proj,
                                   "spent_s": spent, "reason": why})
            log(f"[{arm}] {context}: skipped, prefill projected {proj:.0f} s: past the "
                + (f"{budget_s - spent:.0f} s left of --{'dense-' if arm == 'dense' else ''}"
                   "budget-s" if over_budget else "--stop-by clock time"))
            continue
        bar = None
        if progress:
            from tqdm import tqdm     # only the progress bar needs it
            bar = tqdm(total=context - VALUE_LEN - len(question("abcd")), unit="tok",
                       desc=f"{arm} {context >> 10}K", unit_scale=True, file=sys.stderr,
                       dynamic_ncols=True)
        cell = run_cell(arm, model, context, depths, chunk=chunk, seed=seed, bar=bar)
        if bar is not None:
            bar.close()
        spent += cell["wall_s"]
        out["cells"].append(cell)
        out["spent_s"] = spent
        if save is not None:
            save(out)
        log(f"[{arm}] {context}: exact {cell['exact']:.2f}, digits {cell['digits']:.2f} "
            f"(" + ", ".join(f"{r['depth']}: {r['decoded']!r}/{r['value']}"
                             for r in cell["needles"]) + f"); wall {cell['wall_s']:.0f} s")
    out["spent_s"] = spent
    return out


# ------------------------------------------------------------------------------ output
def plot(record: dict, path: Path) -> Path:
    import matplotlib     # only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = record["arms"]
    fig, axes = plt.subplots(1, 1 + len(arms), figsize=(5 + 4.2 * len(arms), 4))
    a = axes[0]
    for i, (arm, r) in enumerate(sorted(arms.items())):
        xs = [c["context"] for c in r["cells"]]
        a.plot(xs, [c["digits"] for c in r["cells"]], "o-", color=f"C{i}",
               label=f"{arm}: digits right")
        a.plot(xs, [c["exact"] for c in r["cells"]], "s--", color=f"C{i}",
               label=f"{arm}: exact match")
        t = r["training"]["at_train_length"]
        a.plot([t["length"]], [t["bytes"]], "*", ms=11, color=f"C{i}",
               label=f"{arm} at its training length")
    a.axhline(0.1, color="grey", ls=":", lw=1, label="chance per digit (0.1)")
    a.set_xscale("log", base=2)
    a.set_ylim(-0.03, 1.03)
    a.set_xlabel("context (tokens)")
    a.set_ylabel("accuracy (mean over depths)")
    a.set_title("needle retrieval by context length")
    a.legend(fontsize=7)
    for ax, (arm, r) in zip(axes[1:], sorted(arms.items())):
        cells = r["cells"]
        if not cells:
            ax.set_axis_off()
            continue
        depths = [n["depth"] for n in cells[0]["needles"]]
        grid = np.array([[n["digits"] for n in c["needles"]] for c in cells]).T
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(cells)), [f"{c['context'] >> 10}K" for c in cells])
        ax.set_yticks(range(len(depths)), [str(d) for d in depths])
        for (y, x), v in np.ndenumerate(grid):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if v < 0.5 else "k")
        ax.set_xlabel("context")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{arm}: digits right per needle")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ flags / main
def _define():
    flags.DEFINE_string("sparse-workdir", None, "Training workdir of the sparse arm.")
    flags.DEFINE_string("dense-workdir", None, "Training workdir of the dense arm.")
    flags.DEFINE_string("arms", "sparse,dense", f"Comma-separated arms from {ARMS}.")
    flags.DEFINE_string("contexts", "8192,32768,131072,524288,1048576",
                        "Context lengths, comma-separated, ascending.")
    flags.DEFINE_string("depths", "0.05,0.25,0.5,0.75,0.95", "Needle depths in [0, 1].")
    flags.DEFINE_integer("chunk", 1024, "Prefill chunk length of the sparse arm.")
    flags.DEFINE_integer("dense-chunk", 256, "Prefill chunk length of the dense arm.")
    flags.DEFINE_float("budget-s", 1500.0, "Wall-time budget of the sparse arm's cells.")
    flags.DEFINE_float("dense-budget-s", 600.0, "Wall-time budget of the dense arm's cells.")
    flags.DEFINE_integer("train-examples", 64, "Examples scored at the training length.")
    flags.DEFINE_string("stop-by", "", "UTC clock time HH:MM (today): a cell runs only if its "
                        "projected prefill ends before it; '' = no limit.")
    flags.DEFINE_string("out", "benchmarks/long_context", "Directory of retrieval.json / .png.")
    flags.DEFINE_integer("seed", 0, "Needle seed.")
    flags.DEFINE_bool("progress", True, "Show a progress bar of the prefill position.")
    for name in ("sparse-workdir", "dense-workdir", "dense-chunk", "budget-s", "dense-budget-s",
                 "train-examples", "stop-by"):
        flags.DEFINE_alias(name.replace("-", "_"), name)


def _numbers(name: str, text: str, kind):
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise UserError(f"--{name}={text!r} is invalid: comma-separated {kind.__name__}s")


def check_args(a) -> dict:
    """Validated settings from the parsed flags (UserError naming the flag otherwise)."""
    arms = [x for x in a.arms.split(",") if x]
    if not arms or any(x not in ARMS for x in arms):
        raise UserError(f"--arms={a.arms!r} is invalid: a comma-separated subset of {ARMS}")
    for arm in arms:
        if not getattr(a, f"{arm}_workdir"):
            raise UserError(f"--{arm}-workdir is required for --arms={a.arms}: the training "
                            f"run of the {arm} arm")
    contexts = _numbers("contexts", a.contexts, int)
    if not contexts or contexts != sorted(contexts) or contexts[0] < 256:
        raise UserError(f"--contexts={a.contexts!r} is invalid: ascending integers >= 256")
    if contexts[-1] > 1 << 20:
        raise UserError(f"--contexts={a.contexts!r} exceeds lc_small's max_context=1048576")
    depths = _numbers("depths", a.depths, float)
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--depths={a.depths!r} is invalid: numbers in [0, 1]")
    for name, v in (("chunk", a.chunk), ("dense-chunk", a.dense_chunk),
                    ("train-examples", a.train_examples)):
        if v < 1:
            raise UserError(f"--{name}={v} is invalid: must be an integer >= 1")
    for name, v in (("budget-s", a.budget_s), ("dense-budget-s", a.dense_budget_s)):
        if v <= 0:
            raise UserError(f"--{name}={v} is invalid: must be > 0")
    stop_by = None
    if a.stop_by:
        try:
            hh, mm = (int(x) for x in a.stop_by.split(":"))
            if not (0 <= hh < 24 and 0 <= mm < 60):
                raise ValueError
        except ValueError:
            raise UserError(f"--stop-by={a.stop_by!r} is invalid: a UTC clock time HH:MM")
        day = time.gmtime()
        stop_by = calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, hh, mm, 0))
    return {"arms": arms, "contexts": contexts, "depths": depths, "stop_by": stop_by}


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    a = FLAGS
    s = check_args(a)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "retrieval.json"
    record = json.loads(path.read_text()) if path.exists() else {
        "experiment": "retrieval", "model": "lc_small", "arms": {}}
    for arm in s["arms"]:
        budget = a.budget_s if arm == "sparse" else a.dense_budget_s
        print(f"[{arm}] contexts {s['contexts']}, depths {s['depths']}: wall budget "
              f"{budget:.0f} s for the cells")
        run = {"git_commit": _git(), "command": " ".join(["python -m experiments.retrieval"]
                                                        + sys.argv[1:]),
               "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

        def save(r, arm=arm, run=run):
            record["arms"][arm] = {**r, **run}
            path.write_text(json.dumps(record, indent=1))
        r = run_arm(arm, getattr(a, f"{arm}_workdir"), s["contexts"], s["depths"],
                    chunk=a.chunk if arm == "sparse" else a.dense_chunk, budget_s=budget,
                    seed=a.seed, train_examples=a.train_examples, progress=a.progress,
                    stop_by=s["stop_by"], save=save)
        save({**r, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    png = plot(record, out_dir / "retrieval.png")
    print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    _define()
    run_main(main, config_flag=None)
