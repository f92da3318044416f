"""Decode step time against context length: the sparse V4 cache vs a dense full-context cache.

    python -m experiments.bench_decode [--lengths 1024,2048,...,65536]
        [--arms sparse,dense[,dense_ring]] [--runs 20] [--warmup 3] [--batch 1]
        [--dtype float32] [--no-parts] [--hlo] [--json benchmarks/decode_cpu.json]
        [--plot benchmarks/decode_cpu.png] [--markdown] [--tiny] [--from-json PATH]

The model: a small V4-shaped model (`bench_config`: 7 layers swa, swa, [csa, hca] x 2, csa;
16 heads over one shared K=V head of 256; window 128; CSA ratio 4 with top-512 over 16 indexer
heads of 64; HCA ratio 128; MoE 8 experts top-2; mHC 4 streams). Its attention keeps the
released V4-Flash proportions: the dense core reads and multiplies 16x more per token of context
than the indexer does (memory 256 vs 64/4 values per token, MACs 16*256*2 vs 16*64/4).

Arms, each timed on its own freshly allocated cache sized exactly for the context length L
being measured (max_len = L):
  sparse      the library decoder (`sparse_lm.inference.Decoder.step`: jitted, cache donated),
              i.e. what `generate` runs: window ring buffer + compressor tails + compressed
              entries and indexer keys for L tokens; layers unrolled, one cache per layer, the
              new rows written in place (its compiled step holds no cache-sized copy either).
  dense       the library's dense baseline (`sparse_lm.inference.dense`): the same model with
              every layer a plain causal attention over a full KV cache [B, L, D] (MQA, the same
              shared K=V head, query/KV/output projections, sinks, mHC and MoE; no compressor
              or indexer), run by the same `Decoder`: a step writes its row in place and
              attends over the cache with the library's cached attention. `--hlo` counts the
              cache-sized copies of its compiled step. Both arms run the same MoE code: a decode
              step's experts multiply by the chosen experts' gathered weights
              (`ops.moe.experts_gathered`; `lax.ragged_dot` transposed all expert weights,
              44 MB here, every step).
  dense_ring  (optional) the library decoder with every layer an SWA layer whose window is L:
              also a full-context cache, but through the ring-buffer code path, which copies
              the window into the key array and rewrites the ring every step (fine for W = 128,
              wasteful for W = L): shows what that path would cost, not a fair baseline.

Cache contents: prefilling 64K tokens through the dense arm costs ~2.4e14 attention FLOPs
(hours on a 2-core CPU), so every cache is filled directly with random but valid contents
(`fill_cache`, `fill_dense_cache`): `lengths` = L - n for the n steps that follow, ring
slots / entries / indexer keys / dense rows of the held tokens random (unit scale, as after the
kv RMSNorm), unused ones zero, compressor tails filled in the slots a real prefill fills (gates
-inf elsewhere). Step time does not depend on the values
except through the top-k's data-dependent sort. The timed steps cover positions L-n .. L-1.

Timing (design.md section 8): one process, the same dtype for every arm; each arm's first call
(compilation + one step) is excluded, then `--warmup` steps, then `--runs` timed steps per arm,
interleaved between the arms (sparse, dense, sparse, dense, ...) so that the load of a shared
machine drifts over all arms alike; each step is ended by `block_until_ready`; the median is
reported (every run is in the JSON).

Parts (`--no-parts` skips them): how each piece of attention grows with context, timed by
jitting the library's functions alone on cache-shaped random inputs, one decode query, one layer,
their timed calls interleaved with the arms' steps of the same length:
  window      `cached_attention` over the 128-row ring + the new row (every layer; = SWA layer)
  csa_attn    the same + the top-k entries gathered from the [B, L/4, D] entries (CSA layer)
  hca_attn    the same + every visible entry of the [B, L/128, D] entries (HCA layer)
  indexer     `blocked_indexer_topk` over the [B, L/4, D_I] indexer keys (CSA layer: what
              `Indexer.cached` runs, scores of the visible key blocks into a running top-k)
  dense_attn  `cached_attention` over the full [B, L, D] cache (one layer of the dense arm)
with their FLOPs (2 per multiply-add; attention 4*H*D per attended key, indexer 2*H_I*D_I per
key) and the bytes of cache they read. `other` = step time minus the attention parts summed over
the layers (projections, compressors, MoE, mHC, head, cache writes, dispatch).

`--hlo` (diagnostic) also counts, at the largest length, the bytes of cache-sized (>= 1 MiB)
`copy` and `transpose` instructions in each arm's compiled step: copies XLA inserted (layout
changes, buffers it could not update in place), counted once per instruction (not per loop
iteration).

Output: a table on stdout, a JSON file (device, JAX version, git commit, load average, config,
every run) and a log-log PNG plot; `--from-json` redraws both from an earlier JSON. `--tiny`
runs a toy model at two short lengths (seconds of compute).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform as platform_lib
import re
import statistics
import sys
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import flags

from experiments import benchlib
from sparse_lm.analysis import accounting as acc
from sparse_lm.config import ModelConfig
from sparse_lm.inference.cache import Cache, CompressorCache, LayerCache, cache_bytes, init_cache
from sparse_lm.inference.decode import Decoder
from sparse_lm.inference.dense import (full_attention_config, full_kv_cache_bytes,
                                       init_full_kv_cache)
from sparse_lm.model.layers import dtype_of
from sparse_lm.model.transformer import build_model
from sparse_lm.ops.attention import cached_attention
from sparse_lm.ops.indexer import blocked_indexer_topk
from sparse_lm.ops.kv_cache import FullKVCache, ring_positions

ARMS = ("sparse", "dense", "dense_ring")
PARTS = ("window", "csa_attn", "hca_attn", "indexer", "dense_attn")
DEFAULT_LENGTHS = tuple(1024 << i for i in range(7))           # 1K .. 64K
TINY_LENGTHS = (64, 128)


BenchError = benchlib.FlagError     # bad benchmark arguments; the message names the flag


# ------------------------------------------------------------------------------ models

def bench_config(*, tiny: bool = False, dtype: str = "float32") -> ModelConfig:
    """The benchmarked sparse model (see the module docstring); `tiny`: a toy one for tests."""
    if tiny:
        return ModelConfig(
            vocab_size=256, hidden_size=32, num_layers=3, num_heads=2, head_dim=16,
            rope_head_dim=8, q_lora_rank=16, o_groups=1, o_lora_rank=16, sliding_window=8,
            layer_prefix=("swa",), layer_cycle=("csa", "hca"), layer_tail=(),
            compress_ratio_csa=4, compress_ratio_hca=16, index_n_heads=2, index_head_dim=8,
            index_topk=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            num_hash_layers=1, yarn_original_max_position=64, mtp_depth=0, dtype=dtype,
            param_dtype="float32")
    return ModelConfig(
        vocab_size=256, hidden_size=256, num_layers=7, num_heads=16, head_dim=256,
        rope_head_dim=32, q_lora_rank=256, o_groups=4, o_lora_rank=128, sliding_window=128,
        layer_prefix=("swa", "swa"), layer_cycle=("csa", "hca"), layer_tail=("csa",),
        compress_ratio_csa=4, compress_ratio_hca=128, index_n_heads=16, index_head_dim=64,
        index_topk=512, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        num_hash_layers=2, yarn_original_max_position=4096, mtp_depth=0, dtype=dtype,
        param_dtype="float32")


# ------------------------------------------------------------------------------ cache filling

def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _rows_held(n_rows: int, held: int) -> jax.Array:
    """[n_rows] bool: row i < held."""
    return jnp.arange(n_rows) < held


def _fill_compressor(cc: CompressorCache, ratio: int, overlap: bool, length: int,
                     key) -> CompressorCache:
    """Tail slots a prefill of `length` tokens fills (see sparse_lm.inference.cache): with
    overlap, slots 0..m-1 hold the previous complete window once one exists; then the first
    `length mod m` slots of the current window. Entries: rows < length // m."""
    m, ov = ratio, int(overlap)
    slots = jnp.arange(cc.kv.shape[-2])
    filled = ((slots < ov * m) & (length >= m)) | (
        (slots >= ov * m) & (slots - ov * m < length % m))
    filled = filled[:, None]
    k1, k2, k3 = jax.random.split(key, 3)
    kv = jnp.where(filled, _normal(k1, cc.kv.shape, cc.kv.dtype), 0.0)
    gate = jnp.where(filled, _normal(k2, cc.gate.shape, cc.gate.dtype), -jnp.inf)
    rows = _rows_held(cc.entries.shape[-2], length // m)[:, None]
    entries = jnp.where(rows, _normal(k3, cc.entries.shape, cc.entries.dtype),
                        jnp.zeros((), cc.entries.dtype))
    return CompressorCache(kv=kv.astype(cc.kv.dtype), gate=gate.astype(cc.gate.dtype),
                           entries=entries)


def _fill_layer(cfg: ModelConfig, kind: str, lc: LayerCache, length: int, key) -> LayerCache:
    kw, kc, ki = jax.random.split(key, 3)
    w = lc.window.shape[-2]
    held = ring_positions(jnp.array([length], jnp.int32), w)[0] >= 0      # [W]
    window = jnp.where(held[:, None], _normal(kw, lc.window.shape, lc.window.dtype),
                       jnp.zeros((), lc.window.dtype))
    comp = idx = None
    if lc.compressor is not None:
        comp = _fill_compressor(lc.compressor, cfg.ratio_of(kind), kind == "csa", length, kc)
    if lc.indexer is not None:
        idx = _fill_compressor(lc.indexer, cfg.compress_ratio_csa, True, length, ki)
    return LayerCache(window=window, compressor=comp, indexer=idx)


def fill_cache(cfg: ModelConfig, cache: Cache, length: int, seed: int = 0) -> Cache:
    """Random but valid contents for `cache` as if every row held `length` tokens.

    The structure, shapes and dtypes are those of `cache`; which ring slots, tail slots, entries
    and indexer keys hold data is what a real prefill of `length` tokens leaves (the test checks
    this against `Decoder.prefill`); held values are standard normal, the rest zero (gates -inf).
    """
    if not 0 <= length <= cache.max_len:
        raise BenchError(f"length={length} is invalid: must be in [0, max_len={cache.max_len}]")
    kinds = cfg.layer_kinds
    keys = jax.random.split(jax.random.key(seed), len(kinds))
    layers = tuple(_fill_layer(cfg, kind, lc, length, k)
                   for kind, lc, k in zip(kinds, cache.layers, keys, strict=True))
    return Cache(lengths=jnp.full(cache.lengths.shape, length, jnp.int32), layers=layers,
                 max_len=cache.max_len)


# ------------------------------------------------------------------------------ the dense arm

def fill_dense_cache(cache: Cache, length: int, seed: int = 0) -> Cache:
    """A full KV cache (`init_full_kv_cache`) holding `length` tokens: rows < length standard
    normal, the rest zero; lengths = length."""
    if not 0 <= length <= cache.max_len:
        raise BenchError(f"length={length} is invalid: must be in [0, max_len={cache.max_len}]")
    keys = jax.random.split(jax.random.key(seed), max(len(cache.layers), 1))

    def fill(lc, key):
        a = lc.kv
        held = _rows_held(a.shape[-2], length)[:, None]
        return FullKVCache(kv=jnp.where(held, _normal(key, a.shape, a.dtype), jnp.zeros((), a.dtype)))
    return Cache(lengths=jnp.full(cache.lengths.shape, length, jnp.int32),
                 layers=tuple(fill(lc, k) for lc, k in zip(cache.layers, keys)),
                 max_len=cache.max_len)


# ------------------------------------------------------------------------------ HLO copies

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
                "f64": 8, "s64": 8}
