"""Training throughput of the sparse model against the same model with dense attention, by
sequence length (CPU by default). A benchmark script: prints a table and writes JSON.

    python -m experiments.bench_train [--seq_lens=1024,2048,4096,8192,16384] [--steps=2]
                                      [--tokens_per_step=16384] [--out=bench_train.json]
                                      [--plot=bench_train.png]
    python -m experiments.bench_train --from_json=benchmarks/train_cpu.json [--plot=...]  # redraw

Arms (same parameters, same data, same optimizer step; only attention differs):
  sparse  the model as trained: window W + top-k CSA entries + all visible HCA entries
          (implementation "xla": banded window, gathered top-k rows).
  dense   every query attends every earlier token of its row (sliding_window = S) and CSA
          attends every visible compressed entry (sparse=False); HCA is unchanged: the model's
          "reference" implementation (`ops.attention.attention_reference`), which goes causally
          in query chunks of 1024 (keys up to the chunk's end only, so ~S^2/2 work, as a causal
          flash kernel would), each chunk rematerialised in the backward pass so 16K fits in
          memory (its attention therefore costs ~4 forward passes instead of 3).
Both arms keep everything else of the model (the indexer and its KL target are computed in
both: they are part of the training step; the dense arm computes the dense-stage form, KL over
every visible entry, the sparse arm the sparse-stage form, KL over the selected entries).
  dense_noindex  (optional) the dense arm without the indexer's scores and KL objective (the
          indexer is replaced for the run by one that returns no entries, `indexer_removed`): a
          pure dense-attention step, the strictest baseline.

Tokens per step are constant (batch = tokens_per_step / S), so seconds per token compare
directly across lengths. Compilation is excluded; the median of `steps` timed steps is reported,
as wall-clock time and as the process's CPU time (user + system, all threads): on a shared
machine the CPU time is the steadier measure of the work done, the wall time the one a user sees
on an idle one.
"""
from __future__ import annotations

import contextlib
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from sparse_lm.model import build_model
from sparse_lm.model.indexer import Indexer
from sparse_lm.train.loop import loss_config, make_schedule, make_tx, resolve_model_config
from sparse_lm.train.steps import init_train_state, make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Model/optimizer config.")
_SEQ = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per arm and length (median reported).")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 16384, "Tokens per optimizer step.")
_ARMS = flags.DEFINE_list("arms", ["sparse", "dense"], "Arms to run.")
_OUT = flags.DEFINE_string("out", "bench_train.json", "JSON output path.")
_PLOT = flags.DEFINE_string("plot", "", "PNG path for cost per token against S (both arms, "
                            "wall and CPU time); empty = no plot.")
_FROM_JSON = flags.DEFINE_string("from_json", "", "Redraw the tables and the plot from this "
                                 "JSON (no timing).")
_CHUNK = 1024


@contextlib.contextmanager
def indexer_removed():
    """The CSA indexer returns no scores and no picks: no indexer objective is computed."""
    original = Indexer.__call__

    def empty(self, x, *args, **kwargs):
        return (jnp.zeros(x.shape[:2] + (0,), jnp.float32),
                jnp.zeros(x.shape[:2] + (0,), jnp.int32), {})

    Indexer.__call__ = empty
    try:
        yield
    finally:
        Indexer.__call__ = original


