"""The cache state of one attention layer and the pure functions that keep it (spec §13).

A *chunk* is T new tokens per row, appended after the `lengths` [B] tokens the cache already
holds; row b uses only its first `n_new[b]` (0..T) tokens, the rest is padding that changes
nothing. Token j of row b has position lengths[b] + j. Chunk boundaries may fall anywhere,
inside compression windows too: the compressor tails carry the incomplete window across chunks.

Per attention layer (`LayerCache`):
  * ``window`` [B, W, D]: ring buffer of the last W raw K=V rows; token p sits in slot p mod W
    (the current token's row is part of the window, spec §4.4).
  * ``compressor`` (CSA/HCA) and ``indexer`` (CSA), each a `CompressorCache`:
      - ``kv``, ``gate`` [B, (1+ov)*m, (1+ov)*c] fp32: the uncompressed tail. Gates include the
        position bias ``ape``; an empty slot has gate -inf and value 0. With overlap (CSA, ov=1)
        slots 0..m-1 hold the previous complete window and slots m..2m-1 the current one; HCA
        (ov=0) keeps only the current window. Slot k of the current window holds the token at
        position m*floor(length/m) + k for k < length mod m (the official reference's layout).
      - ``entries`` [B, max_len // m, c]: compressed entries in order (entry i = window i, normed
        and RoPE'd at position m*i); for the indexer these are its compressed keys.
  * CSA layers whose selector is not the lightning indexer (`model.selector`): `dense`, `fixed`
    and `mlp_router` select from positions and the compressed entries alone (no indexer part);
    `dsa_tokens` picks raw tokens, so its layer keeps a `TokenCache` instead of compressing:
    every token's K=V row and indexer key, [B, max_len, D] and [B, max_len, Di] (V3.2's cache).
SWA-only layers have only the window. The model's `Attention` runs with or without such a
cache; this module is the bookkeeping that differs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sparse_lm.ops.compress import compress


def dataclass_pytree(cls=None, *, meta=()):
    def wrap(c):
        c = dataclasses.dataclass(c)
        data = [f.name for f in dataclasses.fields(c) if f.name not in meta]
        return jax.tree_util.register_dataclass(c, data_fields=data, meta_fields=list(meta))
    return wrap if cls is None else wrap(cls)


@dataclass_pytree
class CompressorCache:
    kv: jax.Array        # [B, slots, w] fp32 (state)
    gate: jax.Array      # [B, slots, w] fp32, ape included, -inf = empty (state)
    entries: jax.Array   # [B, max_len // m, c] (grows with context)


@dataclass_pytree
class TokenCache:
    """Per-token rows of a CSA layer whose selector picks raw tokens (dsa_tokens): token p in
    row p of both (written with `write_rows`; both grow with context)."""
    kv_rows: jax.Array      # [B, max_len, D] the layer's K=V rows
    index_keys: jax.Array   # [B, max_len, Di] the selector's keys


@dataclass_pytree
class LayerCache:
    window: jax.Array                               # [B, W, D] ring buffer (state)
    compressor: CompressorCache | None              # CSA / HCA (not CSA with dsa_tokens)
    indexer: CompressorCache | TokenCache | None    # CSA: lightning's keys / dsa_tokens' rows


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


@dataclass_pytree
class FullKVCache:
    """A plain full-context K=V cache of one window-only layer: kv [B, max_len, D], token p in
    row p (the dense baseline of the decode benchmark; no ring, no compression)."""
    kv: jax.Array


def write_rows(cache: jax.Array, rows: jax.Array, lengths: jax.Array,
               n_new: jax.Array) -> jax.Array:
    """cache [B, L, D] <- the chunk's real rows [B, T, D] at their positions (in place)."""
    t = rows.shape[1]
    positions = chunk_positions(lengths, t)
    return write_entries(cache, rows, positions, jnp.arange(t)[None, :] < n_new[:, None])
