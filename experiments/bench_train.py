"""Training throughput of the sparse model against the same model with dense attention, by
sequence length (CPU by default). A benchmark script: prints a table and writes JSON.

    python -m experiments.bench_train [--seq_lens=1024,2048,4096,8192,16384] [--steps=2]
                                      [--warmup=1] [--tokens_per_step=16384] [--isolate]
                                      [--dense_step_budget_s=900] [--out=bench_train.json]
                                      [--plot=bench_train.png]
    python -m experiments.bench_train --from_json=benchmarks/train_cpu.json [--plot=...]  # redraw

Long context (benchmarks/train_cpu_long.json): every layer rematerialized, one process per arm;
without remat the sparse demo step holds ~450 KB of saved activations per token (14.5 GiB of
compiled temporaries at 32K, 28.9 GiB at 64K: benchmarks/train_cpu_long.noremat.json):

    python -m experiments.bench_train --seq_lens=16384,32768,65536 --arms=sparse,dense \
        --config.model.remat=full --steps=1 --warmup=1 --isolate --dense_step_budget_s=900 \
        --out=benchmarks/train_cpu_long.json --plot=benchmarks/train_cpu_long.png

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
every visible entry in query chunks, the sparse arm the sparse-stage form, KL over the selected
entries; both select with the fused, query-chunked top-k, so neither holds an [B, S, N] value).
  dense_noindex  (optional) the dense arm without the indexer's scores and KL objective (the
          indexer is replaced for the run by one that returns no entries, `indexer_removed`): a
          pure dense-attention step, the strictest baseline.

Tokens per step are constant (batch = tokens_per_step / S, at least 1), so seconds per token
compare directly across lengths. The step is compiled ahead of time (`jit(...).lower().compile()`,
`compile_s`), then run `warmup` untimed and `steps` timed times; the median is reported, as
wall-clock time and as the process's CPU time (user + system, all threads): on a shared machine
the CPU time is the steadier measure of the work done, the wall time the one a user sees on an
idle one.

Memory, per (S, arm):
  compiled_*_bytes  the compiled train step's `memory_analysis()`: what XLA allocates for its
          arguments (the train state and the batch), outputs and temporaries; `compiled_bytes`
          = argument + output - alias + temp (the donated state's outputs reuse its argument
          buffers, `alias`, so they are counted once).
  peak_rss_bytes  the peak resident set (`ru_maxrss`) of the process that ran the arm: the
          Python and JAX runtime, the model and optimizer state, compilation and the steps.
          Exact for one arm only with `--isolate` (each (S, arm) runs in a fresh spawned
          process, one after another, and reports its own peak); without it the figure is the
          process's peak so far (monotone over the rows). An isolated arm that dies (out of
          memory: the exit code is -9) is recorded as a row with its `error`.
Budget: a dense arm (dense, dense_noindex) at S is skipped when the step time projected from its
largest measured S0 < S in this run, step_s(S0) * (S / S0)^2 (its attention is quadratic at
batch 1; an upper bound while the linear parts still weigh), exceeds `--dense_step_budget_s`; the
row records the projection, the length it came from and the reason.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.benchlib import compiled_memory, over_budget
from sparse_lm.model import build_model
from sparse_lm.model.indexer import Indexer
from sparse_lm.train.loop import loss_config, make_schedule, make_tx, resolve_model_config
from sparse_lm.train.steps import init_train_state, make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Model/optimizer config.")
_SEQ = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths.")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per arm and length (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation, before the timed ones.")
_ISOLATE = flags.DEFINE_bool("isolate", False, "Run each (S, arm) in a fresh spawned process, one "
                             "at a time, so that its peak RSS is that arm's alone.")
_BUDGET = flags.DEFINE_float("dense_step_budget_s", 900.0, "Skip a dense arm at S when its step "
                             "time projected from a shorter S of this run exceeds this (seconds).")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 16384, "Tokens per optimizer step.")
_ARMS = flags.DEFINE_list("arms", ["sparse", "dense"], "Arms to run.")
_OUT = flags.DEFINE_string("out", "bench_train.json", "JSON output path.")
_PLOT = flags.DEFINE_string("plot", "", "PNG path for cost per token against S (both arms, "
                            "wall and CPU time); empty = no plot.")
_FROM_JSON = flags.DEFINE_string("from_json", "", "Redraw the tables and the plot from this "
                                 "JSON (no timing).")
_CHUNK = 1024
ARMS = ("sparse", "dense", "dense_noindex")


@contextlib.contextmanager
def indexer_removed():
    """The CSA indexer returns no scoring and no picks: no indexer objective is computed."""
    original = Indexer.__call__

    def empty(self, x, *args, **kwargs):
        return None, jnp.zeros(x.shape[:2] + (0,), jnp.int32), {}

    Indexer.__call__ = empty
    try:
        yield
    finally:
        Indexer.__call__ = original


def time_arm(config, model_cfg, seq: int, arm: str, steps: int, tokens: int,
             warmup: int = 1) -> dict:
    batch = max(1, tokens // seq)
    if arm not in ARMS:
        raise ValueError(f"--arms: unknown arm {arm!r}; allowed: {', '.join(ARMS)}")
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
        rss_before = _rss_bytes()
        t0 = time.perf_counter()
        step = step.lower(state, data).compile()
        compile_s = time.perf_counter() - t0
        memory = compiled_memory(step)
        need = memory["compiled_bytes"] - memory["compiled_argument_bytes"]   # on top of the state
        available = _available_bytes()
        if need > available:     # a shared machine: fail this arm, not its neighbours' processes
            return {"seq_len": seq, "arm": arm, "batch": batch, "compile_s": compile_s, **memory,
                    "error": f"the compiled step needs {_gib(need)} beyond its arguments, "
                             f"{_gib(available)} available (MemAvailable): not run"}
        warmup_times = []
        for _ in range(warmup):
            t0 = time.perf_counter()
            state, m = step(state, data)
            jax.block_until_ready(m)
            warmup_times.append(time.perf_counter() - t0)
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
            "compile_s": compile_s, "warmup_times": warmup_times, "loss": float(m["loss"]),
            "times": times, "cpu_times": cpus, **memory,
            "rss_before_compile_bytes": rss_before,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _rss_bytes() -> int:
    """The process's current resident set (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def _isolated_child(path, *args):
    """Spawned-process body: one `time_arm`, its row written to `path` as JSON."""
    logging.set_verbosity(logging.WARNING)
    row = time_arm(*args)
    with open(path, "w") as f:
        json.dump(row, f)


