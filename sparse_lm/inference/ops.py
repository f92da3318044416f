"""Pure functions of the cached (chunked prefill / decode) path, shapes in docstrings.

A *chunk* is T new tokens per row, appended after the `lengths` [B] tokens the cache already
holds; row b uses only its first `n_new[b]` (0..T) tokens, the rest is padding that changes
nothing. Token j of row b has position lengths[b] + j. Chunk boundaries may fall anywhere,
inside compression windows too: the compressor tails carry the incomplete window across chunks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.ops.attention import _joint_softmax
from sparse_lm.ops.compress import compress


def chunk_positions(lengths: jax.Array, t: int) -> jax.Array:
    """[B] tokens held -> [B, T] positions of the chunk's tokens."""
    return lengths[:, None].astype(jnp.int32) + jnp.arange(t, dtype=jnp.int32)[None, :]


# ---------------------------------------------------------------------- window ring buffer
def ring_positions(lengths: jax.Array, window: int) -> jax.Array:
    """[B] tokens held -> [B, W] position of the token in each ring slot (negative = empty).

    Slot i holds the newest position p < length with p mod W == i.
    """
    last = lengths[:, None].astype(jnp.int32) - 1
    return last - jnp.mod(last - jnp.arange(window, dtype=jnp.int32)[None, :], window)


def ring_update(ring: jax.Array, kv: jax.Array, lengths: jax.Array, n_new: jax.Array) -> jax.Array:
    """Write the chunk's valid rows into the ring. ring [B, W, D], kv [B, T, D] -> [B, W, D].

    Every slot takes the newest valid token that maps to it (a gather, so chunks longer than W
    need no ordering of colliding writes); slots no new token reaches keep their row.
    """
    w = ring.shape[1]
    newest = ring_positions(lengths + n_new, w)                     # [B, W]
    src = newest - lengths[:, None]                                 # index into the chunk
    take = src >= 0
    rows = jnp.take_along_axis(kv, jnp.clip(src, 0, kv.shape[1] - 1)[..., None], axis=1)
    return jnp.where(take[..., None], rows.astype(ring.dtype), ring)


# ---------------------------------------------------------------------- compressor tails
def tail_step(state_kv: jax.Array, state_gate: jax.Array, kv: jax.Array, gate: jax.Array,
              lengths: jax.Array, n_new: jax.Array, *, ratio: int, overlap: bool):
    """Pool the windows a chunk completes and roll the uncompressed tail forward.

    state_kv, state_gate [B, P, w] with P = (1+ov)*m (layout in `sparse_lm.inference.cache`);
    kv, gate [B, T, w] fp32 projections of the chunk (gate with `ape` added).
    Returns pooled [B, nW, c] fp32 (before norm/RoPE), entry index [B, nW] int32, complete
    [B, nW] bool (only complete windows are real entries), new state_kv, new state_gate.
    nW = (m - 1 + T) // m is the most windows a chunk of T tokens can complete.

    The chunk is laid out on the window grid after the stored tail: the buffer starts at the
    first token of the previous window (overlap) or of the current window, so its windows are
    exactly the ones `ops.compress` pools in a full forward, with the same slots.
    """
    b, t, w = kv.shape
    m, ov = ratio, int(overlap)
    p = state_kv.shape[1]
    n_w = (m - 1 + t) // m
    length = ov * m + (n_w + 1) * m          # one spare window to read the next tail from
    r = jnp.mod(lengths, m)[:, None]
    base = (lengths - jnp.mod(lengths, m))[:, None]               # first token of current window
    k = jnp.arange(length, dtype=jnp.int32)[None, :]
    src = jnp.where(k < ov * m + r, k, p + k - ov * m - r)          # [B, length] into [state|chunk]
    src = jnp.clip(src, 0, p + t - 1)

    def gather(state, new):
        both = jnp.concatenate([state, new.astype(jnp.float32)], axis=1)
        return jnp.take_along_axis(both, src[..., None], axis=1)

    buf_kv, buf_gate = gather(state_kv, kv), gather(state_gate, gate)
    span = ov * m + n_w * m
    pooled, _ = compress(buf_kv[:, :span], buf_gate[:, :span], None, ratio=m, overlap=overlap)
    if overlap:
        pooled = pooled[:, 1:]     # the first window of the buffer is the stored previous window
    end = (lengths + n_new)[:, None]
    idx = base // m + jnp.arange(n_w, dtype=jnp.int32)[None, :]
    complete = (idx + 1) * m <= end
    # New tail: the window holding `end` (its first `end mod m` slots), after the previous one.
    new_base = end - jnp.mod(end, m)
    start = new_base - base                                        # a multiple of m, >= 0
    j = jnp.arange(p, dtype=jnp.int32)[None, :]
    new_src = start + j                                            # buffer index of slot j
    filled = (j < ov * m) | (j - ov * m < jnp.mod(end, m))
    new_kv = jnp.take_along_axis(buf_kv, new_src[..., None], axis=1)
    new_gate = jnp.take_along_axis(buf_gate, new_src[..., None], axis=1)
    new_kv = jnp.where(filled[..., None], new_kv, 0.0)
    new_gate = jnp.where(filled[..., None], new_gate, -jnp.inf)
    return pooled, idx.astype(jnp.int32), complete, new_kv, new_gate