_HLO_COPY = re.compile(r"=\s*(\w+)\[([\d,]*)\]\{[^}]*\}\s+(?:copy|transpose)\(")


def hlo_copy_bytes(hlo_text: str, min_bytes: int = 1 << 20) -> dict:
    """Bytes written by `copy` and `transpose` instructions of at least `min_bytes` in a compiled
    HLO module (layout changes and buffer copies that XLA inserted), counted statically: an
    instruction inside a loop body is counted once, not once per iteration."""
    total, count = 0, 0
    for m in _HLO_COPY.finditer(hlo_text):
        dims = [int(x) for x in m.group(2).split(",") if x]
        n = int(np.prod(dims)) * _DTYPE_BYTES.get(m.group(1), 4)
        if n >= min_bytes:
            total += n
            count += 1
    return {"bytes": total, "count": count, "min_bytes": min_bytes}


# ------------------------------------------------------------------------------ timing

def _summary(times: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "runs_ms": [round(1e3 * t, 4) for t in times]}


def _start(length: int, warmup: int, runs: int) -> int:
    """Tokens held before the first (untimed) call, so that the last timed step is at L - 1."""
    return length - (1 + warmup + runs)


@dataclasses.dataclass
class Arm:
    """One arm at one context length: a donated-state step and what it is measured on."""
    name: str
    step: object                  # state -> (logits, state)
    state: object                 # the cache (donated to every step)
    cache_bytes: int
    flops: acc.DecodeFlops
    first_call_s: float = 0.0
    times: list = dataclasses.field(default_factory=list)
    logits: object = None
    lower: object = None          # state -> jax Lowered of the step (HLO diagnostic)

    def call(self):
        out, self.state = self.step(self.state)
        jax.block_until_ready((out, self.state))
        self.logits = out


