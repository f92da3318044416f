"""Attention-mass accounting: how much of each query's softmax goes to the window, to the
compressed entries, and to the sink (pure functions of arrays).

The joint softmax of spec §4.4 has three parts that sum to 1 for every (query, head):
  window      raw keys t-W+1 .. t of the query's own document
  compressed  the compressed entries it attends (CSA: its top-k, HCA / dense CSA: all visible)
  sink        the per-head sink logit (a column with no value)
The split itself is `sparse_lm.ops.attention.attention_mass_split` (the model records it per
layer with `record=True`); this module summarises splits.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from sparse_lm.ops.attention import MASS_PARTS

PARTS = MASS_PARTS     # the three parts, in the order ops.attention names them


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