def time_arm_isolated(config, model_cfg, seq: int, arm: str, steps: int, tokens: int,
                      warmup: int) -> dict:
    """`time_arm` in a fresh spawned process (nothing else ran in it: its peak RSS is the arm's);
    a child that dies leaves a row with its exit code as `error`."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "row.json")
        p = ctx.Process(target=_isolated_child,
                        args=(path, config, model_cfg, seq, arm, steps, tokens, warmup))
        p.start()
        p.join()
        if p.exitcode != 0 or not os.path.exists(path):
            return {"seq_len": seq, "arm": arm, "batch": max(1, tokens // seq),
                    "error": f"the isolated process exited with code {p.exitcode}"
                             + (" (killed: out of memory?)" if p.exitcode == -9 else "")}
        with open(path) as f:
            return json.load(f)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plot_rows(rows, path):
    """us per token (wall and CPU) against S, log-log, each arm, with the dense/sparse ratio;
    with memory figures, a third panel: compiled bytes and peak RSS against S."""
    import matplotlib          # optional package, needed only for --plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    compiled_only = [r for r in rows if "step_s" not in r and "compiled_bytes" in r]
    rows = [r for r in rows if "step_s" in r]
    with_memory = any("compiled_bytes" in r for r in rows + compiled_only)
    fig, axes = plt.subplots(1, 3 if with_memory else 2, figsize=(15 if with_memory else 10, 4))
    styles = (("dense", "s-"), ("dense_noindex", "^--"), ("sparse", "o-"))
    color = {"dense": "C0", "dense_noindex": "C1", "sparse": "C2"}
    for ax, (unit, per) in zip(axes, (("wall", "us_per_token"), ("CPU", "cpu_us_per_token"))):
        for arm, style in styles:
            pts = sorted((r["seq_len"], r[per]) for r in rows if r["arm"] == arm)
            if pts:
                ax.plot(*zip(*pts), style, color=color[arm], label=arm)
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
    if with_memory:
        ax = axes[2]
        for arm, style in styles:
            mem = sorted((r["seq_len"], r["compiled_bytes"] / 2 ** 30, r["peak_rss_bytes"] / 2 ** 30)
                         for r in rows if r["arm"] == arm and "compiled_bytes" in r)
            if mem:
                x, compiled, rss = zip(*mem)
                ax.plot(x, compiled, style, color=color[arm], label=f"{arm}: compiled step")
                ax.plot(x, rss, style[0] + ":", color=color[arm], mfc="none",
                        label=f"{arm}: peak RSS")
            big = sorted((r["seq_len"], r["compiled_bytes"] / 2 ** 30) for r in compiled_only
                         if r["arm"] == arm)
            if big:                  # compiled but not run: more than the machine had free
                ax.plot(*zip(*big), style[0], color=color[arm], mfc="none", ms=9,
                        label=f"{arm}: compiled step, not run")
                for x, gib in big:
                    ax.annotate(f"{gib:.0f} GiB", (x, gib), textcoords="offset points",
                                xytext=(6, -3), fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel("GiB")
        ax.set_title("train step memory")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gib(n) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def memory_table(rows):
    """One line per (S, arm): time per step, compiled memory, peak RSS; skipped / failed rows
    with their reason."""
    print("\n  [memory]      S  arm            s/step   tokens/s   compiled (temp)          "
          "peak RSS")
    for r in sorted(rows, key=lambda r: (r["seq_len"], ARMS.index(r["arm"]))):
        head = f"  {r['seq_len']:13d}  {r['arm']:13s}"
        if "step_s" not in r:
            compiled = (f"compiled {_gib(r['compiled_bytes'])}; " if "compiled_bytes" in r
                        else "")
            print(f"{head}  {compiled}{r.get('reason') or r.get('error')}")
            continue
        if "compiled_bytes" not in r:            # a record from before the memory columns
            print(f"{head}  {r['step_s']:7.1f}  {r['tokens_per_s']:9.0f}   (no memory figures)")
            continue
        print(f"{head}  {r['step_s']:7.1f}  {r['tokens_per_s']:9.0f}   "
              f"{_gib(r['compiled_bytes']):>10s} ({_gib(r['compiled_temp_bytes'])})  "
              f"{_gib(r['peak_rss_bytes']):>10s}")


def report(rows, arms):
    """Print the wall, CPU and memory tables and return the slopes of cost per token against S."""
    memory_table(rows)
    rows = [r for r in rows if "step_s" in r]
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
    for arm in _ARMS.value:
        if arm not in ARMS:
            raise ValueError(f"--arms: unknown arm {arm!r}; allowed: {', '.join(ARMS)}")
    run = time_arm_isolated if _ISOLATE.value else time_arm
    rows = []
    head = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "tokens_per_step": _TOKENS.value, "steps": _STEPS.value, "warmup": _WARMUP.value,
            "isolate": _ISOLATE.value, "dense_step_budget_s": _BUDGET.value,
            "cpu_count": os.cpu_count(), "command": " ".join(["python -m experiments.bench_train"] + sys.argv[1:])}

    def write(**extra):
        with open(_OUT.value, "w") as f:
            json.dump({**head, "rows": rows, **extra, "model": model_cfg.to_dict()}, f, indent=1)
    # arm by arm, each up its lengths (a dense arm's budget reads its own shorter rows); the
    # JSON is rewritten after every row, so a run stopped early keeps what it measured
    for arm in _ARMS.value:
        for s in [int(x) for x in _SEQ.value]:
            skip = over_budget(rows, s, arm, _BUDGET.value)
            if skip is not None:
                rows.append(skip)
                print(f"[bench] S={s:6d} {arm:6s} skipped: {skip['reason']}", flush=True)
                write(complete=False)
                continue
            r = run(config, model_cfg, s, arm, _STEPS.value, _TOKENS.value, _WARMUP.value)
            rows.append(r)
            write(complete=False)
            if "error" in r:
                print(f"[bench] S={s:6d} {arm:6s} failed: {r['error']}", flush=True)
                continue
            print(f"[bench] S={s:6d} {arm:6s} batch {r['batch']:3d}: {r['step_s']:8.2f} s/step, "
                  f"{r['tokens_per_s']:8.0f} tokens/s; CPU {r['cpu_s']:8.2f} s/step, "
                  f"{r['tokens_per_cpu_s']:8.0f} tokens per CPU-s (compile {r['compile_s']:.0f} s); "
                  f"compiled {_gib(r['compiled_bytes'])} (temp {_gib(r['compiled_temp_bytes'])}), "
                  f"peak RSS {_gib(r['peak_rss_bytes'])}", flush=True)
    slopes = report(rows, _ARMS.value)
    write(complete=True, slopes=slopes)
    print(f"[bench] wrote {_OUT.value}")
    if _PLOT.value:
        plot_rows(rows, _PLOT.value)
        print(f"[bench] wrote {_PLOT.value}")


if __name__ == "__main__":
    app.run(main)