def arm_config(arm: str, cfg: ModelConfig, length: int) -> ModelConfig:
    """The model config an arm runs at context `length` (for the dense arm: the one whose FLOPs
    the accounting counts, every layer attending all `length` tokens)."""
    if arm == "sparse":
        return cfg
    if arm in ("dense", "dense_ring"):
        return full_attention_config(cfg, window=length)
    raise BenchError(f"arm {arm!r} is invalid: allowed values {ARMS}")


def empty_arm_cache(arm: str, cfg: ModelConfig, batch: int, length: int):
    """The arm's empty cache allocated for `length` tokens."""
    if arm == "dense":
        return init_full_kv_cache(arm_config(arm, cfg, length), batch, length)
    return init_cache(arm_config(arm, cfg, length), batch, length)


def arm_cache_bytes(arm: str, cfg: ModelConfig, batch: int, length: int) -> int:
    """Bytes of the arm's cache for `length` tokens (`lengths` excluded), from the shapes of the
    arrays the arm allocates (`jax.eval_shape`: nothing allocated)."""
    shapes = jax.eval_shape(lambda: empty_arm_cache(arm, cfg, batch, length))
    if arm == "dense":
        return full_kv_cache_bytes(shapes)
    per_kind = cache_bytes(arm_config(arm, cfg, length), shapes)
    return sum(d["state"] + d["entries"] for d in per_kind.values())


