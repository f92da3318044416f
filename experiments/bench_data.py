"""Input pipeline throughput (tokens/s of packed batches) against what a train step consumes.
A benchmark script: prints a table and writes JSON (benchmarks/bench_data.json by default).

    python -m experiments.bench_data [--batches=40] [--train_steps=3] \
        [--tokenizer=runs/bpe/tokenizer.json] [--jsonl=corpus.jsonl] [--json=PATH]

Arms, each the training pipeline of configs/demo.py (16 rows x 512 + 1 tokens, documents aligned
to the model's largest compress ratio, chunked and shuffled) through `pipeline.TrainIterator`
(grain: documents -> tokenize -> pack -> batch) without prefetching, so the time is the packing
work of one thread:
  stdlib/bytes      the demo's own data (the embedded stdlib corpus, byte tokens)
  stdlib/<bpe>      the same corpus through --tokenizer (tokenized once at setup: reported apart)
  jsonl/<bpe>       --jsonl (a data.source=jsonl: file) through --tokenizer
and the demo's train step (the model of configs/demo.py, sparse, compile excluded, median of
--train_steps) as tokens/s consumed. The loader keeps up when its tokens/s exceed the step's;
in training it runs in a prefetch thread beside the step.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import benchlib
from sparse_lm.data import pipeline
from sparse_lm.data.packing import packing_efficiency
from sparse_lm.data.tokenizer import load_tokenizer
from sparse_lm.model import build_model
from sparse_lm.train.loop import loss_config, make_schedule, make_tx, resolve_model_config
from sparse_lm.train.steps import init_train_state, make_train_step


def _define(fv):
    flags.DEFINE_integer("batches", 40, "Timed batches per arm (after 2 untimed).", flag_values=fv)
    flags.DEFINE_integer("train_steps", 3, "Timed demo train steps (0 = none).", flag_values=fv)
    flags.DEFINE_string("tokenizer", "", "A tokenizer.json for the BPE arms (none = bytes only).",
                        flag_values=fv)
    flags.DEFINE_string("jsonl", "", "A JSONL file (key 'text') for the jsonl arm.",
                        flag_values=fv)
    flags.DEFINE_string("json", None, "Output path (default benchmarks/bench_data.json; '-' = "
                        "none).", flag_values=fv)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loader_arm(config, source_spec: str, tokenizer_spec: str, batches: int) -> dict:
    """tokens/s of the demo's training batches from `source_spec` through `tokenizer_spec`."""
    data = config.data
    data.source, data.tokenizer = source_spec, tokenizer_spec
    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_spec)
    src = pipeline.make_source(data, data.train_split)
    align = pipeline.resolve_align(data, resolve_model_config(config))
    it = pipeline.TrainIterator(src, seq_len=int(config.train.seq_len),
                                local_batch=int(config.train.batch_size), align=align,
                                seed=int(data.seed), chunk=bool(data.chunk_docs), tokenizer=tok,
                                prefetch=0)
    setup_s = time.perf_counter() - t0
    for _ in range(2):
        next(it)
    eff = []
    t0, c0 = time.perf_counter(), _cpu()
    for _ in range(batches):
        eff.append(packing_efficiency(next(it)))
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    tokens = batches * int(config.train.batch_size) * int(config.train.seq_len)
    return {"source": source_spec, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
            "documents": len(src), "setup_s": setup_s, "batches": batches,
            "tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu,
            "packing_efficiency": float(np.mean(eff))}


def train_step_arm(config, steps: int) -> dict:
    """tokens/s the demo's sparse train step consumes (compile excluded, median of `steps`)."""
    cfg = resolve_model_config(config)
    tx = make_tx(config)
    graphdef, state = init_train_state(build_model(cfg, seed=0), tx)
    step = make_train_step(graphdef, tx, make_schedule(config), loss_config(config), sparse=True,
                           implementation=cfg.attention_impl)
    b, s = int(config.train.batch_size), int(config.train.seq_len)
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, 256, (b, s + 1)), jnp.int32),
             "segment_ids": jnp.ones((b, s + 1), jnp.int32)}
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"compile_s": compile_s, "step_s": times, "median_step_s": med,
            "tokens_per_step": b * s, "tokens_per_s": b * s / med}


def main(argv=None) -> dict:
    try:
        a = benchlib.parse_flags(sys.argv[1:] if argv is None else argv, _define)
        if a.batches < 1 or a.train_steps < 0:
            raise benchlib.FlagError("--batches must be >= 1 and --train_steps >= 0")
        if a.jsonl and not a.tokenizer:
            raise benchlib.FlagError("--jsonl needs --tokenizer (the jsonl arm runs the BPE)")
    except benchlib.FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from configs.demo import get_config
    arms = [("stdlib", "bytes")]
    if a.tokenizer:
        arms.append(("stdlib", a.tokenizer))
    if a.jsonl:
        arms.append((f"jsonl:{a.jsonl}", a.tokenizer))
    loaders = [loader_arm(get_config(), s, t, a.batches) for s, t in arms]
    step = train_step_arm(get_config(), a.train_steps) if a.train_steps else None
    cfg = get_config()
    result = {"meta": benchlib.run_meta(config="configs/demo.py",
                                        batch=int(cfg.train.batch_size),
                                        seq_len=int(cfg.train.seq_len)),
              "loader": loaders, "train_step": step}
    print(f"device: {result['meta']['device_kind']}, jax {result['meta']['jax']}, demo batch "
          f"{cfg.train.batch_size} x {cfg.train.seq_len} tokens")
    print(f"{'source':28s}{'tokenizer':14s}{'setup s':>9s}{'tokens/s':>12s}{'per CPU s':>12s}"
          f"{'packing':>9s}" + ("" if step is None else f"{'x step':>9s}"))
    for r in loaders:
        name = "bytes" if r["tokenizer"] == "bytes" else f"bpe {r['vocab_size']}"
        print(f"{r['source'][-27:]:27s} {name:14s}{r['setup_s']:9.1f}{r['tokens_per_s']:12,.0f}"
              f"{r['tokens_per_cpu_s']:12,.0f}{r['packing_efficiency']:9.3f}"
              + ("" if step is None else f"{r['tokens_per_s'] / step['tokens_per_s']:9.1f}"))
    if step is not None:
        print(f"demo train step (sparse, median of {len(step['step_s'])}): "
              f"{step['median_step_s']:.2f} s = {step['tokens_per_s']:,.0f} tokens/s consumed "
              f"(compile {step['compile_s']:.0f} s)")
    benchlib.write_result(result, a.json, default_name="bench_data.json")
    return result


if __name__ == "__main__":
    main()
