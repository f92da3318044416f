"""A long prompt prefilled and decoded on one machine (issue 24): the cached path at up to 1M.

    python -m experiments.long_context --workdir=DIR --context=1048576 [--arms=sparse,dense]
        [--model=lc_small] [--chunk=1024] [--decode-tokens=32] [--depths=0.1,0.5,0.9]
        [--dense-budget-s=900] [--part-positions=5] [--out=benchmarks/long_context]

The prompt: the stdlib corpus (`sparse_lm.data.stdlib_corpus`, the running interpreter's
standard library, train split, files in path order) concatenated as bytes up to `--context`
minus the decoded tokens, with one needle `# key XXXX = 123456` inserted at each depth and the
question of the first needle at the end. The model is randomly initialised (`--seed`): this run
measures cost, not retrieval (its decoded tokens are recorded, not scored).

Arms:
  sparse  the library `Decoder` on the model's compressed cache (max_len = context):
          `Decoder.prefill` in `--chunk`-token chunks (sync=True, so each chunk is timed to its
          end), then `--decode-tokens` greedy `Decoder.decode` steps.
  dense   the library's dense baseline (`sparse_lm.inference.dense`: every layer a causal
          attention over a full KV cache [1, L, D], the same Decoder) at L = 4K, 8K, ... while
          the next length's projected prefill (its cost grows as L^2) fits in what is left of
          `--dense-budget-s`: its last feasible length, decode ms/token there, that extrapolated
          linearly to the context (from the last two lengths, and a least-squares line over
          all of them), and the cache bytes it would need at the context. Then its decode
          measured AT the context on a full KV cache filled with random rows (a decode step's
          cost does not depend on what the rows hold; `dense_decode_on_filled_cache`).
          `decode_speedup` divides each dense figure by the sparse arm's decode ms/token.

Reported (JSON in the workdir and in `--out`, plus a plot over every JSON in `--out`):
prefill tokens/s by position (per chunk), prefill time (wall, and without the first chunk's
compilation: `prefill_s`), decode ms/token at the final
context, peak RSS (`ru_maxrss`, measured before the dense arm starts), cache bytes measured on
the arrays vs `analysis.accounting.kv_cache_bytes` (4-byte rows and tails), and the time split
of the prefill: the cached path's parts (indexer scoring, indexer top-k merge, attention of each
layer kind) jitted alone on cache-shaped inputs at `--part-positions` evenly spaced positions,
interpolated over every chunk's position and summed; `rest` = prefill time minus the parts.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from sparse_lm.analysis.accounting import kv_cache_bytes
from sparse_lm import presets
from sparse_lm.config import ModelConfig
from sparse_lm.data.synthetic import needle_question, needle_text
from sparse_lm.inference import Decoder, cache_bytes, full_attention_config, init_full_kv_cache
from sparse_lm.inference.dense import full_kv_cache_bytes
from sparse_lm.model.transformer import build_model
from sparse_lm.ops.attention import cached_attention
from sparse_lm.ops.indexer import block_scorer, blocked_indexer_topk
from sparse_lm.ops.kv_cache import ring_positions
from sparse_lm.ops.visible import INDEXER_KEY_BLOCK, block_size, fold_visible_blocks
from sparse_lm.train.config_check import UserError, run_main

ARMS = ("sparse", "dense")
FLAGS = flags.FLAGS


# ------------------------------------------------------------------------------ the model
def lc_small() -> ModelConfig:
    """`lc_small` (defined in `sparse_lm.presets.lc_small`, shared with configs/needle_lc.py)."""
    return ModelConfig.from_dict(presets.lc_small())


MODELS = {"lc_small": lc_small}


# ------------------------------------------------------------------------------ the prompt
def corpus_bytes(n: int) -> np.ndarray:
    """The first n bytes of the stdlib corpus's train split, files concatenated in path order."""
    from sparse_lm.data.stdlib_corpus import StdlibCorpus
    corpus = StdlibCorpus("train")
    parts, total = [], 0
    for i in range(len(corpus)):
        parts.append(corpus[i])
        total += len(corpus[i])
        if total >= n:
            break
    out = np.concatenate(parts)
    if len(out) < n:
        raise UserError(f"--context={n}: the stdlib corpus holds only {len(out)} bytes")
    return out[:n]


