"""Training metrics: routing and indexer statistics, throughput and MFU, and the writers
(`metrics.jsonl` + TensorBoard event files).

Expert load per layer (from the assignment counts of the logged steps):
  load_min / load_max  min and max load relative to the mean load (1 = perfectly balanced)
  load_cv              coefficient of variation std/mean of the loads
  dead                 experts that got no token over the whole logging interval
  entropy              entropy of the load distribution over experts divided by log(E)
                       (1 = uniform routing, 0 = one expert takes everything)
Indexer recall per CSA layer: share of the dense attention mass on compressed entries that the
top-k keeps (from `ModelOutput.indexer_recall`).

MFU = (model FLOPs per token x tokens/s) / (peak FLOP/s x devices), with the FLOPs the sparse
model really performs (window + selected CSA entries + visible HCA entries + indexer + the
indexer's KL target; `sparse_lm.analysis.accounting.train_flops_per_token`) and forward +
backward. Peak FLOP/s: `train.peak_flops` when set, else a table of accelerators (bf16 dense),
else on CPU a measured fp32 matmul rate (so CPU "MFU" is relative to what XLA:CPU achieves on a
large matmul, not a datasheet number).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.analysis.accounting import train_flops_per_token as _train_flops

# Dense bf16 peak FLOP/s per device (datasheet), matched as substrings of `device_kind`.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "B200": 2250e12, "L4": 121e12,
}


def expert_load_stats(counts: np.ndarray) -> dict[str, np.ndarray]:
    """counts [L, E] assignment counts -> per-layer arrays load_min, load_max, load_cv, dead,
    entropy (see module doc)."""
    c = np.asarray(counts, np.float64)
    mean = c.mean(axis=-1, keepdims=True)
    safe = np.where(mean > 0, mean, 1.0)
    rel = c / safe
    p = c / np.where(c.sum(-1, keepdims=True) > 0, c.sum(-1, keepdims=True), 1.0)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return {"load_min": rel.min(-1), "load_max": rel.max(-1),
            "load_cv": c.std(-1) / safe[..., 0], "dead": (c == 0).sum(-1),
            "entropy": ent / math.log(c.shape[-1])}


def layer_names(cfg) -> list[str]:
    """Row names of the per-layer outputs: 'layer{i}_{kind}' and 'mtp'."""
    names = [f"layer{s.index}_{s.kind}" for s in cfg.layers]
    return names + (["mtp"] if cfg.mtp_depth else [])


def routing_metrics(cfg, counts: np.ndarray) -> dict[str, float]:
    """Flat metrics for the log: per layer moe/<layer>/<stat> and summaries over layers."""
    stats = expert_load_stats(counts)
    names = layer_names(cfg)
    out = {}
    for i, n in enumerate(names):
        for k, v in stats.items():
            out[f"moe/{n}/{k}"] = float(v[i])
    out["moe/load_cv_mean"] = float(np.mean(stats["load_cv"]))
    out["moe/load_max_max"] = float(np.max(stats["load_max"]))
    out["moe/dead_experts"] = float(np.sum(stats["dead"]))
    out["moe/entropy_mean"] = float(np.mean(stats["entropy"]))
    score_rows = [i for i, s in enumerate(cfg.layers) if s.routing == "score"]
    if cfg.mtp_depth:
        score_rows.append(len(cfg.layers))
    if score_rows:
        out["moe/load_cv_score_layers"] = float(np.mean(stats["load_cv"][score_rows]))
    return out


def indexer_metrics(cfg, recall: np.ndarray) -> dict[str, float]:
    rows = [s.index for s in cfg.layers if s.kind == "csa"]
    out = {f"indexer/recall_layer{i}": float(recall[i]) for i in rows}
    if rows:
        out["indexer/recall"] = float(np.mean([recall[i] for i in rows]))
    return out


def train_flops_per_token(cfg, seq_len: int, sparse: bool) -> float:
    """Forward + backward model FLOPs per token of the sparse (or dense-warm-up) model."""
    return float(_train_flops(cfg, seq_len, sparse=sparse).total)


_MEASURED: dict[str, float] = {}


def measured_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of a jitted fp32 [n, n] x [n, n] matmul on the default device (cached)."""
    key = jax.default_backend()
    if key not in _MEASURED:
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda a: a @ a)
        f(a).block_until_ready()
        t = time.perf_counter()
        for _ in range(reps):
            r = f(a)
        r.block_until_ready()
        _MEASURED[key] = reps * 2 * n ** 3 / (time.perf_counter() - t)
    return _MEASURED[key]


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from)."""
    if configured and configured > 0:
        return float(configured), "config train.peak_flops"
    kind = jax.devices()[0].device_kind
    for name, v in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return v, f"datasheet bf16 peak of {name}"
    if jax.default_backend() == "cpu":
        return measured_matmul_flops(), "measured fp32 1024^3 matmul on this CPU"
    return float("nan"), f"unknown device kind {kind!r} (set train.peak_flops)"


def _json_number(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def flatten_scalars(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1, 2: {"c": 3}}} -> {"a/b": 1, "a/2/c": 3}: nested results (per mode, per
    length, ...) as the flat names both writers use."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_scalars(v, name + "/"))
        else:
            out[name] = v
    return out


class MetricsWriter:
    """The one metrics writer of training and evaluation: appends {"step": s, "kind": k, ...}
    lines to <workdir>/metrics.jsonl and the same scalars to TensorBoard (<workdir>/tensorboard,
    tag "<kind>/<name>"). Nested dicts are flattened to "a/b" names. Only process 0 writes
    (`enabled`)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop logged lines of steps > step (a resumed run rewrites them). The dropped lines
        (and any line a killed run left half-written) are appended to metrics_dropped.jsonl,
        not lost."""
        if not self.enabled or not self.path.exists():
            return
        keep, dropped = [], []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and rec.get("step", 0) <= step
            except ValueError:
                ok = False
            (keep if ok else dropped).append(line)
        if not dropped:
            return
        with open(self.path.with_name("metrics_dropped.jsonl"), "a") as f:
            f.write("".join(l + "\n" for l in dropped))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, scalars: dict, kind: str = "train") -> None:
        """One JSON line; a non-finite value is written as null (strict JSON: no bare NaN)."""
        if not self.enabled:
            return
        scalars = flatten_scalars(scalars)
        rec = {"step": int(step), "kind": kind}
        rec.update({k: _json_number(v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if v is not None and np.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike, kind: str | None = "train") -> list[dict]:
    """Records of metrics.jsonl (of one kind), in file order. A null value (how the writer
    stores a non-finite number, to keep the file strict JSON) reads back as NaN."""
    p = Path(workdir) / "metrics.jsonl"
    if not p.exists():
        return []
    recs = [{k: float("nan") if v is None else v for k, v in json.loads(l).items()}
            for l in p.read_text().splitlines() if l.strip()]
    return [r for r in recs if kind is None or r.get("kind") == kind]


def recall_at_fraction(scores, mass, visible, fraction: float):
    """Share of the dense attention mass on compressed entries that the indexer's top-k keeps
    when every query keeps k = floor(fraction x its visible entries).

    scores, mass [B, S, N] (mass: attention probability per entry, summed over heads); visible
    [B, S, N]. Only queries with at least 1/fraction visible entries count. Returns (recall,
    chance, oracle): chance = what k random entries keep on average (mean k / visible); oracle =
    what the k entries of largest mass keep (the best any indexer can do).
    """
    vis_n = jnp.sum(visible, axis=-1)                                   # [B, S]
    k = jnp.floor(fraction * vis_n)
    m = jnp.where(visible, mass, 0.0)
    total = jnp.sum(m, axis=-1)
    rows = (k >= 1) & (total > 0)
    keep = jnp.arange(scores.shape[-1]) < k[..., None]

    def kept_by(ranking):
        order = jnp.argsort(-jnp.where(visible, ranking, -jnp.inf), axis=-1)
        ranked = jnp.take_along_axis(m, order, axis=-1)
        share = jnp.sum(jnp.where(keep, ranked, 0.0), axis=-1) / jnp.where(rows, total, 1.0)
        return jnp.sum(jnp.where(rows, share, 0.0)) / n
    n = jnp.maximum(jnp.sum(rows), 1)
    chance = jnp.sum(jnp.where(rows, k / jnp.maximum(vis_n, 1), 0.0)) / n
    return kept_by(scores), chance, kept_by(m)


def indexer_recall_at_fraction(model, tokens, segment_ids=None, fraction: float = 0.25):
    """Per CSA layer (recall, chance, oracle) of `recall_at_fraction` for one batch, the main attention
    running dense over compressed entries (the warm-up stage's target distribution).

    Analysis hook: reads what every lightning-indexer layer records with `record=True` (its full
    scores, the visibility and the dense attention mass per entry), so the model itself is
    unchanged. Returns a list in layer order.
    """
    graphdef, state = nnx.split(model)

    def run(state, tokens, segment_ids):
        out = nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, sparse=False,
                                         return_aux=True, record=True)
        return [recall_at_fraction(r["scores"], r["dense_mass"], r["visible"], fraction)
                for r in out.recorded if "scores" in r and "dense_mass" in r]
    out = jax.jit(run)(state, tokens, segment_ids)
    return [tuple(float(v) for v in r) for r in out]
