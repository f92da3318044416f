"""Attention-mass accounting: how much of each query's softmax goes to the window, to the
compressed entries, and to the sink (pure functions of arrays).

The joint softmax of spec §4.4 has three parts that sum to 1 for every (query, head):
  window      raw keys t-W+1 .. t of the query's own document
  compressed  the compressed entries it attends (CSA: its top-k, HCA / dense CSA: all visible)
  sink        the per-head sink logit (a column with no value)
Given q, the keys and the lse of that softmax (`sparse_attention(..., return_lse=True)`), each
part is sum(exp(logit - lse)) over its keys. Everything here is dense over the S x S window band
and the S x N entries: meant for analysis batches of a few thousand tokens, not for training.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

PARTS = ("window", "compressed", "sink")


def window_mask(seq: int, window: int, segment_ids=None, batch: int = 1):
    """[B, S, S] bool: key u is in query t's window (t-W < u <= t, same document)."""
    if window < 1:
        raise ValueError(f"window={window} is invalid: must be >= 1")
    t = jnp.arange(seq)
    band = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window)
    if segment_ids is None:
        return jnp.broadcast_to(band, (batch, seq, seq))
    seg = jnp.asarray(segment_ids)
    return band[None] & (seg[:, :, None] == seg[:, None, :])


def mass_split(q, kv, sink, lse, *, window: int, scale: float, segment_ids=None,
               entries=None, attended=None) -> dict:
    """Probability mass of the window, the compressed entries and the sink per query and head.

    q [B, S, H, D]; kv [B, S, D] (the shared K=V row); sink [H]; lse [B, S, H] of the joint
    softmax; entries [B, N, D] with attended [B, S, N] (bool, or how often each entry is
    listed: a listed entry counts once per listing) or None (no compressed part).
    Returns {"window", "compressed", "sink"} -> [B, S, H] fp32; their sum is 1 when `lse` is
    the lse of exactly this attention.
    """
    qf = jnp.asarray(q, jnp.float32)
    b, s, h, _ = qf.shape
    lse = jnp.asarray(lse, jnp.float32)
    mask = window_mask(s, window, segment_ids, b)
    lw = jnp.einsum("bshd,btd->bsht", qf, jnp.asarray(kv, jnp.float32)) * scale
    pw = jnp.where(mask[:, :, None, :], jnp.exp(lw - lse[..., None]), 0.0)
    out = {"window": jnp.sum(pw, -1)}
    if entries is not None and entries.shape[1] > 0:
        if attended is None:
            raise ValueError("entries given without `attended` [B, S, N]")
        lc = jnp.einsum("bshd,bnd->bshn", qf, jnp.asarray(entries, jnp.float32)) * scale
        count = jnp.asarray(attended, jnp.float32)[:, :, None, :]
        out["compressed"] = jnp.sum(jnp.where(count > 0, count * jnp.exp(lc - lse[..., None]), 0.0), -1)
    else:
        out["compressed"] = jnp.zeros((b, s, h), jnp.float32)
    out["sink"] = jnp.exp(jnp.asarray(sink, jnp.float32)[None, None, :] - lse)
    return out


def mean_split(split: dict, query_mask=None) -> dict:
    """{"window", "compressed", "sink"} [B, S, H] -> their means over queries (and heads) as
    floats; query_mask [B, S] picks the queries that count (e.g. real tokens only)."""
    out = {}
    for k in PARTS:
        a = np.asarray(split[k], np.float64)
        if query_mask is not None:
            a = a[np.asarray(query_mask, bool)]
        out[k] = float(a.mean()) if a.size else float("nan")
    return out


def split_by_position(split: dict, bin_edges: Sequence[int]) -> dict:
    """Mean of each part over heads and rows for query positions in each bin of `bin_edges`
    (positions in the row): {part: [len(bin_edges) - 1]} (NaN for empty bins)."""
    edges = np.asarray(bin_edges)
    out = {}
    for k in PARTS:
        a = np.asarray(split[k], np.float64).mean(axis=(0, 2))         # [S]
        pos = np.arange(a.shape[0])
        vals = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (pos >= lo) & (pos < hi)
            vals.append(float(a[sel].mean()) if sel.any() else float("nan"))
        out[k] = np.asarray(vals)
    return out


def mass_table(rows: Sequence[dict]):
    """DataFrame of per-layer mean mass: rows of {"layer", "kind", "window", "compressed",
    "sink", ...} (e.g. from `internals.mass_rows`), in the given order."""
    import pandas as pd
    return pd.DataFrame(list(rows))