def build_prompt(length: int, depths: list[float], seed: int = 0):
    """(tokens [length] int32, needles [{depth, position, key, value}]): corpus bytes with a
    needle at each depth and the first needle's question at the end."""
    rng = np.random.default_rng(seed)
    needles = []
    for d in depths:
        key = bytes(rng.choice(list(b"abcdefghijklmnopqrstuvwxyz"), 4).tolist())
        value = bytes(rng.choice(list(b"0123456789"), 6).tolist())
        needles.append({"depth": d, "key": key.decode(), "value": value.decode(),
                        "text": needle_text(key, value)})
    question = needle_question(needles[0]["key"].encode()) if needles else b""
    n_fill = length - len(question) - sum(len(n["text"]) for n in needles)
    if n_fill < 1:
        raise UserError(f"--context={length} is too short for {len(depths)} needles")
    fill = corpus_bytes(n_fill)
    pieces, at = [], 0
    for n in sorted(needles, key=lambda n: n["depth"]):
        cut = int(round(n["depth"] * n_fill))
        pieces.append(fill[at:cut])
        n["position"] = sum(len(p) for p in pieces)
        pieces.append(np.frombuffer(n.pop("text"), np.uint8))
        at = cut
    pieces += [fill[at:], np.frombuffer(question, np.uint8)]
    tokens = np.concatenate(pieces).astype(np.int32)
    assert len(tokens) == length
    return tokens, needles


# ------------------------------------------------------------------------------ measuring
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB


