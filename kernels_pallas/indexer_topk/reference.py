"""Reference lightning-indexer top-k in plain jnp: the naive form (the whole [B, S, N] score
matrix, then `lax.top_k`) and a query-chunked XLA form whose memory is O(chunk * N).

Scores: I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s]) in fp32 at HIGHEST precision
(`sparse_lm.ops.indexer.indexer_scores`). Entry s is visible to query t iff s < (t+1)//ratio,
key_valid[b,s], and t's document is the entry's (`sparse_lm.ops.masks.entry_visible`, entry
documents from `masks.entry_segments`). Top-k: best scores first, ties to the lower index
(`lax.top_k`), -1 (score -inf) where fewer than k entries are visible.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from sparse_lm.ops import masks
from sparse_lm.ops.indexer import indexer_scores


def _visible(rows, seg_rows, n: int, ratio: int, key_valid, segment_ids, key_segments=None):
    """[B or 1, len(rows), N] bool: entries visible to the queries at positions `rows`
    (seg_rows [B, len(rows)]: their documents, when segment_ids is given; the entries' documents
    are key_segments [B, N], or from segment_ids when those cover the whole sequence)."""
    seg_e = None if segment_ids is None else (
        masks.entry_segments(segment_ids, n, ratio) if key_segments is None else key_segments)
    vis = masks.entry_visible(rows, n, ratio, key_valid, seg_rows, seg_e)
    return vis if vis.ndim == 3 else vis[None]


def scores(q, weights, keys, vis):
    """q [B,T,Hi,Di], weights [B,T,Hi], keys [B,N,Di], vis [B|1,T,N] -> [B,T,N] fp32, -inf where
    not visible."""
    return indexer_scores(q, weights, keys, vis, precision=lax.Precision.HIGHEST)


def _topk(sc, k: int):
    vals, idx = lax.top_k(sc, k)
    ok = jnp.isfinite(vals)
    return jnp.where(ok, idx, -1).astype(jnp.int32), jnp.where(ok, vals, -jnp.inf)


def indexer_topk_reference(q, weights, keys, *, k: int, ratio: int, key_valid=None,
                           segment_ids=None, key_segments=None, query_offset=0):
    """The naive form: all [B, S, N] scores, then top-k. -> (idx [B,S,k] int32, scores [B,S,k]).
    Query row t sits at position query_offset + t."""
    s = q.shape[1]
    vis = _visible(query_offset + jnp.arange(s), segment_ids, keys.shape[1], ratio, key_valid,
                   segment_ids, key_segments)
    return _topk(scores(q, weights, keys, vis), k)


def indexer_topk_xla(q, weights, keys, *, k: int, ratio: int, key_valid=None, segment_ids=None,
                     key_segments=None, query_offset=0, chunk: int = 256):
    """Same result, queries in chunks of `chunk` under `lax.map`: O(chunk * N) scores at once."""
    b, s = q.shape[:2]
    n = keys.shape[1]
    chunk = max(1, min(chunk, s))
    pad = -s % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    wp = jnp.pad(weights, ((0, 0), (0, pad), (0, 0)))
    segp = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, pad)),
                                                    constant_values=-1)

    def one(c):
        rows = c * chunk + jnp.arange(chunk)
        qc = lax.dynamic_slice_in_dim(qp, c * chunk, chunk, axis=1)
        wc = lax.dynamic_slice_in_dim(wp, c * chunk, chunk, axis=1)
        seg_rows = None if segp is None else segp[:, rows]
        vis = _visible(query_offset + rows, seg_rows, n, ratio, key_valid, segment_ids,
                       key_segments)
        return _topk(scores(qc, wc, keys, vis), k)

    idx, vals = lax.map(one, jnp.arange((s + pad) // chunk))         # [C, B, chunk, k]
    fix = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, s + pad, k)[:, :s]  # noqa: E731
    return fix(idx), fix(vals)
