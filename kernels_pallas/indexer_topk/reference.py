"""Reference lightning-indexer top-k in plain jnp: the naive form (the whole [B, S, N] score
matrix, then `lax.top_k`) and a query-chunked XLA form whose memory is O(chunk * N).

Scores: I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s]) in fp32. Entry s is visible to query
t iff s < (t+1)//ratio, key_valid[b,s], and segment_ids[b,t] == segment_ids[b, s*ratio] (the
model's `entry_visibility`). Top-k: best scores first, ties to the lower index (`lax.top_k`),
-1 (score -inf) where fewer than k entries are visible.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def entry_segments(segment_ids, key_valid, n: int, ratio: int):
    """[B, N] segment of each entry (its window's first token); None without segment ids."""
    if segment_ids is None:
        return None
    return segment_ids[:, : n * ratio: ratio]


def visibility(s: int, n: int, ratio: int, key_valid=None, segment_ids=None, rows=None):
    """[B or 1, len(rows), N] bool visibility (rows: query positions, default all S)."""
    t = jnp.arange(s) if rows is None else rows
    e = jnp.arange(n)
    vis = ((e[None, :] + 1) * ratio <= t[:, None] + 1)[None]
    if key_valid is not None:
        vis = vis & key_valid[:, None, :]
    if segment_ids is not None:
        seg_e = entry_segments(segment_ids, key_valid, n, ratio)
        seg_q = segment_ids[:, t]
        vis = vis & (seg_q[:, :, None] == seg_e[:, None, :])
    return vis


def scores(q, weights, keys, vis):
    """q [B,T,Hi,Di], weights [B,T,Hi], keys [B,N,Di], vis [B|1,T,N] -> [B,T,N] fp32, -inf where
    not visible."""
    hp = lax.Precision.HIGHEST
    dots = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), keys.astype(jnp.float32),
                      precision=hp)
    sc = jnp.einsum("bths,bth->bts", jax.nn.relu(dots), weights.astype(jnp.float32), precision=hp)
    return jnp.where(vis, sc, -jnp.inf)


def _topk(sc, k: int):
    vals, idx = lax.top_k(sc, k)
    ok = jnp.isfinite(vals)
    return jnp.where(ok, idx, -1).astype(jnp.int32), jnp.where(ok, vals, -jnp.inf)


def indexer_topk_reference(q, weights, keys, *, k: int, ratio: int, key_valid=None,
                           segment_ids=None):
    """The naive form: all [B, S, N] scores, then top-k. -> (idx [B,S,k] int32, scores [B,S,k])."""
    b, s = q.shape[:2]
    n = keys.shape[1]
    return _topk(scores(q, weights, keys, visibility(s, n, ratio, key_valid, segment_ids)), k)


def indexer_topk_xla(q, weights, keys, *, k: int, ratio: int, key_valid=None, segment_ids=None,
                     chunk: int = 256):
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
        t = rows
        e = jnp.arange(n)
        vis = ((e[None, :] + 1) * ratio <= t[:, None] + 1)[None]
        if key_valid is not None:
            vis = vis & key_valid[:, None, :]
        if segp is not None:
            seg_e = segment_ids[:, : n * ratio: ratio]
            vis = vis & (segp[:, rows][:, :, None] == seg_e[:, None, :])
        return _topk(scores(qc, wc, keys, vis), k)

    idx, vals = lax.map(one, jnp.arange((s + pad) // chunk))         # [C, B, chunk, k]
    fix = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, s + pad, k)[:, :s]  # noqa: E731
    return fix(idx), fix(vals)