def _block(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def _timed(fn, args, runs: int = 2) -> float:
    """Median seconds of `runs` calls after one untimed (compiling) call."""
    _block(fn, *args)
    return float(np.median([_block(fn, *args) for _ in range(runs)]))


def _scores_only(q, w, keys, q_pos, ratio):
    """The indexer's scoring alone over the visible key blocks (`blocked_indexer_topk` without
    the top-k merge: the same block scorer, each block's scores reduced to one max per query)."""
    block = block_size(INDEXER_KEY_BLOCK, q.shape[1] * q.shape[2], keys.shape[1])
    score = block_scorer(q, w, keys, block)

    def step(best, rows, row_idx, vis):
        return jnp.maximum(best, jnp.max(score(rows, vis, row_idx[0]), axis=-1))
    return fold_visible_blocks(keys, q_pos, ratio, block, step,
                               jnp.full(q.shape[:2], -jnp.inf))[0]


def part_seconds(cfg: ModelConfig, max_len: int, chunk: int, position: int, seed: int = 0):
    """Seconds of each part of one cached step of `chunk` tokens at `position` (one layer each,
    random cache-shaped inputs): indexer_scoring, indexer_topk (the merge: top-k total minus
    scoring), and the attention (`cached_attention`: ring + chunk rows + entries) of a layer of
    each kind."""
    ks = iter(jax.random.split(jax.random.key(seed), 8))
    b, t, h, d = 1, chunk, cfg.num_heads, cfg.head_dim
    q_pos = position + jnp.arange(t, dtype=jnp.int32)[None, :]
    n_idx = max_len // cfg.compress_ratio_csa
    qi = jax.random.normal(next(ks), (b, t, cfg.index_n_heads, cfg.index_head_dim))
    wi = jax.random.normal(next(ks), (b, t, cfg.index_n_heads))
    keys = jax.random.normal(next(ks), (b, n_idx, cfg.index_head_dim))
    ratio = cfg.compress_ratio_csa
    topk = jax.jit(lambda *a: blocked_indexer_topk(*a, ratio=ratio, k=cfg.index_topk)[0])
    scores = jax.jit(lambda *a: _scores_only(*a, ratio))
    out = {"indexer_scoring": _timed(scores, (qi, wi, keys, q_pos))}
    out["indexer_topk"] = max(0.0, _timed(topk, (qi, wi, keys, q_pos)) - out["indexer_scoring"])
    q = jax.random.normal(next(ks), (b, t, h, d))
    w = cfg.sliding_window
    ring = jax.random.normal(next(ks), (b, w + t, d))
    key_pos = jnp.concatenate([ring_positions(jnp.full((b,), position), w), q_pos], axis=1)
    sink = jnp.zeros((h,))
    for kind in ("swa", "csa", "hca"):
        if kind not in cfg.layer_kinds:
            continue
        m = cfg.ratio_of(kind)
        entries = (None if kind == "swa"
                   else jax.random.normal(next(ks), (b, max_len // m, d)))
        picks = None
        if kind == "csa":
            count = max(1, (position + 1) // m)
            picks = jax.random.randint(next(ks), (b, t, cfg.index_topk), 0, count)
        attend = jax.jit(lambda q, e, p, m=m: cached_attention(
            q, q_pos, ring, key_pos, sink, window=w, scale=d ** -0.5, entries=e, ratio=m,
            topk_idx=p))
        out[f"{kind}_attention"] = _timed(attend, (q, entries, picks))
    return out


def time_split(cfg: ModelConfig, max_len: int, chunk: int, chunk_starts: list[int],
               prefill_s: float, n_positions: int) -> dict:
    """The prefill's time split: each part timed at n_positions evenly spaced chunk starts,
    interpolated linearly over every chunk's start, summed over chunks and layers."""
    sample = np.linspace(0, max(chunk_starts), n_positions).astype(int).tolist()
    measured = [part_seconds(cfg, max_len, chunk, p) for p in sample]
    layers = {k: cfg.layer_kinds.count(k) for k in ("swa", "csa", "hca")}
    total = {}
    for part in measured[0]:
        per = np.interp(chunk_starts, sample, [m[part] for m in measured])
        count = layers["csa"] if part.startswith("indexer") else layers[part.split("_")[0]]
        total[part] = float(np.sum(per) * count)
    total["rest"] = prefill_s - sum(total.values())
    return {"seconds": total, "sampled_positions": sample, "per_step_at_samples": measured}


def timed_prefill(dec, cache, prompt, chunk, bar=None):
    """`Decoder.prefill` of one prompt with every chunk timed to its end -> (logits, cache,
    record): prefill_wall_s, compile_s (the first chunk also compiles the step: its compute is
    estimated by the second chunk's), prefill_s (wall minus compile), tokens/s, the chunks'
    starts and seconds."""
    starts, times = [], []
    clock = [time.perf_counter()]

    def progress(done, total):
        now = time.perf_counter()
        starts.append((done - 1) * chunk)
        times.append(now - clock[0])
        clock[0] = now
        if bar is not None:
            bar.update(min(done * chunk, len(prompt)) - bar.n)
            bar.set_postfix(position=min(done * chunk, len(prompt)),
                            tok_s=f"{chunk / max(times[-1], 1e-9):.0f}")
    t0 = time.perf_counter()
    logits, cache = dec.prefill(cache, [prompt], chunk_size=chunk, progress=progress, sync=True)
    wall = time.perf_counter() - t0
    compile_s = max(0.0, times[0] - times[1]) if len(times) > 1 else 0.0
    return logits, cache, {
        "prefill_tokens": len(prompt), "prefill_wall_s": wall, "compile_s": compile_s,
        "prefill_s": wall - compile_s, "prefill_tokens_per_s": len(prompt) / (wall - compile_s),
        "first_chunk_s": times[0], "chunks": {"start": starts, "seconds": times}}


# ------------------------------------------------------------------------------ the arms
def run_sparse(cfg, tokens, *, context, chunk, decode_tokens, seed, bar) -> dict:
    model = build_model(cfg, seed=seed)
    dec = Decoder(model)
    prompt = tokens[: context - decode_tokens]
    rss_before = peak_rss_bytes()
    cache = dec.init_cache(1, context)
    measured_cache = sum(d["entries"] + d["state"] for d in cache_bytes(cfg, cache).values())
    logits, cache, pre = timed_prefill(dec, cache, prompt, chunk, bar)
    out_tokens, step_ms = [], []
    for _ in range(decode_tokens):
        tok = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        out_tokens.append(int(tok[0]))
        t1 = time.perf_counter()
        logits, cache = dec.decode(cache, tok)
        jax.block_until_ready(logits)
        step_ms.append((time.perf_counter() - t1) * 1e3)
    peak = peak_rss_bytes()
    analytic = kv_cache_bytes(cfg, context, "bf16", dtype_bytes=4, state_dtype_bytes=4)
    return {
        **pre,
        # the first decode step compiles the 1-token step: excluded from the median
        "decode_ms_per_token": float(np.median(step_ms[1:] if len(step_ms) > 1 else step_ms)),
        "decode_ms": step_ms, "decoded_tokens": out_tokens,
        "peak_rss_bytes": peak, "rss_before_cache_bytes": rss_before,
        "cache_bytes_measured": measured_cache, "cache_bytes_analytic": analytic,
        "peak_rss_minus_cache_bytes": peak - analytic,
    }


def _dense_lengths(context: int) -> list[int]:
    out, n = [], 4096
    while n < context:
        out.append(n)
        n *= 2
    return out + [context]


def run_dense(cfg, tokens, *, context, chunk, decode_tokens, seed, budget_s, bar) -> dict:
    """The dense arm up its length ladder while the next prefill is projected to fit; then,
    if that stopped short of the context, its decode at the context on a filled cache
    (`dense_decode_on_filled_cache`)."""
    rows, spent, skipped = [], 0.0, None
    for n in _dense_lengths(context):
        if rows:
            projected = rows[-1]["prefill_s"] * (n / rows[-1]["context"]) ** 2
            if spent + projected > budget_s:
                skipped = {"context": n, "projected_prefill_s": projected}
                break
        cfg_d = full_attention_config(cfg, window=n)
        dec = Decoder(build_model(cfg_d, seed=seed))
        cache = init_full_kv_cache(cfg_d, 1, n)
        logits, cache, pre = timed_prefill(dec, cache, tokens[: n - decode_tokens], chunk)
        prefill_s = pre["prefill_s"]       # without compilation: the projection is of compute
        ms = []
        for _ in range(decode_tokens):
            tok = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
            t1 = time.perf_counter()
            logits, cache = dec.decode(cache, tok)
            jax.block_until_ready(logits)
            ms.append((time.perf_counter() - t1) * 1e3)
        rows.append({"context": n, "prefill_s": prefill_s, "compile_s": pre["compile_s"],
                     "decode_ms_per_token":
                     float(np.median(ms[1:] if len(ms) > 1 else ms)),
                     "cache_bytes": full_kv_cache_bytes(cache)})
        spent += pre["prefill_wall_s"]
        del cache, dec
        if bar is not None:
            bar.set_postfix(dense_context=n, dense_prefill_s=f"{prefill_s:.0f}")
    at_context = jax.eval_shape(
        lambda: init_full_kv_cache(full_attention_config(cfg, window=context), 1, context))
    last = rows[-1]
    slope = (last["decode_ms_per_token"] / last["context"] if len(rows) < 2 else
             (last["decode_ms_per_token"] - rows[-2]["decode_ms_per_token"])
             / (last["context"] - rows[-2]["context"]))
    out = {"lengths": rows, "last_feasible_context": last["context"],
           "first_skipped": skipped, "budget_s": budget_s,
           "cache_bytes_at_context": full_kv_cache_bytes(at_context),
           "decode_ms_per_token_extrapolated": last["decode_ms_per_token"]
           + slope * (context - last["context"])}
    if len(rows) >= 2:
        b, a = np.polyfit([r["context"] for r in rows],
                          [r["decode_ms_per_token"] for r in rows], 1)
        out["decode_ms_per_token_extrapolated_lsq"] = float(a + b * context)
    if last["context"] < context:
        out["filled_cache"] = dense_decode_on_filled_cache(cfg, context, decode_tokens, seed)
    return out


def dense_decode_on_filled_cache(cfg, context: int, steps: int, seed: int) -> dict:
    """The dense arm's decode measured at the full context, where its prefill is out of reach:
    the full KV cache [1, context, D] per layer filled with random rows and `context - steps`
    tokens marked held, then `steps` greedy decode steps (a step's cost does not depend on
    what the rows hold). -> decode ms/token (median without the compiling first step)."""
    cfg_d = full_attention_config(cfg, window=context)
    dec = Decoder(build_model(cfg_d, seed=seed))
    cache = init_full_kv_cache(cfg_d, 1, context)
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(cache))))

    def fill(x):
        k = next(keys)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jax.random.normal(k, x.shape, x.dtype) * 0.5
    cache = dataclasses.replace(jax.tree.map(fill, cache),
                                lengths=jnp.full((1,), context - steps, jnp.int32))
    tok, ms = np.zeros((1,), np.int32), []
    for _ in range(steps):
        t1 = time.perf_counter()
        logits, cache = dec.decode(cache, tok)
        jax.block_until_ready(logits)
        ms.append((time.perf_counter() - t1) * 1e3)
        tok = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    return {"context": context, "held": context - steps, "held_after": int(cache.lengths[0]),
            "steps": steps, "decode_ms_per_token": float(np.median(ms[1:] if len(ms) > 1 else ms)),
            "decode_ms": ms, "cache_bytes": full_kv_cache_bytes(cache)}


# ------------------------------------------------------------------------------ output
def plot(out_dir: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = []
    for p in sorted(out_dir.glob("context_*.json")):
        results.append(json.loads(p.read_text()))
    results = [r for r in results if "sparse" in r]
    if not results:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in sorted(results, key=lambda r: r["context"]):
        c = r["sparse"]["chunks"]
        tps = [r["chunk"] / max(s, 1e-9) for s in c["seconds"]]
        a.plot(c["start"][1:], tps[1:], lw=0.8, label=f"{r['context'] >> 10}K")
    a.set_xlabel("position (tokens)")
    a.set_ylabel("prefill tokens/s")
    a.set_yscale("log")
    a.set_title(f"prefill, chunks of {results[0]['chunk']} ({results[0]['model']})")
    a.legend()
    xs = [r["context"] for r in results]
    b.plot(xs, [r["sparse"]["decode_ms_per_token"] for r in results], "o-", label="sparse")
    dense = {}
    for r in results:
        for row in r.get("dense", {}).get("lengths", []):
            dense[row["context"]] = row["decode_ms_per_token"]
        if "dense" in r:
            dense_x = r["context"]
            b.plot([dense_x], [r["dense"]["decode_ms_per_token_extrapolated"]], "x",
                   color="C1", label="dense extrapolated" if dense_x == max(xs) else None)
            if "filled_cache" in r["dense"]:
                b.plot([dense_x], [r["dense"]["filled_cache"]["decode_ms_per_token"]], "D",
                       color="C1", mfc="none",
                       label="dense, filled cache" if dense_x == max(xs) else None)
    if dense:
        b.plot(sorted(dense), [dense[k] for k in sorted(dense)], "s-", color="C1",
               label="dense (measured)")
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("context (tokens)")
    b.set_ylabel("decode ms/token")
    b.legend()
    fig.tight_layout()
    path = out_dir / "long_context.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _git() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ------------------------------------------------------------------------------ flags / main
def _define():
    flags.DEFINE_string("workdir", None, "Run directory (result.json, progress).")
    flags.DEFINE_integer("context", 1 << 20, "Context length: prompt + decoded tokens.")
    flags.DEFINE_string("arms", "sparse", f"Comma-separated arms from {ARMS}.")
    flags.DEFINE_string("model", "lc_small", f"Named model: one of {sorted(MODELS)}.")
    flags.DEFINE_integer("chunk", 1024, "Prefill chunk length (sparse arm).")
    flags.DEFINE_integer("dense-chunk", 256, "Prefill chunk length of the dense arm.")
    flags.DEFINE_integer("decode-tokens", 32, "Greedy tokens decoded after the prompt.")
    flags.DEFINE_string("depths", "0.1,0.5,0.9", "Needle depths in [0, 1], comma-separated.")
    flags.DEFINE_float("dense-budget-s", 900.0, "Wall-time budget of the dense arm's prefills.")
    flags.DEFINE_integer("part-positions", 5, "Positions the time split's parts are timed at "
                         "(0 = no split).")
    flags.DEFINE_string("out", "benchmarks/long_context", "Directory of the JSON and the plot.")
    flags.DEFINE_integer("seed", 0, "Model initialisation and needle seed.")
    flags.DEFINE_bool("progress", True, "Show a progress bar of the prefill position.")
    for name in ("dense-chunk", "decode-tokens", "dense-budget-s", "part-positions"):
        flags.DEFINE_alias(name.replace("-", "_"), name)


def check_args(a) -> dict:
    """Validated settings from the parsed flags (UserError naming the flag otherwise)."""
    if not a.workdir:
        raise UserError("--workdir is required: the run directory")
    if a.model not in MODELS:
        raise UserError(f"--model={a.model!r} is invalid: allowed values {sorted(MODELS)}")
    arms = [x for x in a.arms.split(",") if x]
    bad = [x for x in arms if x not in ARMS]
    if not arms or bad:
        raise UserError(f"--arms={a.arms!r} is invalid: a comma-separated subset of {ARMS}")
    cfg = MODELS[a.model]()
    for name, v, lo in (("chunk", a.chunk, 1), ("dense-chunk", a.dense_chunk, 1),
                        ("decode-tokens", a.decode_tokens, 1),
                        ("part-positions", a.part_positions, 0)):
        if v < lo:
            raise UserError(f"--{name}={v} is invalid: must be an integer >= {lo}")
    if a.part_positions == 1:
        raise UserError("--part-positions=1 is invalid: 0 (no split) or >= 2")
    if a.dense_budget_s <= 0:
        raise UserError(f"--dense-budget-s={a.dense_budget_s} is invalid: must be > 0")
    if a.context < 4096 or a.context <= a.decode_tokens:
        raise UserError(f"--context={a.context} is invalid: must be >= 4096 and > "
                        f"--decode-tokens={a.decode_tokens}")
    if cfg.max_context and a.context > cfg.max_context:
        raise UserError(f"--context={a.context} exceeds --model={a.model}'s max_context="
                        f"{cfg.max_context}")
    try:
        depths = [float(x) for x in a.depths.split(",") if x]
    except ValueError:
        raise UserError(f"--depths={a.depths!r} is invalid: comma-separated numbers in [0, 1]")
    if any(not 0 <= d <= 1 for d in depths):
        raise UserError(f"--depths={a.depths!r} is invalid: every depth must be in [0, 1]")
    return {"cfg": cfg, "arms": arms, "depths": depths}


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    a = FLAGS
    s = check_args(a)
    cfg, context = s["cfg"], a.context
    workdir, out_dir = Path(a.workdir), Path(a.out)
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens, needles = build_prompt(context, s["depths"], a.seed)
    result = {"experiment": "long_context", "model": a.model, "config": cfg.to_dict(),
              "context": context, "chunk": a.chunk, "decode_tokens": a.decode_tokens,
              "needles": needles, "seed": a.seed, "git_commit": _git(),
              "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
              "cpu_count": os.cpu_count(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    bar = None
    if a.progress:
        from tqdm import tqdm
        bar = tqdm(total=context - a.decode_tokens, desc=f"prefill {context >> 10}K",
                   unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True)

    def save():
        text = json.dumps(result, indent=1)
        (workdir / "result.json").write_text(text)
        (out_dir / f"context_{context}.json").write_text(text)
    t_run = time.perf_counter()
    if "sparse" in s["arms"]:
        result["sparse"] = run_sparse(cfg, tokens, context=context, chunk=a.chunk,
                                      decode_tokens=a.decode_tokens, seed=a.seed, bar=bar)
        save()
        if a.part_positions:
            sp = result["sparse"]
            result["sparse"]["time_split"] = time_split(
                cfg, context, a.chunk, sp["chunks"]["start"], sp["prefill_s"], a.part_positions)
            save()
    if bar is not None:
        bar.close()
    if "dense" in s["arms"]:
        result["dense"] = run_dense(cfg, tokens, context=context, chunk=a.dense_chunk,
                                    decode_tokens=a.decode_tokens, seed=a.seed,
                                    budget_s=a.dense_budget_s, bar=None)
    if "sparse" in result and "dense" in result:
        d, sparse_ms = result["dense"], result["sparse"]["decode_ms_per_token"]
        figures = {"extrapolated_last_two": d["decode_ms_per_token_extrapolated"],
                   "extrapolated_lsq": d.get("decode_ms_per_token_extrapolated_lsq"),
                   "measured_on_filled_cache": d.get("filled_cache", {}).get(
                       "decode_ms_per_token")}
        result["decode_speedup"] = {k: v / sparse_ms for k, v in figures.items() if v}
    result["wall_s"] = time.perf_counter() - t_run
    save()
    path = plot(out_dir)
    sp = result.get("sparse")
    if sp:
        print(f"sparse {context} tokens: prefill {sp['prefill_s']:.0f} s "
              f"({sp['prefill_tokens_per_s']:.0f} tok/s), decode "
              f"{sp['decode_ms_per_token']:.2f} ms/token, peak RSS "
              f"{sp['peak_rss_bytes'] / 2**20:.0f} MiB, cache {sp['cache_bytes_measured']} B "
              f"(analytic {sp['cache_bytes_analytic']} B)")
    if "dense" in result:
        d = result["dense"]
        print(f"dense: last feasible {d['last_feasible_context']}, decode "
              f"{d['lengths'][-1]['decode_ms_per_token']:.2f} ms/token there, "
              f"{d['decode_ms_per_token_extrapolated']:.1f} ms/token extrapolated to {context}, "
              f"cache at {context}: {d['cache_bytes_at_context'] / 2**20:.0f} MiB"
              + (f"; measured on a filled {context}-token cache: "
                 f"{d['filled_cache']['decode_ms_per_token']:.1f} ms/token"
                 if "filled_cache" in d else ""))
    if "decode_speedup" in result:
        print("sparse decode speedup: " + ", ".join(
            f"{k} {v:.1f}x" for k, v in result["decode_speedup"].items()))
    print(f"wrote {out_dir / f'context_{context}.json'}" + (f" and {path}" if path else ""))
    return 0


if __name__ == "__main__":
    _define()
    run_main(main, config_flag=None)