def prepare_arm(arm: str, cfg: ModelConfig, length: int, start: int, *, batch: int,
                seed: int = 0) -> Arm:
    """Build the arm's model and a cache allocated for `length` tokens holding `start`."""
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, batch), jnp.int32)
    acfg = arm_config(arm, cfg, length)
    nbytes = arm_cache_bytes(arm, cfg, batch, length)
    flops = acc.flops_per_token(acfg, length)
    empty = empty_arm_cache(arm, cfg, batch, length)
    dec = Decoder(build_model(acfg, seed))
    cache = fill_dense_cache(empty, start, seed) if arm == "dense" else fill_cache(acfg, empty, start, seed)
    tok2, ones = tokens[:, None], jnp.ones((batch,), jnp.int32)
    return Arm(arm, lambda c: dec.step(c, tok2, ones, logits="last"), cache, nbytes, flops,
               lower=lambda c: dec.lower(c, tok2, ones, logits="last"))


def bench_length(arms: list[str], cfg: ModelConfig, length: int, *, batch: int, warmup: int,
                 runs: int, seed: int = 0, hlo: bool = False,
                 parts: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """Time every arm and every attention part at context `length`, interleaved: each arm makes
    its first call (compilation + one step, excluded) and `warmup` steps, each part is compiled
    and called `warmup` times, then the timed calls alternate (arm a, arm b, part 1, part 2, ...,
    arm a, ...) so that a loaded machine's drift hits arms and parts alike. Every call ends
    with `block_until_ready`. Returns (arm rows, part rows)."""
    start = _start(length, warmup, runs)
    if start < 0:
        raise BenchError(f"--lengths: {length} is too short for 1 + warmup {warmup} + runs {runs} "
                         "steps")
    prepared = []
    copies = {}
    for name in arms:
        a = prepare_arm(name, cfg, length, start, batch=batch, seed=seed)
        if hlo:
            copies[name] = hlo_copy_bytes(a.lower(a.state).compile().as_text())
        t0 = time.perf_counter()
        a.call()
        a.first_call_s = time.perf_counter() - t0
        for _ in range(warmup):
            a.call()
        prepared.append(a)
    timed_parts = []
    for name in parts:
        fn, args = part_inputs(name, cfg, length, batch)
        compiled = jax.jit(fn).lower(*args).compile()
        for _ in range(warmup):
            jax.block_until_ready(compiled(*args))
        timed_parts.append((name, compiled, args, []))
    for _ in range(runs):
        for a in prepared:
            t0 = time.perf_counter()
            a.call()
            a.times.append(time.perf_counter() - t0)
        for _, compiled, args, times in timed_parts:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    rows = []
    for a in prepared:
        f = a.flops
        rows.append({"length": length, "arm": a.name, **_summary(a.times),
                     "first_call_s": a.first_call_s, "positions": [start + 1 + warmup, length - 1],
                     "cache_bytes": a.cache_bytes, "cache_bytes_per_seq": a.cache_bytes / batch,
                     "flops": {"linear": f.linear, "attention": f.attention,
                               "indexer": f.indexer, "total": f.total},
                     "logits_finite": bool(np.isfinite(np.asarray(a.logits)).all())})
        if a.name in copies:
            rows[-1]["hlo_copies"] = copies[a.name]
        a.state = None                       # free the cache before the next length
    part_rows = []
    for name, _, _, times in timed_parts:
        flops, nbytes = part_cost(name, cfg, length, batch)
        part_rows.append({"length": length, "part": name, **_summary(times), "flops": flops,
                          "bytes_read": nbytes})
    return rows, part_rows


# ------------------------------------------------------------------------------ parts

def part_cost(part: str, cfg: ModelConfig, length: int, batch: int) -> tuple[float, int]:
    """(FLOPs, cache bytes read) of one part for one decode query per row at position
    length - 1 (every earlier token held). Attention: 4*H*D per attended key (q.k and p.v, V=K);
    indexer: 2*H_I*D_I per visible key (the accounting module's conventions)."""
    h, d, w = cfg.num_heads, cfg.head_dim, cfg.sliding_window
    nbytes = jnp.dtype(dtype_of(cfg.dtype)).itemsize
    per_key = 4.0 * h * d
    n_win = min(w, length)
    if part == "window":
        return batch * per_key * n_win, batch * (w + 1) * d * nbytes
    if part == "csa_attn":
        k = min(cfg.index_topk, length // cfg.compress_ratio_csa)
        return batch * per_key * (n_win + k), batch * (w + 1 + k) * d * nbytes
    if part == "hca_attn":
        n = length // cfg.compress_ratio_hca
        return batch * per_key * (n_win + n), batch * (w + 1 + n) * d * nbytes
    if part == "indexer":
        n = length // cfg.compress_ratio_csa
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        return batch * 2.0 * hi * di * n, batch * n * di * nbytes
    if part == "dense_attn":
        return batch * per_key * length, batch * length * d * nbytes
    raise BenchError(f"unknown part {part!r}; allowed: {PARTS}")


def part_inputs(part: str, cfg: ModelConfig, length: int, batch: int, seed: int = 0):
    """(function, args) of one attention part at context `length` on random cache-shaped
    inputs: one decode query per row at position length - 1 with every earlier token held."""
    if part not in PARTS:
        raise BenchError(f"unknown part {part!r}; allowed: {PARTS}")
    dt = dtype_of(cfg.dtype)
    h, d, w = cfg.num_heads, cfg.head_dim, cfg.sliding_window
    ks = iter(jax.random.split(jax.random.key(seed), 8))
    b = batch
    scale = d ** -0.5
    pos = jnp.full((b,), length - 1, jnp.int32)
    q = _normal(next(ks), (b, 1, h, d), dt)
    sink = jnp.zeros((h,), jnp.float32)
    ring = _normal(next(ks), (b, w + 1, d), dt)                  # ring buffer + the new row
    ring_pos = jnp.concatenate([ring_positions(pos, w), pos[:, None]], axis=1)
    if part == "window":
        def f(q, ring, ring_pos, sink):
            return cached_attention(q, pos[:, None], ring, ring_pos, sink, window=w,
                                        scale=scale)
        return f, (q, ring, ring_pos, sink)
    if part in ("csa_attn", "hca_attn"):
        m = cfg.ratio_of(part[:3])
        n = length // m
        entries = _normal(next(ks), (b, n, d), dt)
        if part == "csa_attn":                  # k distinct visible entries, scattered
            k = min(cfg.index_topk, n)
            idx = jax.random.permutation(next(ks), max(n, 1))[:k]
            topk = jnp.broadcast_to(idx.astype(jnp.int32), (b, 1, k))

            def f(q, ring, ring_pos, sink, entries, topk):
                return cached_attention(q, pos[:, None], ring, ring_pos, sink, window=w,
                                            scale=scale, entries=entries, ratio=m, topk_idx=topk)
            return f, (q, ring, ring_pos, sink, entries, topk)

        def f(q, ring, ring_pos, sink, entries):
            return cached_attention(q, pos[:, None], ring, ring_pos, sink, window=w,
                                        scale=scale, entries=entries, ratio=m)
        return f, (q, ring, ring_pos, sink, entries)
    if part == "indexer":
        m = cfg.compress_ratio_csa
        hi, di = cfg.index_n_heads, cfg.index_head_dim
        qi = _normal(next(ks), (b, 1, hi, di), dt)
        wi = _normal(next(ks), (b, 1, hi), dt)
        keys = _normal(next(ks), (b, length // m, di), dt)

        def f(qi, wi, keys):     # what `Indexer.cached` runs: visible key blocks, running top-k
            return blocked_indexer_topk(qi, wi, keys, pos[:, None], ratio=m,
                                        k=cfg.index_topk)[0]
        return f, (qi, wi, keys)
    kv = _normal(next(ks), (b, length, d), dt)                   # dense_attn

    key_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))

    def f(q, kv, sink):
        return cached_attention(q, pos[:, None], kv, key_pos, sink, window=length, scale=scale)
    return f, (q, kv, sink)


def layer_counts(cfg: ModelConfig) -> dict[str, int]:
    kinds = cfg.layer_kinds
    return {k: sum(1 for x in kinds if x == k) for k in ("swa", "csa", "hca")}


def attention_part_ms(parts: dict[str, float], cfg: ModelConfig, arm: str) -> float | None:
    """Attention time of one step summed over the arm's layers from the part medians (ms)."""
    n = layer_counts(cfg)
    if arm == "sparse":
        need = ("window", "csa_attn", "hca_attn", "indexer")
        if not all(p in parts for p in need):
            return None
        return (n["swa"] * parts["window"] + n["csa"] * (parts["csa_attn"] + parts["indexer"])
                + n["hca"] * parts["hca_attn"])
    if arm == "dense" and "dense_attn" in parts:
        return cfg.num_layers * parts["dense_attn"]
    return None


# ------------------------------------------------------------------------------ reporting

def _git() -> dict:
    commit, dirty = benchlib.git_state()
    return {"git_commit": commit, "git_dirty": dirty}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def summarize(result: dict) -> dict:
    """Per length: speedup of sparse over each dense arm and the FLOP ratio; the 64K goal."""
    by = {(r["length"], r["arm"]): r for r in result["rows"]}
    out = {}
    for length in result["meta"]["lengths"]:
        s = by.get((length, "sparse"))
        if s is None:
            continue
        row = {}
        for arm in ("dense", "dense_ring"):
            d = by.get((length, arm))
            if d is not None:
                row[f"speedup_vs_{arm}"] = d["median_ms"] / s["median_ms"]
                row[f"flop_ratio_vs_{arm}"] = d["flops"]["total"] / s["flops"]["total"]
                row[f"cache_ratio_vs_{arm}"] = d["cache_bytes"] / s["cache_bytes"]
        out[str(length)] = row
    goal = out.get(str(65536), {}).get("speedup_vs_dense")
    growth = {}
    parts = result.get("parts", [])
    for name in PARTS:
        rows = sorted((p for p in parts if p["part"] == name), key=lambda p: p["length"])
        if len(rows) >= 2:
            lo, hi = rows[0], rows[-1]
            growth[name] = {"from": lo["length"], "to": hi["length"],
                            "time_ratio": hi["median_ms"] / lo["median_ms"],
                            "flop_ratio": hi["flops"] / lo["flops"],
                            "bytes_ratio": hi["bytes_read"] / lo["bytes_read"]}
    return {"per_length": out, "goal_5x_at_64k": None if goal is None else goal >= 5.0,
            "speedup_at_64k": goal, "part_growth": growth}


def _fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def table_cells(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the results table: arms, speedup, ratios and parts per length."""
    arms = result["meta"]["arms"]
    by = {(r["length"], r["arm"]): r for r in result["rows"]}
    parts = {(p["length"], p["part"]): p["median_ms"] for p in result.get("parts", [])}
    part_names = [p for p in PARTS if any(k[1] == p for k in parts)]
    summ = result["summary"]["per_length"]
    both = "sparse" in arms and "dense" in arms
    header = ["L"] + [f"{a} ms" for a in arms]
    if both:
        header += ["speedup", "FLOP ratio", "cache ratio"]
    header += [f"{p} ms" for p in part_names]
    rows = []
    for length in result["meta"]["lengths"]:
        r = [_fmt_len(length)]
        for a in arms:
            x = by.get((length, a))
            r.append(f"{x['median_ms']:.2f}" if x else "-")
        if both:
            s = summ.get(str(length), {})
            r += [f"{s['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in s else "-",
                  f"{s['flop_ratio_vs_dense']:.2f}x" if "flop_ratio_vs_dense" in s else "-",
                  f"{s['cache_ratio_vs_dense']:.1f}x" if "cache_ratio_vs_dense" in s else "-"]
        r += [f"{parts[(length, p)]:.3f}" if (length, p) in parts else "-" for p in part_names]
        rows.append(r)
    return header, rows


def table(result: dict) -> str:
    """Fixed-width text table (see `table_cells`)."""
    header, rows = table_cells(result)
    widths = [max(len(x[i]) for x in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(wd) for c, wd in zip(x, widths)) for x in [header] + rows]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The same table in Markdown (for benchmarks/decode.md)."""
    header, rows = table_cells(result)
    out = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    """Log-log step time vs context for every arm, and the attention parts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_parts = bool(result.get("parts"))
    fig, axes = plt.subplots(1, 2 if has_parts else 1, figsize=(12 if has_parts else 6.5, 4.8))
    axes = np.atleast_1d(axes)
    styles = {"sparse": ("tab:blue", "o"), "dense": ("tab:red", "s"),
              "dense_ring": ("tab:orange", "^"),
              "sparse_flat": ("tab:cyan", "D")}          # an arm of earlier JSONs
    ax = axes[0]
    for arm in result["meta"]["arms"]:
        rows = sorted((r for r in result["rows"] if r["arm"] == arm), key=lambda r: r["length"])
        if rows:
            c, mk = styles[arm]
            ax.plot([r["length"] for r in rows], [r["median_ms"] for r in rows], marker=mk,
                    color=c, label=arm)
    summ = result["summary"]["per_length"]
    for length, s in summ.items():
        if "speedup_vs_dense" in s:
            y = next(r["median_ms"] for r in result["rows"]
                     if r["length"] == int(length) and r["arm"] == "sparse")
            ax.annotate(f"{s['speedup_vs_dense']:.1f}x", (int(length), y),
                        textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    meta = result["meta"]
    ax.set(xscale="log", yscale="log", xlabel="context length L (tokens)",
           ylabel="decode step time (ms, median)",
           title=f"decode step, batch {meta['batch']}, {meta['dtype']}, {meta['device_kind']}"
                 + (f" (load avg {meta['load_avg_start'][0]:g})" if meta.get("load_avg_start")
                    else ""))
    ax.set_xscale("log", base=2)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if has_parts:
        ax = axes[1]
        for part in PARTS:
            rows = sorted((p for p in result["parts"] if p["part"] == part),
                          key=lambda p: p["length"])
            if rows:
                ax.plot([p["length"] for p in rows], [p["median_ms"] for p in rows], marker=".",
                        label=part)
        ax.set(xscale="log", yscale="log", xlabel="context length L (tokens)",
               ylabel="one layer, one query (ms, median)", title="attention parts")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ driver

def _define(fv):
    flags.DEFINE_string("lengths", None, "Comma list of context lengths (default 1K..64K; "
                        "--tiny: 64,128).", flag_values=fv)
    flags.DEFINE_string("arms", "sparse,dense", f"Comma list from {ARMS}.", flag_values=fv)
    flags.DEFINE_integer("runs", None, "Timed steps per arm (default 20; --tiny 3).",
                         flag_values=fv)
    flags.DEFINE_integer("warmup", None, "Untimed steps after the first call (default 3; "
                         "--tiny 1).", flag_values=fv)
    flags.DEFINE_integer("batch", 1, "Rows decoded per step.", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and cache dtype of "
                      "both arms.", flag_values=fv)
    flags.DEFINE_boolean("no-parts", False, "Skip the per-part timings.", flag_values=fv)
    flags.DEFINE_boolean("hlo", False, "At the largest length, count the cache-sized copy "
                         "instructions in each arm's compiled step (compiles twice).",
                         flag_values=fv)
    flags.DEFINE_string("json", None, "Output JSON (default benchmarks/decode_<platform>.json; "
                        "'-' = none).", flag_values=fv)
    flags.DEFINE_string("plot", None, "Output PNG (default: the JSON path with .png; '-' = "
                        "none).", flag_values=fv)
    flags.DEFINE_boolean("tiny", False, "Toy model and lengths (seconds; tests).", flag_values=fv)
    flags.DEFINE_boolean("markdown", False, "Also print the table in Markdown.", flag_values=fv)
    flags.DEFINE_string("from-json", None, "Measure nothing: print the table of an earlier run's "
                        "JSON and redraw its plot (to --plot, default beside it).",
                        flag_values=fv)
    flags.DEFINE_boolean("no-progress", False, "No progress bar.", flag_values=fv)


def parse_args(argv=None):
    a = benchlib.parse_flags(sys.argv[1:] if argv is None else argv, _define)
    a.lengths = (benchlib.int_list(a.lengths, "--lengths") if a.lengths
                 else list(TINY_LENGTHS if a.tiny else DEFAULT_LENGTHS))
    a.arms = benchlib.name_list(a.arms, "--arms", ARMS)
    if a.runs is None:
        a.runs = 3 if a.tiny else 20
    if a.warmup is None:
        a.warmup = 1 if a.tiny else 3
    benchlib.check_runs(a.runs, a.warmup)
    if a.batch < 1:
        raise BenchError(f"--batch={a.batch} is invalid: must be >= 1")
    cfg = bench_config(tiny=a.tiny, dtype=a.dtype)
    unit = max(cfg.compress_ratio_csa, cfg.compress_ratio_hca)
    for n in a.lengths:
        if n < unit or n % unit:
            raise BenchError(f"--lengths: {n} is invalid: must be a positive multiple of the "
                             f"largest compress ratio {unit}")
        if _start(n, a.warmup, a.runs) < 0:
            raise BenchError(f"--lengths: {n} is too short for 1 + warmup {a.warmup} + runs "
                             f"{a.runs} steps")
    return a


def run(args) -> dict:
    """Run every (length, arm) and every (length, part); returns the result dict."""
    cfg = bench_config(tiny=args.tiny, dtype=args.dtype)
    dev = jax.devices()[0]
    meta = {
        "device": str(dev), "device_kind": dev.device_kind, "platform": dev.platform,
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "flax": flax.__version__, "python": platform_lib.python_version(), **_git(),
        "load_avg_start": _load(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), "-m", "experiments.bench_decode"]
                            + sys.argv[1:]),
        "tiny": args.tiny, "lengths": args.lengths, "arms": args.arms, "runs": args.runs,
        "warmup": args.warmup, "batch": args.batch, "dtype": args.dtype,
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in cfg.to_dict().items()},
        "layer_kinds": list(cfg.layer_kinds), "layer_counts": layer_counts(cfg),
        "cache_fill": "random-valid: caches filled directly (no prefill), see fill_cache",
        "dense_arm": "same model, every layer a causal attention over a full [B, L, D] KV "
                     "cache written in place (inference.dense + Decoder); no compressor/indexer",
        "parts_method": "library functions jitted alone on cache-shaped random inputs, one "
                        "decode query, one layer, timed interleaved with the arms",
    }
    part_names = () if args.no_parts else PARTS
    rows, parts = [], []
    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(args.lengths), desc="bench_decode", file=sys.stderr, leave=False)
    for n in args.lengths:
        if bar is not None:
            bar.set_postfix_str(f"L={n}")
        r, p = bench_length(args.arms, cfg, n, batch=args.batch, warmup=args.warmup,
                            runs=args.runs, hlo=args.hlo and n == max(args.lengths),
                            parts=part_names)
        rows += r
        parts += p
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    meta["load_avg_end"] = _load()
    result = {"meta": meta, "rows": rows, "parts": parts}
    by_part = {}
    for p in parts:
        by_part.setdefault(p["length"], {})[p["part"]] = p["median_ms"]
    for r in rows:
        att = attention_part_ms(by_part.get(r["length"], {}), cfg, r["arm"])
        if att is not None:
            r["attention_parts_ms"] = att
            r["other_ms"] = r["median_ms"] - att
    result["summary"] = summarize(result)
    return result


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        args.json = "-"
        if args.plot is None:
            args.plot = str(Path(args.from_json).with_suffix(".png"))
    else:
        result = run(args)
    print(table(result))
    if args.markdown:
        print()
        print(markdown_table(result))
    s = result["summary"]
    if s["part_growth"]:
        g = next(iter(s["part_growth"].values()))
        print(f"\ngrowth of each part from L={_fmt_len(g['from'])} to L={_fmt_len(g['to'])} "
              "(time ratio / FLOP ratio / cache bytes read ratio):")
        for name, g in s["part_growth"].items():
            print(f"  {name:<10} {g['time_ratio']:8.2f}x {g['flop_ratio']:8.2f}x "
                  f"{g['bytes_ratio']:8.2f}x")
    if s["speedup_at_64k"] is not None:
        print(f"\nspeedup at 64K: {s['speedup_at_64k']:.2f}x (goal >= 5x: "
              f"{'met' if s['goal_5x_at_64k'] else 'not met'})")
    m = result["meta"]
    print(f"device {m['device_kind']} ({m['platform']}), jax {m['jax']}, load average "
          f"{m['load_avg_start']} -> {m['load_avg_end']} on {m['cpu_count']} CPUs; caches filled "
          "with random valid contents (no prefill)")
    path = args.json
    if path is None:
        path = f"benchmarks/decode_{m['platform']}{'_tiny' if args.tiny else ''}.json"
    if path != "-":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    png = args.plot if args.plot is not None else (
        None if path == "-" else str(Path(path).with_suffix(".png")))
    if png and png != "-":
        plot(result, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