def time_arm(config, model_cfg, seq: int, arm: str, steps: int, tokens: int) -> dict:
    batch = max(1, tokens // seq)
    if arm not in ("sparse", "dense", "dense_noindex"):
        raise ValueError(f"--arms: unknown arm {arm!r}; allowed: sparse, dense, dense_noindex")
    dense = arm != "sparse"
    cfg = model_cfg.replace(sliding_window=seq) if dense else model_cfg
    config = config.copy_and_resolve_references()
    config.train.steps = 1000
    config.schedule.warmup_steps, config.schedule.decay_steps = 10, 100
    tx = make_tx(config)
    graphdef, state = init_train_state(build_model(cfg, seed=0), tx)
    step = make_train_step(graphdef, tx, make_schedule(config), loss_config(config),
                           sparse=not dense, implementation="reference" if dense else "xla")
    rng = np.random.default_rng(seq)
    data = {"tokens": jnp.asarray(rng.integers(0, 256, (batch, seq + 1)), jnp.int32),
            "segment_ids": jnp.ones((batch, seq + 1), jnp.int32)}
    with contextlib.ExitStack() as ctx:
        if arm == "dense_noindex":
            ctx.enter_context(indexer_removed())
        t0 = time.perf_counter()
        state, m = step(state, data)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times, cpus = [], []
        for _ in range(steps):
            c0, t0 = _cpu_s(), time.perf_counter()
            state, m = step(state, data)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
            cpus.append(_cpu_s() - c0)
    med, cpu = statistics.median(times), statistics.median(cpus)
    n = batch * seq
    return {"seq_len": seq, "arm": arm, "batch": batch, "tokens": n,
            "step_s": med, "tokens_per_s": n / med, "us_per_token": 1e6 * med / n,
            "cpu_s": cpu, "tokens_per_cpu_s": n / cpu, "cpu_us_per_token": 1e6 * cpu / n,
            "compile_s": compile_s, "loss": float(m["loss"]), "times": times, "cpu_times": cpus}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plot_rows(rows, path):
    """us per token (wall and CPU) against S, log-log, both arms, with the sparse/dense ratio."""
    import matplotlib          # optional package, needed only for --plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (unit, per) in zip(axes, (("wall", "us_per_token"), ("CPU", "cpu_us_per_token"))):
        for arm, style in (("dense", "s-"), ("dense_noindex", "^--"), ("sparse", "o-")):
            pts = sorted((r["seq_len"], r[per]) for r in rows if r["arm"] == arm)
            if pts:
                ax.plot(*zip(*pts), style, label=arm)
        by = {(r["seq_len"], r["arm"]): r for r in rows}
        for (s, arm), r in by.items():
            if arm == "sparse" and (s, "dense") in by:
                ax.annotate(f"{by[(s, 'dense')][per] / r[per]:.1f}x", (s, r[per]),
                            textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(f"{unit} microseconds per training token")
        ax.set_title(f"train step cost per token ({unit} time)")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows, arms):
    """Print the wall and CPU tables and return the slopes of cost per token against S."""
    by = {(r["seq_len"], r["arm"]): r for r in rows}
    seqs = sorted({r["seq_len"] for r in rows})
    slopes = {}
    for unit, rate, per in (("wall", "tokens_per_s", "us_per_token"),
                            ("cpu", "tokens_per_cpu_s", "cpu_us_per_token")):
        print(f"\n  [{unit} time]  S   sparse tok/s   dense tok/s   sparse/dense   "
              f"us/token sparse    dense")
        for s in seqs:
            sp, de = by.get((s, "sparse")), by.get((s, "dense"))
            nan = float("nan")
            ratio = sp[rate] / de[rate] if sp and de else nan
            print(f"  {s:13d}  {sp[rate] if sp else nan:12.0f}  {de[rate] if de else nan:12.0f}  "
                  f"{ratio:12.2f}x  {sp[per] if sp else nan:14.1f}  {de[per] if de else nan:8.1f}")
        for s in seqs:
            sp, de = by.get((s, "sparse")), by.get((s, "dense_noindex"))
            if sp and de:
                print(f"  {s:13d}  sparse / dense_noindex: {sp[rate] / de[rate]:.2f}x "
                      f"(dense_noindex {de[rate]:.0f} tok/s, {de[per]:.1f} us/token)")
        for arm in arms:
            pts = [(s, by[(s, arm)][per]) for s in seqs if (s, arm) in by]
            if len(pts) >= 2:
                x, y = np.asarray(pts, float).T
                lin = np.polyfit(x / 1024, y, 1)[0]                   # us/token per 1K of S
                loglog = np.polyfit(np.log(x), np.log(y), 1)[0]
                slopes[f"{arm}_{unit}"] = {"us_per_token_per_1k": float(lin),
                                           "loglog_exponent": float(loglog)}
                print(f"  {arm:6s} ({unit}): cost per token grows {lin:8.2f} us per 1K tokens "
                      f"of S (log-log exponent {loglog:.2f})")
    return slopes


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if _FROM_JSON.value:
        with open(_FROM_JSON.value) as f:
            saved = json.load(f)
        report(saved["rows"], sorted({r["arm"] for r in saved["rows"]}))
        if _PLOT.value:
            plot_rows(saved["rows"], _PLOT.value)
            print(f"[bench] wrote {_PLOT.value}")
        return
    config = _CONFIG.value
    model_cfg = resolve_model_config(config)
    print(f"[bench] backend {jax.default_backend()} ({jax.devices()[0].device_kind}), model "
          f"{model_cfg.hidden_size}-wide {list(model_cfg.layer_kinds)} + MTP, window "
          f"{model_cfg.sliding_window}, CSA 1/{model_cfg.compress_ratio_csa} top-"
          f"{model_cfg.index_topk}, HCA 1/{model_cfg.compress_ratio_hca}; "
          f"{_TOKENS.value} tokens per step", flush=True)
    rows = []
    for s in [int(x) for x in _SEQ.value]:
        for arm in _ARMS.value:
            r = time_arm(config, model_cfg, s, arm, _STEPS.value, _TOKENS.value)
            rows.append(r)
            print(f"[bench] S={s:6d} {arm:6s} batch {r['batch']:3d}: {r['step_s']:8.2f} s/step, "
                  f"{r['tokens_per_s']:8.0f} tokens/s; CPU {r['cpu_s']:8.2f} s/step, "
                  f"{r['tokens_per_cpu_s']:8.0f} tokens per CPU-s (compile {r['compile_s']:.0f} s)",
                  flush=True)
    slopes = report(rows, _ARMS.value)
    out = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "tokens_per_step": _TOKENS.value, "rows": rows,
           "slopes": slopes, "model": model_cfg.to_dict()}
    with open(_OUT.value, "w") as f:
        json.dump(out, f, indent=1)
    print(f"[bench] wrote {_OUT.value}")
    if _PLOT.value:
        plot_rows(rows, _PLOT.value)
        print(f"[bench] wrote {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
