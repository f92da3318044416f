"""Routing statistics of the DeepSeekMoE layers (pure functions of arrays and logs).

Inputs, per layer (from `sparse_lm.analysis.internals.collect`, the training log, or built by
hand):
  experts     [T, k] (or [B, S, k]) expert ids chosen per token
  affinities  [T, E] router affinities sqrt(softplus(u . g)) (>= 0)
  counts      [L, E] assignments per expert (one row per layer)
Definitions (the same as `sparse_lm.train.metrics`):
  load        counts / mean(counts): 1 = the fair share
  load CV     std(counts) / mean(counts) (population std): 0 = perfectly balanced; everything on
              one expert of E gives sqrt(E - 1)
  dead        experts with no assignment
  load entropy    entropy of counts / sum(counts), divided by log(E): 1 = uniform, 0 = one expert
  routing entropy per token, the entropy of the affinities normalised over the E experts,
              divided by log(E), averaged over tokens: how sure the router is (1 = indifferent)
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


# ---------------------------------------------------------------------------- loads
def expert_counts(experts, num_experts: int, mask=None) -> np.ndarray:
    """[..., k] expert ids -> [E] assignments per expert; mask [...] (without k) drops tokens."""
    e = np.asarray(experts)
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} is invalid: must be >= 1")
    if e.size and (e.min() < 0 or e.max() >= num_experts):
        raise ValueError(f"expert ids must be in [0, {num_experts}); got {e.min()}..{e.max()}")
    if mask is not None:
        e = e[np.asarray(mask, bool)]
    return np.bincount(e.reshape(-1), minlength=num_experts).astype(np.float64)


def load_cv(counts) -> np.ndarray:
    """[..., E] counts -> [...] std / mean (0 where no token was routed)."""
    c = np.asarray(counts, np.float64)
    mean = c.mean(-1)
    return np.where(mean > 0, c.std(-1) / np.where(mean > 0, mean, 1.0), 0.0)


def dead_experts(counts) -> np.ndarray:
    """[..., E] counts -> [...] number of experts with no assignment."""
    return np.sum(np.asarray(counts) == 0, axis=-1)


def max_load(counts) -> np.ndarray:
    """[..., E] counts -> [...] max(counts) / mean(counts) (1 = balanced, E = one expert)."""
    c = np.asarray(counts, np.float64)
    mean = c.mean(-1)
    return np.where(mean > 0, c.max(-1) / np.where(mean > 0, mean, 1.0), 0.0)


def _entropy(p, axis=-1):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def load_entropy(counts) -> np.ndarray:
    """[..., E] counts -> [...] entropy of the load distribution / log(E), in [0, 1]."""
    c = np.asarray(counts, np.float64)
    tot = c.sum(-1, keepdims=True)
    return _entropy(c / np.where(tot > 0, tot, 1.0)) / math.log(c.shape[-1])


def routing_entropy(affinities) -> float:
    """[..., E] affinities -> mean over tokens of the entropy of the normalised affinities,
    divided by log(E) (1 = the router scores every expert alike)."""
    a = np.asarray(affinities, np.float64)
    tot = a.sum(-1, keepdims=True)
    h = _entropy(a / np.where(tot > 0, tot, 1.0)) / math.log(a.shape[-1])
    return float(h.mean())


def load_table(counts, names: Sequence[str], routing: Sequence[str] | None = None,
               kinds: Sequence[str] | None = None, affinities: Sequence | None = None):
    """DataFrame, one row per layer: tokens (assignments), load CV, max load, dead experts, load
    entropy (and routing entropy when per-layer affinities are given)."""
    import pandas as pd
    c = np.asarray(counts, np.float64)
    if c.ndim != 2 or c.shape[0] != len(names):
        raise ValueError(f"counts must be [L={len(names)}, E], got shape {c.shape}")
    df = pd.DataFrame({"layer": list(names)})
    if kinds is not None:
        df["attention"] = list(kinds)
    if routing is not None:
        df["routing"] = list(routing)
    df["assignments"] = c.sum(-1).astype(int)
    df["load_cv"] = load_cv(c)
    df["max_load"] = max_load(c)
    df["dead"] = dead_experts(c)
    df["load_entropy"] = load_entropy(c)
    if affinities is not None:
        df["routing_entropy"] = [routing_entropy(a) for a in affinities]
    return df


# ---------------------------------------------------------------------------- what goes where
def token_expert_map(token_ids, experts, weights=None):
    """Which experts each token went to: DataFrame with position, token (byte), char, and one
    column per routed slot (expert id, in descending weight order when `weights` is given).

    token_ids [T]; experts [T, k]; weights [T, k] or None.
    """
    import pandas as pd
    t = np.asarray(token_ids).reshape(-1)
    e = np.asarray(experts).reshape(t.shape[0], -1)
    if weights is not None:
        w = np.asarray(weights).reshape(e.shape)
        order = np.argsort(-w, axis=-1, kind="stable")
        e = np.take_along_axis(e, order, -1)
    df = pd.DataFrame({"position": np.arange(t.shape[0]), "token": t,
                       "char": [printable(int(x)) for x in t]})
    for j in range(e.shape[1]):
        df[f"expert_{j}"] = e[:, j]
    return df


def expert_token_profile(token_ids, experts, num_experts: int, top: int = 5):
    """For each expert, its most frequent tokens: DataFrame expert, assignments, share (of all
    assignments), top tokens as 'char (share of the expert's tokens)'."""
    import pandas as pd
    t = np.asarray(token_ids).reshape(-1)
    e = np.asarray(experts).reshape(t.shape[0], -1)
    total = e.size
    rows = []
    for x in range(num_experts):
        tok = np.broadcast_to(t[:, None], e.shape)[e == x]
        n = tok.size
        vals, cnt = np.unique(tok, return_counts=True)
        order = np.argsort(-cnt, kind="stable")[:top]
        rows.append({"expert": x, "assignments": int(n), "share": n / max(total, 1),
                     "top_tokens": ", ".join(f"{printable(int(vals[i]))!s} ({cnt[i] / n:.0%})"
                                             for i in order)})
    return pd.DataFrame(rows)


