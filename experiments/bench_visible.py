"""The cached path's visible-block loops over block sizes: what a decode step (or a prefill chunk)
pays in `blocked_indexer_topk` and `blocked_entries_part` for each entries-per-step choice, at an
early and a late position of one cache. This is what `ops.visible`'s block constants are chosen
from.

    python -m experiments.bench_visible [--max-len 1048576] [--chunk 1] [--blocks 4096,16384,65536]
        [--runs 200] [--json benchmarks/visible_blocks/cpu_<chunk>.json]

Shapes are `experiments.long_context`'s `lc_small`: indexer 4 heads x 16, top-16 over
max_len / 4 keys (CSA ratio 4); 4 attention heads x 32 over max_len / 128 entries (HCA). Inputs
are random; every block size gives the same picks (checked) and the same entries part (within
1e-5). Methodology: one process, the arms interleaved in rounds of 10 calls so a slow spell on
the shared host hits them alike; median (and min) of `--runs` calls, each ended by
`block_until_ready`; compile excluded.
"""
from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import benchlib
from sparse_lm.ops.attention import blocked_entries_part
from sparse_lm.ops.indexer import blocked_indexer_topk


def _define(fv):
    flags.DEFINE_integer("max-len", 1 << 20, "Cache length in tokens (max_len).", flag_values=fv)
    flags.DEFINE_integer("chunk", 1, "Query rows per step (1 = decode).", flag_values=fv)
    flags.DEFINE_string("blocks", "1024,4096,16384,65536,262144",
                        "Comma-separated entries per loop step to compare.", flag_values=fv)
    flags.DEFINE_integer("runs", 200, "Timed calls per arm and position.", flag_values=fv)
    flags.DEFINE_string("json", None, "Output path (default benchmarks/visible_blocks/cpu_"
                        "<chunk>.json; '-' = none).", flag_values=fv)


def parse_args(argv):
    a = benchlib.parse_flags(argv, _define)
    a.blocks = benchlib.int_list(a.blocks, "--blocks")
    if min(a.blocks) < 1:
        raise benchlib.FlagError(f"--blocks={a.blocks} is invalid: every entry must be >= 1")
    if a.chunk < 1 or a.max_len < 1024 + a.chunk or a.max_len % 128:
        raise benchlib.FlagError(f"--chunk={a.chunk} --max-len={a.max_len} is invalid: chunk "
                                 ">= 1, max_len a multiple of 128 and >= 1024 + chunk")
    benchlib.check_runs(a.runs, 0)
    return a


def arms(max_len: int, chunk: int, blocks: list[int], seed: int = 0):
    """{(part, block): (jitted fn, args builder by position)} for the two loops."""
    ks = jax.random.split(jax.random.key(seed), 5)
    n_keys, n_entries = max_len // 4, max_len // 128
    qi = jax.random.normal(ks[0], (1, chunk, 4, 16))
    wi = jax.random.normal(ks[1], (1, chunk, 4))
    keys = jax.random.normal(ks[2], (1, n_keys, 16))
    qa = jax.random.normal(ks[3], (1, chunk, 4, 32))
    entries = jax.random.normal(ks[4], (1, n_entries, 32))
    out = {}
    for b in blocks:
        if b <= n_keys:
            out[("indexer_topk", b)] = (
                jax.jit(lambda q, w, k, p, b=b: blocked_indexer_topk(q, w, k, p, ratio=4, k=16,
                                                                     block=b)),
                lambda p: (qi, wi, keys, p))
        if b <= n_entries:
            out[("entries_part", b)] = (
                jax.jit(lambda q, e, p, b=b: blocked_entries_part(q, e, p, ratio=128,
                                                                  scale=32 ** -0.5, block=b)),
                lambda p: (qa, entries, p))
    return out


def run(max_len: int, chunk: int, blocks: list[int], runs: int) -> dict:
    table = arms(max_len, chunk, blocks)
    positions = {"early": 1024, "late": max_len - chunk}
    rows = []
    for where, start in positions.items():
        p = start + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        ready = {key: (fn, make(p)) for key, (fn, make) in table.items()}
        first = {}
        for (part, b), (fn, args) in ready.items():      # compile, and check the arms agree
            out = jax.block_until_ready(fn(*args))
            ref = first.setdefault(part, out)
            if part == "indexer_topk":
                assert np.array_equal(np.asarray(out[0]), np.asarray(ref[0])), (part, b)
            else:
                np.testing.assert_allclose(np.asarray(out[0]), np.asarray(ref[0]), atol=1e-5)
        times = {key: [] for key in ready}
        for _ in range(max(1, runs // 10)):
            for key, (fn, args) in ready.items():
                for _ in range(10):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    times[key].append(time.perf_counter() - t0)
        for (part, b), (fn, args) in ready.items():
            ms = np.asarray(times[(part, b)]) * 1e3
            rows.append({"part": part, "position": where, "query_position": start,
                         "block": b, "blocks_run": int(fn(*args)[-1]),
                         "median_ms": float(np.median(ms)), "min_ms": float(ms.min())})
    return {"meta": benchlib.run_meta(max_len=max_len, chunk=chunk, index_keys=max_len // 4,
                                      hca_entries=max_len // 128, runs=runs), "rows": rows}


def format_table(result: dict) -> str:
    m = result["meta"]
    lines = [f"{m['device_kind']}, commit {(m['git_commit'] or '?')[:10]}, max_len {m['max_len']}"
             f", {m['chunk']} query row(s) per step, median of {m['runs']} calls",
             "| part | position | block | blocks run | median ms | min ms |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['part']} | {r['position']} | {r['block']} | {r['blocks_run']} | "
                     f"{r['median_ms']:.3f} | {r['min_ms']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    try:
        a = parse_args(sys.argv[1:] if argv is None else argv)
    except benchlib.FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    result = run(a.max_len, a.chunk, a.blocks, a.runs)
    print(format_table(result))
    benchlib.write_result(result, a.json, default_name=f"visible_blocks/cpu_{a.chunk}.json")
    return result


if __name__ == "__main__":
    main()
