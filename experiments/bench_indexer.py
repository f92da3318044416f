"""Lightning indexer top-k: the fused kernel against the naive and chunked forms, side by side in
one process on one device.

    python -m experiments.bench_indexer [--preset flash|pro] [--seq 8192,32768,131072]
        [--arms naive,xla,fused,scores_only,csa_core] [--runs 20] [--warmup 3]
        [--json benchmarks/indexer_<device>.json] [--tiny]

Arms (V4 indexer shapes from the preset: Hi heads x Di, ratio m, top-k k, bf16 inputs):
  naive        the [S, S/m] fp32 score matrix, then `lax.top_k` (the form that writes the
               scores to memory; it stops fitting at long S: the row records the error).
  xla          the same math in query chunks (`indexer_topk(implementation="xla")`).
  fused        `indexer_topk` with the platform's Pallas kernel (scores + exact running top-k).
  scores_only  the fused kernel's scoring pass with the top-k merge replaced by a running max
               (`indexer_max_score`): what scoring alone costs; fused / scores_only - 1 is what
               top-k adds.
  csa_core     the CSA attention core at the same S (`kernels_pallas.sparse_attention`, window +
               top-k entries + sink, H x 512, forward): the indexer's share of a CSA layer is
               reported as fused / (fused + csa_core) (an upper bound: the layer also has its
               projections and compressors).
Methodology (design.md §8): one process, same inputs for every arm, compile time excluded
(ahead-of-time compile, then warm-up runs), median of `--runs` timed runs each ended by
`block_until_ready`; the metadata the kernels build from the inputs (segment/tile ranges) runs
inside the timed function. FLOPs count only visible (query, entry) pairs, 2 * Hi * Di each,
for every arm (the naive form computes more). TFLOP/s = FLOPs / median; % of the device's dense
bf16 peak (H100 989 TFLOP/s). `agree` = share of queries whose fused index set equals the
naive one (when naive ran; near-ties in bf16 may differ legitimately).

Output: a table on stdout and a JSON file (device, JAX version, git commit, every run).
`--tiny` runs the tiny preset at S = 64, 128 with interpreted kernels on CPU (for tests).
"""
from __future__ import annotations

import dataclasses
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from absl import flags

from experiments import benchlib
from experiments.benchlib import device_peak, run_meta, time_compiled
from kernels_pallas.indexer_topk import indexer_max_score, indexer_topk

ARMS = ("naive", "xla", "fused", "scores_only", "csa_core")


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int
    index_heads: int
    index_dim: int
    ratio: int
    topk: int
    heads: int
    head_dim: int
    window: int


