"""MoE grouped matmul: every registered implementation against a dense matmul of the same
FLOPs, side by side in one process on one device.

    python -m experiments.bench_moe [--preset flash|pro] [--tokens-per-expert 128,512,2048]
        [--experts E] [--distribution balanced|skewed] [--impls reference,pallas,tokamax,dense]
        [--runs 20] [--warmup 3] [--no-backward] [--json benchmarks/moe_<device>.json] [--tiny]

Workload: the routed experts' first product (gate or up projection) of one MoE layer:
lhs [M, d] (tokens sorted by expert, M = E * tokens-per-expert), rhs [E, d, I], group sizes
from the distribution ("balanced": every expert the same; "skewed": Zipf-like sizes with the
same total, several experts empty and one taking the most). d, I, E from the preset
(V4-Flash: 4096, 2048, 256).
Implementations: "reference" (`lax.ragged_dot`; the old name "ragged_dot" is accepted), "pallas"
(the arm of the platform's Pallas kernel: pallas_tpu / pallas_gpu, interpreted on CPU), "tokamax" (only if importable; otherwise the row
says so), "dense" (one [M, d] x [d, I] matmul: the same FLOPs with no grouping, the
denominator of "fraction of dense").
Methodology (design.md §8): same inputs for every arm, compile time excluded, median of `--runs`
runs after `--warmup`, each ended by `block_until_ready`; the group metadata (visit lists) is
built inside the timed function from the traced sizes. FLOPs: 2 M d I forward; forward +
backward = 3x (d lhs and d rhs are one grouped product each). `vs_dense` = dense time / arm
time (the issue asks >= 0.6 for forward+backward at >= 512 tokens per expert on an H100).

Output: a table on stdout and a JSON file. `--tiny`: the tiny preset with interpreted kernels.
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
from kernels_pallas.grouped_matmul import grouped_matmul, tokamax_available

IMPLS = ("reference", "pallas", "tokamax", "dense")


@dataclasses.dataclass(frozen=True)
class Shapes:
    experts: int
    hidden: int
    inter: int


def group_sizes(total: int, experts: int, distribution: str, seed: int = 0) -> np.ndarray:
    """[E] int32 summing to `total`."""
    if distribution == "balanced":
        sizes = np.full(experts, total // experts, np.int64)
        sizes[: total - sizes.sum()] += 1
        return sizes.astype(np.int32)
    if distribution == "skewed":
        rng = np.random.default_rng(seed)
        w = 1.0 / np.arange(1, experts + 1) ** 1.2
        w[rng.permutation(experts)[: max(1, experts // 8)]] = 0.0     # some experts get nothing
        w = w[rng.permutation(experts)]
        sizes = np.floor(total * w / w.sum()).astype(np.int64)
        sizes[int(np.argmax(w))] += total - sizes.sum()
        return sizes.astype(np.int32)
    raise ValueError(f"distribution={distribution!r} is invalid: allowed 'balanced', 'skewed'")


def build(impl: str, backend: str, interpret: bool):
    if impl == "dense":
        return lambda lhs, rhs, gs: jnp.dot(lhs, rhs[0], preferred_element_type=jnp.float32
                                            ).astype(lhs.dtype)
    if impl == "tokamax" and not tokamax_available():
        raise RuntimeError("tokamax is not importable here (optional backend)")
    name = {"pallas": "pallas_gpu" if backend == "gpu" else "pallas_tpu"}.get(impl, impl)
    kw = {"interpret": interpret} if impl == "pallas" else {}
    return lambda lhs, rhs, gs: grouped_matmul(lhs, rhs, gs, implementation=name, **kw)


def fwd_bwd(fn):
    def f(lhs, rhs, gs, cot):
        def loss(a, b):
            return jnp.sum(fn(a, b, gs).astype(jnp.float32) * cot)
        return jax.grad(loss, argnums=(0, 1))(lhs, rhs)
    return f


def _define(fv):
    benchlib.define_common(fv, "moe")
    flags.DEFINE_string("tokens-per-expert", None, "Comma-separated tokens per expert (default "
                        "128,512,2048; --tiny: 16,64).", flag_values=fv)
    flags.DEFINE_integer("experts", None, "Override the preset's E.", flag_values=fv)
    flags.DEFINE_enum("distribution", "balanced", ["balanced", "skewed"], "Group sizes.",
                      flag_values=fv)
    flags.DEFINE_string("impls", ",".join(IMPLS), f"Comma-separated subset of {IMPLS}.",
                        flag_values=fv)
    flags.DEFINE_boolean("no-backward", False, "Forward only.", flag_values=fv)


def parse_args(argv):
    a = benchlib.parse_flags(argv, _define)
    a.tokens_per_expert = benchlib.int_list(
        a.tokens_per_expert or ("16,64" if a.tiny else "128,512,2048"), "--tokens-per-expert")
    a.impls = benchlib.name_list(",".join({"ragged_dot": "reference"}.get(x, x)
                                          for x in a.impls.split(",")), "--impls", IMPLS)
    benchlib.check_runs(a.runs, a.warmup)
    return a


def preset_shapes(name: str, experts: int | None) -> Shapes:
    cfg = benchlib.preset_model(name)
    return Shapes(experts=experts or cfg.n_routed_experts, hidden=cfg.hidden_size,
                  inter=cfg.moe_intermediate_size)


def run(a) -> dict:
    preset = "tiny" if a.tiny else a.preset
    sh = preset_shapes(preset, a.experts)
    dtype = jnp.dtype(a.dtype)
    dev = jax.devices()[0]
    backend = jax.default_backend()
    interpret = backend == "cpu"
    meta = run_meta(preset=preset, shapes=dataclasses.asdict(sh), dtype=str(dtype),
                    tokens_per_expert=a.tokens_per_expert, distribution=a.distribution,
                    impls=a.impls, runs=a.runs, warmup=a.warmup, interpret=interpret,
                    backward=not a.no_backward, tokamax_available=tokamax_available())
    peak = device_peak(dev.device_kind)
    passes = ["fwd"] + ([] if a.no_backward else ["fwd+bwd"])
    rows = []
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(a.tokens_per_expert) * len(a.impls) * len(passes),
                   desc="bench_moe", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    for tpe in a.tokens_per_expert:
        m = tpe * sh.experts
        sizes = group_sizes(m, sh.experts, a.distribution)
        ks = jax.random.split(jax.random.key(tpe), 3)
        lhs = jax.random.normal(ks[0], (m, sh.hidden), jnp.float32).astype(dtype)
        rhs = (jax.random.normal(ks[1], (sh.experts, sh.hidden, sh.inter), jnp.float32)
               * sh.hidden ** -0.5).astype(dtype)
        cot = jax.random.normal(ks[2], (m, sh.inter), jnp.float32).astype(dtype)
        gs = jnp.asarray(sizes)
        for impl in a.impls:
            for ps in passes:
                if bar is not None:
                    bar.set_postfix_str(f"{tpe}/expert {impl} {ps}")
                flops = 2.0 * m * sh.hidden * sh.inter * (1 if ps == "fwd" else 3)
                row = {"tokens_per_expert": tpe, "rows": m, "impl": impl, "pass": ps,
                       "flops": flops, "empty_experts": int((sizes == 0).sum()),
                       "max_group": int(sizes.max())}
                try:
                    fn = build(impl, backend, interpret)
                    f, args = (fn, (lhs, rhs, gs)) if ps == "fwd" else (fwd_bwd(fn),
                                                                         (lhs, rhs, gs, cot))
                    times = time_compiled(f, args, a.runs, a.warmup)
                    med = statistics.median(times)
                    row.update(median_ms=1e3 * med, min_ms=1e3 * min(times),
                               runs_ms=[1e3 * t for t in times], tflops=flops / med / 1e12,
                               frac_peak=None if peak is None else flops / med / peak)
                except Exception as e:  # noqa: BLE001 - recorded (out of memory, not importable)
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                rows.append(row)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    dense = {(r["tokens_per_expert"], r["pass"]): r for r in rows
             if r["impl"] == "dense" and "median_ms" in r}
    for r in rows:
        base = dense.get((r["tokens_per_expert"], r["pass"]))
        if base is not None and "median_ms" in r:
            r["vs_dense"] = base["median_ms"] / r["median_ms"]
    return {"meta": meta, "rows": rows}


def format_table(result: dict) -> str:
    m = result["meta"]
    sh = m["shapes"]
    lines = [benchlib.header(m, f"E={sh['experts']} d={sh['hidden']} I={sh['inter']}, "
                                f"{m['distribution']} routing"),
             f"{'tok/exp':>8} {'impl':<11} {'pass':<8} {'median ms':>10} {'TFLOP/s':>9} "
             f"{'% peak':>7} {'vs dense':>9}"]
    for r in result["rows"]:
        head = f"{r['tokens_per_expert']:>8} {r['impl']:<11} {r['pass']:<8}"
        if "error" in r:
            lines.append(f"{head} ERROR {r['error']}")
            continue
        vs = r.get("vs_dense")
        lines.append(f"{head} {r['median_ms']:>10.3f} {r['tflops']:>9.3f} "
                     f"{benchlib.percent_of_peak(r):>7} {'' if vs is None else f'{vs:.2f}':>9}")
    return "\n".join(lines)


main = benchlib.main_of(parse_args, run, format_table, "moe")


if __name__ == "__main__":
    main()
