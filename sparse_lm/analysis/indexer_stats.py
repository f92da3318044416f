"""Lightning-indexer statistics: what the top-k selection keeps (pure functions of arrays).

Inputs are the arrays `sparse_lm.analysis.internals.collect` returns for a CSA layer (or any
arrays of these shapes):
  scores       [B, S, N] indexer scores, -inf where entry n is not visible to query t
  head_scores  [B, S, Hi, N] each indexer head's share w[t,h] * relu(q[t,h] . k[n])
               (`sparse_lm.ops.indexer.indexer_head_scores`)
  mass         [B, S, N] dense attention mass on each compressed entry (summed over heads)
  visible      [B, S, N] bool
  topk         [B, S, K] selected entry ids, -1 = no entry
Entry n of a layer with compression ratio m covers tokens [n*m, n*m + m) of the row and is
visible to query t once its last token is in the past: n*m + m - 1 <= t.

"Recall" is the share of the dense attention mass on compressed entries that a selection keeps,
the same quantity as `ModelOutput.indexer_recall`: per query, mass / sum(mass over visible
entries), then the mean over queries that see at least one entry with mass.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


# ---------------------------------------------------------------------------- counts
def selected_per_query(topk) -> np.ndarray:
    """[B, S, K] ids (-1 = none) -> [B, S] number of entries each query selected."""
    return np.sum(np.asarray(topk) >= 0, axis=-1)


def visible_per_query(visible) -> np.ndarray:
    """[B, S, N] bool -> [B, S] number of entries each query may select from."""
    return np.sum(np.asarray(visible), axis=-1)


def selection_matrix(topk, num_entries: int) -> np.ndarray:
    """[B, S, K] ids -> [B, S, N] bool: entry n is selected by query t."""
    topk = np.asarray(topk)
    out = np.zeros(topk.shape[:2] + (num_entries,), bool)
    b, s, k = np.nonzero(topk >= 0)
    out[b, s, topk[b, s, k]] = True
    return out


# ---------------------------------------------------------------------------- recall
def _normalised_mass(mass, visible):
    """(target [B, S, N] = mass / its visible total, has [B, S] rows with positive total)."""
    mass = np.where(np.asarray(visible), np.asarray(mass, np.float64), 0.0)
    total = mass.sum(-1)
    has = total > 0
    return mass / np.where(has, total, 1.0)[..., None], has


def _recall_by_rank(target, has, order, ks):
    """Mean over rows with `has` of the target mass on the first k entries of `order`."""
    ranked = np.take_along_axis(target, order, axis=-1)
    cum = np.concatenate([np.zeros(ranked.shape[:-1] + (1,)), np.cumsum(ranked, -1)], -1)
    n = target.shape[-1]
    out = []
    for k in ks:
        if int(k) < 0:
            raise ValueError(f"k={k} is invalid: must be >= 0")
        r = cum[..., min(int(k), n)]
        out.append(float(r[has].mean()) if has.any() else float("nan"))
    return np.asarray(out)


def recall_at_k(scores, mass, visible, ks: Sequence[int]) -> np.ndarray:
    """Recall of the dense attention mass when each query keeps its k best-scored entries.

    scores, mass [B, S, N]; visible [B, S, N] -> [len(ks)] mean recall per k. Ties in the score
    go to the lower entry id (as `lax.top_k`); k >= the number of visible entries gives 1.
    """
    scores = np.where(np.asarray(visible), np.asarray(scores, np.float64), -np.inf)
    target, has = _normalised_mass(mass, visible)
    order = np.argsort(-scores, axis=-1, kind="stable")
    return _recall_by_rank(target, has, order, ks)


def oracle_recall_at_k(mass, visible, ks: Sequence[int]) -> np.ndarray:
    """The best any k-selection can do: keep the k entries with the most dense mass."""
    target, has = _normalised_mass(mass, visible)
    order = np.argsort(-target, axis=-1, kind="stable")
    return _recall_by_rank(target, has, order, ks)


def selection_recall(topk, mass, visible) -> float:
    """Recall of an explicit selection [B, S, K] (what the model's top-k keeps)."""
    target, has = _normalised_mass(mass, visible)
    picked = selection_matrix(topk, target.shape[-1])
    r = np.sum(np.where(picked, target, 0.0), axis=-1)
    return float(r[has].mean()) if has.any() else float("nan")


# ---------------------------------------------------------------------------- distances
def selection_distances(topk, ratio: int) -> np.ndarray:
    """Distance in tokens from each query to the last token of each entry it selected.

    topk [B, S, K] (-1 = none), entries of `ratio` tokens -> flat int array of t - (n*m + m - 1)
    over every valid pick (0 = the block that ends at the query itself).
    """
    if ratio < 1:
        raise ValueError(f"ratio={ratio} is invalid: must be >= 1")
    topk = np.asarray(topk)
    t = np.arange(topk.shape[1])[None, :, None]
    d = t - (topk * ratio + ratio - 1)
    return d[topk >= 0]


def distance_histogram(distances, bin_edges) -> np.ndarray:
    """Share of picks per distance bin (edges in tokens, as `np.histogram`); sums to 1."""
    h, _ = np.histogram(np.asarray(distances), bins=np.asarray(bin_edges))
    return h / max(int(h.sum()), 1)


def visible_distances(visible, ratio: int) -> np.ndarray:
    """The same distances for every visible entry: what a uniform selection would give."""
    visible = np.asarray(visible)
    b, t, n = np.nonzero(visible)
    return t - (n * ratio + ratio - 1)


# ---------------------------------------------------------------------------- head agreement
def _topk_sets(scores, visible, k):
    """[B, S, N] -> [B, S, N] bool, the k best visible entries (ties -> lower id)."""
    s = np.where(visible, scores, -np.inf)
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    sel = np.zeros(s.shape, bool)
    np.put_along_axis(sel, order, True, axis=-1)
    return sel & visible


def head_agreement(head_scores_, visible, k: int) -> np.ndarray:
    """Mean Jaccard overlap between the top-k sets each indexer head would pick on its own.

    head_scores [B, S, Hi, N]; visible [B, S, N] -> [Hi, Hi] (diagonal 1). Only queries that see
    more than k entries count (with fewer, every head picks everything and agrees trivially);
    NaN when no query does.
    """
    hs = np.asarray(head_scores_, np.float64)
    visible = np.asarray(visible, bool)
    if k < 1:
        raise ValueError(f"k={k} is invalid: must be >= 1")
    rows = visible.sum(-1) > k                                         # [B, S]
    hi = hs.shape[2]
    if not rows.any():
        return np.full((hi, hi), np.nan)
    sets = np.stack([_topk_sets(hs[:, :, h], visible, k)[rows] for h in range(hi)])  # [Hi, R, N]
    inter = np.einsum("arn,brn->abr", sets.astype(np.int64), sets.astype(np.int64))
    size = sets.sum(-1)
    union = size[:, None, :] + size[None, :, :] - inter
    return np.mean(inter / np.maximum(union, 1), axis=-1)


def head_vs_combined(head_scores_, visible, k: int) -> np.ndarray:
    """[Hi] mean Jaccard overlap of each head's own top-k with the combined (summed) top-k,
    over queries that see more than k entries."""
    hs = np.asarray(head_scores_, np.float64)
    visible = np.asarray(visible, bool)
    rows = visible.sum(-1) > k
    if not rows.any():
        return np.full(hs.shape[2], np.nan)
    combined = _topk_sets(hs.sum(2), visible, k)[rows]
    out = []
    for h in range(hs.shape[2]):
        own = _topk_sets(hs[:, :, h], visible, k)[rows]
        inter = np.sum(own & combined, -1)
        union = np.sum(own | combined, -1)
        out.append(float(np.mean(inter / np.maximum(union, 1))))
    return np.asarray(out)