def write_entries(entries: jax.Array, new: jax.Array, idx: jax.Array,
                  complete: jax.Array) -> jax.Array:
    """entries [B, N, c] <- new [B, nW, c] at rows idx [B, nW] where complete (others dropped).

    A scatter of the nW rows only, followed by an optimization barrier: without it XLA:CPU fused
    the write into the entries' readers and copied (and transposed) the whole [B, N, c] cache on
    every step; with it the scatter updates the donated buffer in place.
    """
    b, n = entries.shape[:2]
    rows = jnp.where(complete, idx, n)                              # n = out of range: dropped
    batch = jnp.broadcast_to(jnp.arange(b)[:, None], rows.shape)
    out = entries.at[batch, rows].set(new.astype(entries.dtype), mode="drop")
    return jax.lax.optimization_barrier(out)


# ---------------------------------------------------------------------- attention
def _scores(q: jax.Array, keys: jax.Array) -> jax.Array:
    """q [B, T, H, D], keys [B, N, D] -> [B, T, H, N] fp32 dot products.

    One matmul per row with the chunk and head axes flattened: on XLA:CPU the four-axis einsum
    ("bthd,bnd->bthn") made a transposed copy of the whole key array on every call, O(N) extra
    work per decode step for the cached entries and indexer keys.
    """
    b, t, h, d = q.shape
    flat = q.reshape(b, t * h, d).astype(jnp.float32)
    return jnp.einsum("bxd,bnd->bxn", flat, keys.astype(jnp.float32)).reshape(b, t, h, -1)


def _weighted_values(probs: jax.Array, values: jax.Array) -> jax.Array:
    """probs [B, T, H, N], values [B, N, D] -> [B, T, H, D] fp32 (flattened like `_scores`)."""
    b, t, h, n = probs.shape
    out = jnp.einsum("bxn,bnd->bxd", probs.reshape(b, t * h, n), values.astype(jnp.float32))
    return out.reshape(b, t, h, -1)


def cached_indexer_scores(q: jax.Array, weights: jax.Array, keys: jax.Array,
                          visible: jax.Array) -> jax.Array:
    """`sparse_lm.ops.indexer.indexer_scores` against the cached indexer keys, the same math
    (I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s]), -inf where not visible) with the dot
    products taken by `_scores` (no transposed copy of the keys).

    q [B, T, Hi, Di], weights [B, T, Hi], keys [B, N, Di], visible [B, T, N] -> [B, T, N] fp32.
    """
    dots = jax.nn.relu(_scores(q, keys))
    scores = jnp.einsum("bths,bth->bts", dots, weights.astype(jnp.float32))
    return jnp.where(visible, scores, -jnp.inf)


def entry_visible(positions: jax.Array, n: int, ratio: int) -> jax.Array:
    """[B, T] query positions -> [B, T, N] bool: entry s visible iff s < (t+1)//m (spec §14.1)."""
    return jnp.arange(n)[None, None, :] < ((positions + 1) // ratio)[..., None]


def cached_attention(q: jax.Array, q_pos: jax.Array, keys: jax.Array, key_pos: jax.Array,
                     sink: jax.Array, *, window: int, scale: float,
                     entries: jax.Array | None = None, ratio: int = 0,
                     topk_idx: jax.Array | None = None) -> jax.Array:
    """Joint window + compressed attention with a sink for chunk queries against a cache.

    q [B, T, H, D] at positions q_pos [B, T]; keys [B, K, D] (the ring buffer followed by the
    chunk's rows) at key_pos [B, K] (negative = empty slot); sink [H]; entries [B, N, D] (the
    whole preallocated entries cache: only visible entries, s < (t+1)//m, take part), either all
    visible ones (topk_idx None: HCA, dense CSA) or the listed ones (topk_idx [B, T, k], -1 =
    none). Query t sees keys at positions t-W+1..t. Returns [B, T, H, D] in q's dtype.
    Same math as `ops.attention.sparse_attention`, one joint softmax.
    """
    b, t, h, d = q.shape
    qf = q.astype(jnp.float32)
    kp, qp = key_pos[:, None, :], q_pos[:, :, None]
    band = (kp >= 0) & (kp <= qp) & (qp - kp < window)               # [B, T, K]
    lw = _scores(qf, keys) * scale
    parts = [jnp.where(band[:, :, None, :], lw, -jnp.inf)]
    values = None
    if entries is not None and entries.shape[1] > 0:   # max_len < m leaves no room for entries
        ef = entries.astype(jnp.float32)
        n = ef.shape[1]
        if topk_idx is None:
            vis = entry_visible(q_pos, n, ratio)
            lc = _scores(qf, ef) * scale
            lc = jnp.where(vis[:, :, None, :], lc, -jnp.inf)
            values = ("dense", ef)
        else:
            safe = jnp.clip(topk_idx, 0, max(n - 1, 0))    # address only; -1 is masked below
            rows = jnp.take_along_axis(ef[:, None], safe[..., None], axis=2)   # [B, T, k, D]
            lc = jnp.einsum("bthd,btkd->bthk", qf, rows) * scale
            lc = jnp.where((topk_idx >= 0)[:, :, None, :], lc, -jnp.inf)
            values = ("rows", rows)
        parts.append(lc)
    sink_l = jnp.broadcast_to(sink.astype(jnp.float32), (b, t, h))
    probs, _ = _joint_softmax(parts, sink_l)
    out = _weighted_values(probs[0], keys)
    if values is not None:
        kind, v = values
        out = out + (_weighted_values(probs[1], v) if kind == "dense"
                     else jnp.einsum("bthk,btkd->bthd", probs[1], v))
    return out.astype(q.dtype)