def visible_pairs(s: int, sh: Shapes) -> int:
    t = np.arange(s, dtype=np.int64)
    return int(np.minimum((t + 1) // sh.ratio, s // sh.ratio).sum())


def scoring_flops(s: int, sh: Shapes) -> float:
    return 2.0 * sh.index_heads * sh.index_dim * sh.batch * visible_pairs(s, sh)


def csa_core_flops(s: int, sh: Shapes) -> float:
    t = np.arange(s, dtype=np.int64)
    pairs = np.minimum(t + 1, sh.window).sum() + np.minimum((t + 1) // sh.ratio, sh.topk).sum()
    return 4.0 * sh.head_dim * sh.heads * sh.batch * float(pairs)


def make_data(s: int, sh: Shapes, dtype, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 6)
    n = s // sh.ratio
    b = sh.batch
    q = jax.random.normal(ks[0], (b, s, sh.index_heads, sh.index_dim), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[1], (b, s, sh.index_heads), jnp.float32) * (
        sh.index_dim ** -0.5 * sh.index_heads ** -0.5)
    keys = jax.random.normal(ks[2], (b, n, sh.index_dim), jnp.float32).astype(dtype)
    data = {"q": q, "w": w, "keys": keys}
    return data


def build_arm(arm: str, s: int, sh: Shapes, *, kernel: str, interpret: bool, dtype):
    """-> (fn, arg names)."""
    n = s // sh.ratio
    k = min(sh.topk, n)
    kw = dict(k=k, ratio=sh.ratio)
    if arm == "naive":
        return (lambda q, w, keys: indexer_topk(q, w, keys, implementation="reference", **kw),
                ("q", "w", "keys"))
    if arm == "xla":
        return (lambda q, w, keys: indexer_topk(q, w, keys, implementation="xla", **kw),
                ("q", "w", "keys"))
    if arm == "fused":
        return (lambda q, w, keys: indexer_topk(q, w, keys, implementation=kernel,
                                                interpret=interpret, **kw), ("q", "w", "keys"))
    if arm == "scores_only":
        return (lambda q, w, keys: indexer_max_score(q, w, keys, ratio=sh.ratio,
                                                     implementation=kernel, interpret=interpret),
                ("q", "w", "keys"))
    if arm == "csa_core":
        from kernels_pallas.sparse_attention import csa_attention
        csa_impl = "pallas_gpu" if kernel == "pallas_gpu" else "pallas_tpu"
        return (lambda cq, ckv, comp, idx, sink: csa_attention(
            cq, ckv, comp, idx, sink, window=sh.window, scale=sh.head_dim ** -0.5,
            implementation=csa_impl, interpret=interpret),
            ("cq", "ckv", "comp", "idx", "sink"))
    raise ValueError(f"unknown arm {arm!r}: allowed {ARMS}")


def csa_data(s: int, sh: Shapes, dtype, seed: int = 1):
    ks = jax.random.split(jax.random.key(seed), 4)
    b, n = sh.batch, s // sh.ratio
    k = min(sh.topk, n)
    t = jnp.arange(s)[:, None]
    vis = (t + 1) // sh.ratio
    j = jnp.arange(k)[None, :]
    spread = jnp.floor((j + 0.5) * (vis / k)).astype(jnp.int32)
    idx = jnp.where(vis >= k, spread, jnp.where(j < vis, j, -1)).astype(jnp.int32)
    def nrm(key, shape):
        return jax.random.normal(key, shape, jnp.float32).astype(dtype)

    return {"cq": nrm(ks[0], (b, s, sh.heads, sh.head_dim)),
            "ckv": nrm(ks[1], (b, s, sh.head_dim)),
            "comp": nrm(ks[2], (b, max(n, 1), sh.head_dim)),
            "idx": jnp.broadcast_to(idx, (b, s, k)),
            "sink": jnp.zeros((sh.heads,), jnp.float32)}


def _define(fv):
    benchlib.define_common(fv, "indexer")
    flags.DEFINE_string("seq", None, "Comma-separated sequence lengths (default "
                        "8192,32768,65536,131072; --tiny: 64,128).", flag_values=fv)
    flags.DEFINE_integer("batch", 1, "Batch rows.", flag_values=fv)
    flags.DEFINE_string("arms", ",".join(ARMS), f"Comma-separated subset of {ARMS}.",
                        flag_values=fv)


def parse_args(argv):
    a = benchlib.parse_flags(argv, _define)
    a.seq = benchlib.int_list(a.seq or ("64,128" if a.tiny else "8192,32768,65536,131072"),
                              "--seq")
    a.arms = benchlib.name_list(a.arms, "--arms", ARMS)
    benchlib.check_runs(a.runs, a.warmup)
    return a


def preset_shapes(name: str, batch: int) -> Shapes:
    cfg = benchlib.preset_model(name)
    return Shapes(batch=batch, index_heads=cfg.index_n_heads, index_dim=cfg.index_head_dim,
                  ratio=cfg.compress_ratio_csa, topk=cfg.index_topk, heads=cfg.num_heads,
                  head_dim=cfg.head_dim, window=cfg.sliding_window)


def run(a) -> dict:
    preset = "tiny" if a.tiny else a.preset
    sh = preset_shapes(preset, a.batch)
    dtype = jnp.dtype(a.dtype)
    dev = jax.devices()[0]
    backend = jax.default_backend()
    interpret = backend == "cpu"
    kernel = "pallas_gpu" if backend == "gpu" else "pallas_tpu"
    meta = run_meta(preset=preset, shapes=dataclasses.asdict(sh), dtype=str(dtype), seq=a.seq,
                    arms=a.arms, runs=a.runs, warmup=a.warmup, interpret=interpret, kernel=kernel)
    peak = device_peak(dev.device_kind)
    rows, summary = [], []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(a.seq) * len(a.arms), desc="bench_indexer", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    for s in a.seq:
        data = make_data(s, sh, dtype)
        if "csa_core" in a.arms:
            data.update(csa_data(s, sh, dtype))
        results = {}
        for arm in a.arms:
            if bar is not None:
                bar.set_postfix_str(f"S={s} {arm}")
            flops = csa_core_flops(s, sh) if arm == "csa_core" else scoring_flops(s, sh)
            row = {"seq": s, "arm": arm, "flops": flops}
            try:
                fn, names = build_arm(arm, s, sh, kernel=kernel, interpret=interpret, dtype=dtype)
                args = [data[x] for x in names]
                times = time_compiled(fn, args, a.runs, a.warmup)
                med = statistics.median(times)
                row.update(median_ms=1e3 * med, min_ms=1e3 * min(times),
                           runs_ms=[1e3 * t for t in times], tflops=flops / med / 1e12,
                           frac_peak=None if peak is None else flops / med / peak)
                if arm in ("naive", "fused", "xla"):
                    results[arm] = np.asarray(jax.jit(fn)(*args))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded in the table
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
            if bar is not None:
                bar.update(1)
        med = {r["arm"]: r.get("median_ms") for r in rows if r["seq"] == s}
        item = {"seq": s}
        if med.get("fused") and med.get("scores_only"):
            item["topk_overhead"] = med["fused"] / med["scores_only"] - 1.0
        if med.get("fused") and med.get("csa_core"):
            item["indexer_share_of_csa"] = med["fused"] / (med["fused"] + med["csa_core"])
        if med.get("fused") and med.get("naive"):
            item["fused_speedup_vs_naive"] = med["naive"] / med["fused"]
        if "fused" in results and "naive" in results:
            same = [set(x[x >= 0].tolist()) == set(y[y >= 0].tolist())
                    for x, y in zip(results["fused"].reshape(-1, results["fused"].shape[-1]),
                                    results["naive"].reshape(-1, results["naive"].shape[-1]))]
            item["agree"] = float(np.mean(same))
        summary.append(item)
        del data
    if bar is not None:
        bar.close()
    return {"meta": meta, "rows": rows, "summary": summary}


def format_table(result: dict) -> str:
    m = result["meta"]
    sh = m["shapes"]
    lines = [benchlib.header(m, f"B={sh['batch']} Hi={sh['index_heads']} Di={sh['index_dim']} "
                                f"ratio={sh['ratio']} k={sh['topk']}"),
             f"{'S':>7} {'arm':<12} {'median ms':>10} {'TFLOP/s':>9} {'% peak':>7}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['seq']:>7} {r['arm']:<12} ERROR {r['error']}")
            continue
        lines.append(f"{r['seq']:>7} {r['arm']:<12} {r['median_ms']:>10.3f} {r['tflops']:>9.3f} "
                     f"{benchlib.percent_of_peak(r):>7}")
    for item in result["summary"]:
        lines.append("S={seq}: ".format(**item) + ", ".join(
            f"{k} {v:.3f}" for k, v in item.items() if k != "seq"))
    return "\n".join(lines)


main = benchlib.main_of(parse_args, run, format_table, "indexer")


if __name__ == "__main__":
    main()
