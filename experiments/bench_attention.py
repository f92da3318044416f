"""Sparse attention against a dense baseline, side by side in one process on one device.

    python -m experiments.bench_attention [--preset flash|pro] [--seq 8192,16384,...,131072]
        [--arms dense_core,hca_core,csa_core,hca_layer,csa_layer] [--no-backward]
        [--runs 20] [--warmup 3] [--json benchmarks/attention_<device>.json] [--tiny]

Arms (V4 shapes from the preset: H query heads over one shared 512-wide K = V head):
  dense_core  the dense baseline: our block-sparse kernel with a full causal block map
              (window >= S, no compressed entries) at head dim 512, sink included. cuDNN does
              not do head dim 512; `--cudnn-check` (GPU only) times it against
              `jax.nn.dot_product_attention(implementation="cudnn")` at head dim 256 with twice
              the heads (same FLOPs) and compares outputs with the sink switched off.
  hca_core    block-sparse kernel: window W + every visible HCA entry (ratio m', N = S/m').
  csa_core    the CSA token-sparse kernel (`kernels_pallas.sparse_attention`): window W + the
              top-k listed CSA entries (N = S/m); indices are fixed, spread over the visible range.
  hca_layer   HCA compressor (projections, gated pooling, norm, RoPE) + hca_core.
  csa_layer   CSA compressor + lightning indexer (its own compressor, query projection, head
              weights, ReLU scores, top-k; a query-chunked XLA implementation, never [S, N] at
              once) + csa_core. The indexer and top-k are included in every timing.
  Layers take x [B, S, d], the query latent and q, kv as inputs (the q / kv / output
  projections are the same in every arm and are left out). fwd+bwd differentiates the attention
  core and the compressor; the indexer runs forward only (as in the model: it is detached and
  top-k has no gradient).

Methodology (design.md §8): same process, same shapes and dtypes for every arm, compile time
excluded (ahead-of-time compile, then warm-up runs), median of `--runs` timed runs, each ended by
`block_until_ready`; any index/metadata preparation that depends on the data runs inside the
timed function (the block maps depend only on shapes and are built once at compile time).
FLOPs count only attended entries: attention 4 * D * H per (query, attended key) pair, indexer
2 * Hi * Di per (query, visible entry), matmuls 2 * m * n * k; backward = 2.5 x forward.
Effective TFLOP/s = counted FLOPs / median time; fraction of the device's dense bf16 peak
(H100: 989 TFLOP/s); speedup = dense_core time / arm time (and the FLOP ratio it promises).

Output: a table on stdout and a JSON file (device, JAX version, git commit, every run); see
benchmarks/README.md. `--tiny` runs CPU-sized shapes with interpreted kernels (tests use it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from absl import flags

from experiments import benchlib
from experiments.benchlib import device_peak, run_meta, time_compiled
from kernels_pallas.block_sparse_attention import block_sparse_attention
from sparse_lm.config import ModelConfig
from sparse_lm.ops.compress import compress, entry_positions
from sparse_lm.ops.norms import rms_norm
from sparse_lm.ops.rope import apply_rope, inv_frequencies

try:
    from kernels_pallas.sparse_attention import csa_attention
except ImportError as e:  # the CSA kernel is another engineer's folder; report, don't fail
    csa_attention = None
    _CSA_IMPORT_ERROR = repr(e)
else:
    _CSA_IMPORT_ERROR = None

ARMS = ("dense_core", "hca_core", "csa_core", "hca_layer", "csa_layer")


# ------------------------------------------------------------------------------ shapes

@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int
    heads: int
    head_dim: int
    rope_dim: int
    window: int
    ratio_csa: int
    ratio_hca: int
    topk: int
    hidden: int
    q_lora: int
    index_heads: int
    index_dim: int
    eps: float

    @classmethod
    def from_config(cls, cfg: ModelConfig, batch: int) -> "Shapes":
        return cls(batch=batch, heads=cfg.num_heads, head_dim=cfg.head_dim,
                   rope_dim=cfg.rope_head_dim, window=cfg.sliding_window,
                   ratio_csa=cfg.compress_ratio_csa, ratio_hca=cfg.compress_ratio_hca,
                   topk=cfg.index_topk, hidden=cfg.hidden_size, q_lora=cfg.q_lora_rank,
                   index_heads=cfg.index_n_heads, index_dim=cfg.index_head_dim,
                   eps=cfg.rms_norm_eps)


# ---------------------------------------------------------------------- FLOP accounting

def attended(s: int, sh: Shapes, arm: str) -> int:
    """(query, key) pairs the arm's attention actually attends (no packing in the benchmark)."""
    t = np.arange(s, dtype=np.int64)
    if arm == "dense":
        return int((t + 1).sum())
    win = int(np.minimum(t + 1, sh.window).sum())
    if arm == "hca":
        return win + int(((t + 1) // sh.ratio_hca).sum())
    if arm == "csa":
        return win + int(np.minimum((t + 1) // sh.ratio_csa, sh.topk).sum())
    raise ValueError(arm)


def core_flops(s: int, sh: Shapes, arm: str) -> float:
    return 4.0 * sh.head_dim * sh.heads * sh.batch * attended(s, sh, arm)


def compressor_flops(s: int, sh: Shapes, width: int) -> float:
    return 2 * 2.0 * sh.batch * s * sh.hidden * width            # kv and gate projections


def indexer_flops(s: int, sh: Shapes) -> float:
    t = np.arange(s, dtype=np.int64)
    visible = int(((t + 1) // sh.ratio_csa).sum())
    b = sh.batch
    return (2.0 * b * s * sh.q_lora * sh.index_heads * sh.index_dim        # query projection
            + 2.0 * b * s * sh.hidden * sh.index_heads                   # head weights
            + compressor_flops(s, sh, 2 * sh.index_dim)                  # its compressor
            + 2.0 * b * sh.index_heads * sh.index_dim * visible)         # ReLU scores


def arm_flops(arm: str, s: int, sh: Shapes, backward: bool) -> float:
    """Counted FLOPs of one call (fwd, or fwd+bwd with bwd = 2.5 x fwd of the differentiated part)."""
    mult = 3.5 if backward else 1.0
    if arm == "dense_core":
        return mult * core_flops(s, sh, "dense")
    if arm == "hca_core":
        return mult * core_flops(s, sh, "hca")
    if arm == "csa_core":
        return mult * core_flops(s, sh, "csa")
    if arm == "hca_layer":
        return mult * (core_flops(s, sh, "hca") + compressor_flops(s, sh, sh.head_dim))
    if arm == "csa_layer":
        return (mult * (core_flops(s, sh, "csa") + compressor_flops(s, sh, 2 * sh.head_dim))
                + indexer_flops(s, sh))
    raise ValueError(arm)


# ------------------------------------------------------------------------------ the arms

def _compressor(x, positions, params, *, ratio, overlap, sh, inv_freq):
    """x [B, S, d] -> RoPE'd, normed entries [B, S // ratio, c] in x's dtype, valid [B, N]."""
    kv = jnp.dot(x, params["wkv"], preferred_element_type=jnp.float32)
    gate = jnp.dot(x, params["wgate"], preferred_element_type=jnp.float32)
    pooled, valid = compress(kv, gate, params["ape"], ratio=ratio, overlap=overlap)
    entries = rms_norm(pooled.astype(x.dtype), params["norm"], sh.eps)
    return apply_rope(entries, entry_positions(positions, ratio), inv_freq), valid


def _indexer_topk(x, q_latent, positions, params, *, sh, inv_freq, chunk):
    """Lightning indexer + top-k over query chunks (memory O(chunk * Hi * N), not S * N).

    Returns [B, S, min(k, N)] int32 entry indices, -1 where fewer entries are visible."""
    b, s, _ = x.shape
    keys, valid = _compressor(x, positions, params["compressor"], ratio=sh.ratio_csa,
                              overlap=True, sh=sh, inv_freq=inv_freq)      # [B, N, Di]
    n = keys.shape[1]
    k = min(sh.topk, n)
    q = jnp.dot(q_latent, params["wq"], preferred_element_type=jnp.float32).astype(x.dtype)
    q = apply_rope(q.reshape(b, s, sh.index_heads, sh.index_dim), positions, inv_freq)
    w = jnp.dot(x, params["wproj"], preferred_element_type=jnp.float32)
    w = w * (sh.index_dim ** -0.5 * sh.index_heads ** -0.5)
    pad = -s % chunk
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    w = jnp.pad(w, ((0, 0), (0, pad), (0, 0)))
    e = jnp.arange(n)

    def one(c):
        qc = jax.lax.dynamic_slice_in_dim(q, c * chunk, chunk, axis=1)
        wc = jax.lax.dynamic_slice_in_dim(w, c * chunk, chunk, axis=1)
        dots = jnp.einsum("bthd,bnd->bthn", qc, keys, preferred_element_type=jnp.float32)
        scores = jnp.einsum("bthn,bth->btn", jax.nn.relu(dots), wc)
        t = c * chunk + jnp.arange(chunk)
        vis = (e[None, None, :] < (t[None, :, None] + 1) // sh.ratio_csa) & valid[:, None, :]
        vals, idx = jax.lax.top_k(jnp.where(vis, scores, -jnp.inf), k)
        return jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32)

    idx = jax.lax.map(one, jnp.arange((s + pad) // chunk))                # [C, B, chunk, k]
    return jnp.moveaxis(idx, 0, 1).reshape(b, s + pad, k)[:, :s]


def spread_topk(s: int, n: int, k: int, batch: int, seed: int, ratio: int) -> jax.Array:
    """[B, S, min(k, N)] distinct visible entries per query, spread over the visible range with
    a random phase (what a real top-k looks like to the kernel: scattered rows), -1 padded."""
    k = min(k, n)
    t = jnp.arange(s)[:, None]
    vis = (t + 1) // ratio                                               # entries visible to t
    j = jnp.arange(k)[None, :]
    phase = jax.random.uniform(jax.random.key(seed), (batch, s, 1))
    spread = jnp.floor((j + phase) * (vis / k)).astype(jnp.int32)        # distinct when vis >= k
    idx = jnp.where(vis >= k, spread, jnp.where(j < vis, j, -1))
    return jnp.broadcast_to(idx, (batch, s, k)).astype(jnp.int32)


def make_data(s: int, sh: Shapes, dtype, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 12)
    b, h, d = sh.batch, sh.heads, sh.head_dim
    nrm = lambda k, shape, std=1.0: (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)  # noqa: E731
    std_d = sh.hidden ** -0.5

    def compressor_params(k, width, out):
        k1, k2 = jax.random.split(k)
        return {"wkv": nrm(k1, (sh.hidden, width), std_d), "wgate": nrm(k2, (sh.hidden, width), std_d),
                "ape": jnp.zeros((1, width), jnp.float32), "norm": jnp.ones((out,), dtype)}

    data = {
        "x": nrm(ks[0], (b, s, sh.hidden)),
        "q_latent": nrm(ks[1], (b, s, sh.q_lora)),
        "q": nrm(ks[2], (b, s, h, d)),
        "kv": nrm(ks[3], (b, s, d)),
        "sink": jax.random.normal(ks[4], (h,), jnp.float32),
        "c_hca": nrm(ks[5], (b, s // sh.ratio_hca, d)),
        "c_csa": nrm(ks[6], (b, s // sh.ratio_csa, d)),
        "topk": spread_topk(s, s // sh.ratio_csa, sh.topk, b, seed, sh.ratio_csa),
        "p_hca": compressor_params(ks[7], d, d),
        "p_csa": compressor_params(ks[8], 2 * d, d),
        "p_idx": {"compressor": compressor_params(ks[9], 2 * sh.index_dim, sh.index_dim),
                  "wq": nrm(ks[10], (sh.q_lora, sh.index_heads * sh.index_dim), sh.q_lora ** -0.5),
                  "wproj": nrm(ks[11], (sh.hidden, sh.index_heads), std_d)},
    }
    for key in ("p_hca", "p_csa"):   # ape rows: one per slot of the window
        r = sh.ratio_hca if key == "p_hca" else sh.ratio_csa
        data[key]["ape"] = jnp.zeros((r, data[key]["wkv"].shape[1]), jnp.float32)
    data["p_idx"]["compressor"]["ape"] = jnp.zeros((sh.ratio_csa, 2 * sh.index_dim), jnp.float32)
    return data


def build_arm(arm: str, s: int, sh: Shapes, *, interpret: bool, kernel_impl: str, csa_impl: str):
    """-> (forward fn, differentiable-argument names, other-argument names)."""
    scale = sh.head_dim ** -0.5
    bsa = dict(implementation=kernel_impl, interpret=interpret)
    inv_freq_c = inv_frequencies(sh.rope_dim, 160000.0)
    positions = jnp.broadcast_to(jnp.arange(s), (sh.batch, s))
    chunk = int(min(1024, max(8, 2 ** int(math.log2(max(1, (1 << 27) // max(
        1, sh.index_heads * (s // sh.ratio_csa))))))))

    def csa(q, kv, comp, topk, sink):
        if csa_attention is None:
            raise RuntimeError(f"kernels_pallas.sparse_attention is not importable: "
                               f"{_CSA_IMPORT_ERROR}")
        return csa_attention(q, kv, comp, topk, sink, window=sh.window, scale=scale,
                             implementation=csa_impl, interpret=interpret)

    if arm == "dense_core":
        return (lambda q, kv, sink: block_sparse_attention(q, kv, sink, window=s, scale=scale, **bsa),
                ("q", "kv", "sink"), ())
    if arm == "hca_core":
        return (lambda q, kv, sink, c_hca: block_sparse_attention(
            q, kv, sink, window=sh.window, scale=scale, compressed=c_hca, ratio=sh.ratio_hca,
            **bsa), ("q", "kv", "sink", "c_hca"), ())
    if arm == "csa_core":
        return (lambda q, kv, sink, c_csa, topk: csa(q, kv, c_csa, topk, sink),
                ("q", "kv", "sink", "c_csa"), ("topk",))
    if arm == "hca_layer":
        def hca_layer(q, kv, sink, x, p_hca):
            comp, _ = _compressor(x, positions, p_hca, ratio=sh.ratio_hca, overlap=False, sh=sh,
                                  inv_freq=inv_freq_c)
            return block_sparse_attention(q, kv, sink, window=sh.window, scale=scale,
                                          compressed=comp, ratio=sh.ratio_hca, **bsa)
        return hca_layer, ("q", "kv", "sink", "x", "p_hca"), ()
    if arm == "csa_layer":
        def csa_layer(q, kv, sink, x, p_csa, q_latent, p_idx):
            comp, _ = _compressor(x, positions, p_csa, ratio=sh.ratio_csa, overlap=True, sh=sh,
                                  inv_freq=inv_freq_c)
            topk = _indexer_topk(jax.lax.stop_gradient(x), q_latent, positions, p_idx, sh=sh,
                                 inv_freq=inv_freq_c, chunk=chunk)
            return csa(q, kv, comp, topk, sink)
        return csa_layer, ("q", "kv", "sink", "x", "p_csa"), ("q_latent", "p_idx")
    raise ValueError(f"unknown arm {arm!r}: allowed {ARMS}")


def _forward_and_backward(fn, diff_names, other_names, data):
    """(fwd(*args), fwd_bwd(*args), args): fwd_bwd returns grads of sum(out * g) + sum(lse)."""
    diff = [data[k] for k in diff_names]
    other = [data[k] for k in other_names]
    nd = len(diff)

    def fwd(*args):
        return fn(*args[:nd], *args[nd:])

    def loss(diff_args, other_args, g):
        out, lse = fn(*diff_args, *other_args)
        return jnp.sum(out.astype(jnp.float32) * g) + jnp.sum(lse)

    grad = jax.grad(loss)

    def fwd_bwd(*args):
        return grad(list(args[:nd]), list(args[nd:-1]), args[-1])

    g = jax.random.normal(jax.random.key(99), data["q"].shape, jnp.float32).astype(data["q"].dtype)
    return fwd, fwd_bwd, diff + other, g


# ---------------------------------------------------------------------- cuDNN sanity check

def cudnn_check(s: int, sh: Shapes, runs: int, warmup: int, dtype) -> dict:
    """Our dense kernel vs cuDNN at head dim 256 with 2H heads (same FLOPs as hd 512 x H)."""
    if jax.default_backend() != "gpu":
        return {"skipped": "needs a GPU (cuDNN)"}
    h, d = 2 * sh.heads, sh.head_dim // 2
    ks = jax.random.split(jax.random.key(5), 2)
    q = jax.random.normal(ks[0], (sh.batch, s, h, d), jnp.float32).astype(dtype)
    kv = jax.random.normal(ks[1], (sh.batch, s, d), jnp.float32).astype(dtype)
    no_sink = jnp.full((h,), -1e30, jnp.float32)          # exp(sink - m) = 0: plain softmax
    ours = lambda q, kv: block_sparse_attention(q, kv, no_sink, window=s, scale=d ** -0.5,  # noqa: E731
                                                implementation="pallas_gpu")[0]
    cudnn = lambda q, kv: jax.nn.dot_product_attention(  # noqa: E731
        q, kv[:, :, None, :], kv[:, :, None, :], scale=d ** -0.5, is_causal=True,
        implementation="cudnn")
    out = {"seq": s, "heads": h, "head_dim": d}
    try:
        t_ours = statistics.median(time_compiled(ours, (q, kv), runs, warmup))
        t_cudnn = statistics.median(time_compiled(cudnn, (q, kv), runs, warmup))
        err = float(jnp.max(jnp.abs(jax.jit(ours)(q, kv).astype(jnp.float32)
                                    - jax.jit(cudnn)(q, kv).astype(jnp.float32))))
        fl = 4.0 * d * h * sh.batch * s * (s + 1) / 2
        out.update(ours_ms=1e3 * t_ours, cudnn_ms=1e3 * t_cudnn, ours_over_cudnn=t_ours / t_cudnn,
                   ours_tflops=fl / t_ours / 1e12, cudnn_tflops=fl / t_cudnn / 1e12,
                   max_abs_diff=err)
    except Exception as e:  # noqa: BLE001 - recorded, not hidden
        out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


# --------------------------------------------------------------------------------- driver

def _define(fv):
    benchlib.define_common(fv, "attention")
    flags.DEFINE_string("seq", None, "Comma-separated sequence lengths (default "
                        "8192,...,131072; --tiny: 64,128).", flag_values=fv)
    flags.DEFINE_integer("batch", 1, "Batch rows.", flag_values=fv)
    flags.DEFINE_string("arms", ",".join(ARMS), f"Comma-separated subset of {ARMS}.",
                        flag_values=fv)
    flags.DEFINE_boolean("no-backward", False, "Forward only.", flag_values=fv)
    flags.DEFINE_boolean("cudnn-check", False, "GPU: time/compare the dense kernel against "
                         "cuDNN at head dim 256.", flag_values=fv)


def parse_args(argv):
    args = benchlib.parse_flags(argv, _define)
    args.seq = benchlib.int_list(args.seq or ("64,128" if args.tiny else
                                              "8192,16384,32768,65536,131072"), "--seq")
    args.arms = benchlib.name_list(args.arms, "--arms", ARMS)
    benchlib.check_runs(args.runs, args.warmup)
    return args


def preset_config(name: str) -> ModelConfig:
    """The model preset's ModelConfig."""
    return benchlib.preset_model(name)


def run(args) -> dict:
    cfg = preset_config("tiny" if args.tiny else args.preset)
    sh = Shapes.from_config(cfg, args.batch)
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    backend = jax.default_backend()
    interpret = backend == "cpu"
    kernel_impl = "pallas_gpu" if backend == "gpu" else "pallas_tpu"
    csa_impl = "pallas_gpu" if backend == "gpu" else "pallas_tpu"
    meta = run_meta(preset="tiny" if args.tiny else args.preset, shapes=dataclasses.asdict(sh),
                    dtype=str(dtype), seq=args.seq, arms=args.arms, runs=args.runs,
                    warmup=args.warmup, backward=not args.no_backward, interpret=interpret,
                    csa_kernel=None if csa_attention is not None else _CSA_IMPORT_ERROR)
    peak = device_peak(dev.device_kind)
    rows = []
    passes = ["fwd"] + ([] if args.no_backward else ["fwd+bwd"])
    work = [(s, a, ps) for s in args.seq for a in args.arms for ps in passes]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(work), desc="bench_attention", file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    for s in args.seq:
        data = make_data(s, sh, dtype)
        for arm in args.arms:
            fn, diff_names, other_names = build_arm(arm, s, sh, interpret=interpret,
                                                    kernel_impl=kernel_impl, csa_impl=csa_impl)
            fwd, fwd_bwd, fargs, g = _forward_and_backward(fn, diff_names, other_names, data)
            for ps in passes:
                if bar is not None:
                    bar.set_postfix_str(f"S={s} {arm} {ps}")
                row = {"seq": s, "arm": arm, "pass": ps,
                       "flops": arm_flops(arm, s, sh, ps == "fwd+bwd")}
                try:
                    times = time_compiled(fwd if ps == "fwd" else fwd_bwd,
                                   fargs if ps == "fwd" else (*fargs, g), args.runs, args.warmup)
                    med = statistics.median(times)
                    row.update(median_ms=1e3 * med, min_ms=1e3 * min(times),
                               runs_ms=[1e3 * t for t in times],
                               tflops=row["flops"] / med / 1e12,
                               frac_peak=None if peak is None else row["flops"] / med / peak)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded in the table
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                rows.append(row)
                if bar is not None:
                    bar.update(1)
        del data
    if bar is not None:
        bar.close()
    dense = {(r["seq"], r["pass"]): r for r in rows if r["arm"] == "dense_core" and "median_ms" in r}
    for r in rows:
        base = dense.get((r["seq"], r["pass"]))
        if base is not None and "median_ms" in r:
            r["speedup_vs_dense"] = base["median_ms"] / r["median_ms"]
            r["flop_ratio_vs_dense"] = base["flops"] / r["flops"]
    result = {"meta": meta, "rows": rows}
    if args.cudnn_check:
        result["cudnn_check"] = [cudnn_check(s, sh, args.runs, args.warmup, dtype) for s in args.seq]
    result["crossover"] = crossover(rows)
    return result


def crossover(rows) -> dict:
    """Per (arm, pass): the smallest measured S from which the arm beats dense_core at every
    measured S (None if it never does)."""
    out = {}
    for arm in {r["arm"] for r in rows} - {"dense_core"}:
        for ps in {r["pass"] for r in rows}:
            pts = sorted((r["seq"], r.get("speedup_vs_dense")) for r in rows
                         if r["arm"] == arm and r["pass"] == ps)
            win = None
            for s, sp in reversed(pts):
                if sp is None or sp <= 1.0:
                    break
                win = s
            out[f"{arm} {ps}"] = win
    return out


def format_table(result: dict) -> str:
    m = result["meta"]
    lines = [benchlib.header(m, f"B={m['shapes']['batch']} H={m['shapes']['heads']} "
                                f"D={m['shapes']['head_dim']}"),
             f"{'S':>7} {'arm':<11} {'pass':<8} {'median ms':>10} {'TFLOP/s':>9} {'% peak':>7} "
             f"{'vs dense':>9} {'FLOP ratio':>10}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['seq']:>7} {r['arm']:<11} {r['pass']:<8} ERROR {r['error']}")
            continue
        sp = r.get("speedup_vs_dense")
        fr = r.get("flop_ratio_vs_dense")
        lines.append(f"{r['seq']:>7} {r['arm']:<11} {r['pass']:<8} {r['median_ms']:>10.3f} "
                     f"{r['tflops']:>9.3f} {benchlib.percent_of_peak(r):>7} "
                     f"{'' if sp is None else f'{sp:.2f}x':>9} "
                     f"{'' if fr is None else f'{fr:.1f}x':>10}")
    for c in result.get("cudnn_check", []):
        lines.append(f"cuDNN check: {json.dumps(c)}")
    lines.append(f"sparse wins from S = {json.dumps(result['crossover'])}")
    return "\n".join(lines)


main = benchlib.main_of(parse_args, run, format_table, "attention")


if __name__ == "__main__":
    main()