def token_class(byte: int) -> str:
    """A coarse class of a byte of source code: letter, digit, space, newline, punct, other."""
    c = chr(byte) if byte < 128 else ""
    if c.isalpha() or c == "_":
        return "letter"
    if c.isdigit():
        return "digit"
    if c == "\n":
        return "newline"
    if c in " \t":
        return "space"
    if c and c.isprintable():
        return "punct"
    return "other"


def class_expert_matrix(token_ids, experts, num_experts: int):
    """Share of each token class's assignments per expert: DataFrame classes x experts (rows
    sum to 1), with the class sizes in column 'tokens'."""
    import pandas as pd
    t = np.asarray(token_ids).reshape(-1)
    e = np.asarray(experts).reshape(t.shape[0], -1)
    classes = np.asarray([token_class(int(x)) for x in t])
    names = [c for c in ("letter", "digit", "space", "newline", "punct", "other") if (classes == c).any()]
    mat = np.zeros((len(names), num_experts))
    for i, c in enumerate(names):
        mat[i] = np.bincount(e[classes == c].reshape(-1), minlength=num_experts)
    df = pd.DataFrame(mat / np.maximum(mat.sum(-1, keepdims=True), 1), index=names,
                      columns=[f"e{x}" for x in range(num_experts)])
    df["tokens"] = [int((classes == c).sum()) for c in names]
    return df


def printable(byte: int) -> str:
    """A visible form of one byte: the character, or an escape (\\n, ' ' as '␣', \\xNN)."""
    if byte == 10:
        return "\\n"
    if byte == 32:
        return "␣"
    if byte == 9:
        return "\\t"
    if 33 <= byte < 127:
        return chr(byte)
    return f"\\x{byte:02x}"


# ---------------------------------------------------------------------------- the bias
def counterfactual_loads(affinities, bias, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the aux-loss-free bias does to the load of one batch: expert counts [E] of top-k
    selection on affinities + bias, and on the affinities alone. Ties go to the lower expert id
    (as `lax.top_k`). affinities [..., E]; bias [E]."""
    a = np.asarray(affinities, np.float64).reshape(-1, np.shape(affinities)[-1])
    e = a.shape[-1]
    if not 1 <= k <= e:
        raise ValueError(f"k={k} is invalid: must be in [1, {e}]")

    def counts(s):
        idx = np.argsort(-s, axis=-1, kind="stable")[:, :k]
        return np.bincount(idx.reshape(-1), minlength=e).astype(np.float64)
    return counts(a + np.asarray(bias, np.float64)[None]), counts(a)


def bias_table(steps: Sequence[int], biases: dict):
    """Long DataFrame of the router-bias trajectory: step, layer, expert, bias.

    biases: {layer name: [len(steps), E]}."""
    import pandas as pd
    rows = []
    for name, arr in biases.items():
        arr = np.asarray(arr)
        if arr.shape[0] != len(steps):
            raise ValueError(f"biases[{name!r}] has {arr.shape[0]} rows for {len(steps)} steps")
        for i, s in enumerate(steps):
            for x, v in enumerate(arr[i]):
                rows.append({"step": int(s), "layer": name, "expert": x, "bias": float(v)})
    return pd.DataFrame(rows)


def bias_load_correlation(bias, counts) -> float:
    """Pearson correlation between final biases [E] and loads [E] of the same layer: the rule
    lowers overloaded experts' biases, so a working update gives a negative number."""
    b, c = np.asarray(bias, np.float64), np.asarray(counts, np.float64)
    if b.std() == 0 or c.std() == 0:
        return float("nan")
    return float(np.corrcoef(b, c)[0, 1])


# ---------------------------------------------------------------------------- the training log
def load_over_training(records: Sequence[dict], names: Sequence[str],
                       stats: Sequence[str] = ("load_cv", "load_max", "dead", "entropy")):
    """Per-layer routing metrics of `metrics.jsonl` train records (keys moe/<layer>/<stat>) as a
    long DataFrame: step, layer, stat, value. Layers absent from the log are skipped."""
    import pandas as pd
    rows = []
    for r in records:
        for n in names:
            for s in stats:
                key = f"moe/{n}/{s}"
                if key in r and r[key] is not None:
                    rows.append({"step": int(r["step"]), "layer": n, "stat": s,
                                 "value": float(r[key])})
    return pd.DataFrame(rows, columns=["step", "layer", "stat", "value"])
