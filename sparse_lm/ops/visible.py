"""Visible-only work over a preallocated cache: the cached path's indexer top-k and its dense
entries part (HCA, and CSA's dense warm-up) in key blocks, stopping at the last visible entry.

A cache holds `max_len // m` entry slots, of which a chunk at positions q_pos sees only
`masks.visible_entry_count(max(q_pos), m)`. Both functions loop over blocks of `block` cached
entries up to that count:
  blocked_indexer_topk   indexer scores of each key block merged into a running top-k
                         ([B, T, k + block] per step, never [B, T, N]);
  blocked_entries_part   every visible entry attended, one block at a time, the blocks merged
                         by their lse (online softmax; the part's (out, lse) as `_dense_part`
                         gives for all entries at once).
Each returns how many blocks its loop ran (the loop's own counter), which is what a step's
work in these parts follows.

Why dynamic loop bounds (`lax.fori_loop` with a traced trip count, i.e. a while loop) and not
length-bucketed compiled steps: one compiled prefill step and one compiled decode step serve
every position (a 1M-token prefill in 256-token chunks crosses 4096 positions, and buckets by
powers of two would compile ~log2(max_len) steps per chunk length and still do up to 2x the
visible work); the work is exactly the visible blocks, rounded up to one block. The price is
one block of masked work at the edge and a while loop whose per-iteration overhead (tens of
microseconds on XLA:CPU) is why blocks are thousands of entries wide.

Both run `fold_visible_blocks`: blocks are read with `dynamic_slice` at start
min(i * block, N - block) (an in-bounds slice, so the last block may overlap the previous one;
entries already seen are masked), so N need not be a multiple of the block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.ops import masks
from sparse_lm.ops.attention import _dense_part
from sparse_lm.ops.indexer import indexer_scores

# Entries per loop step: the indexer's keys are narrow (Di <= 128), so wide blocks keep the
# while loop's overhead small; the attention's entries are [.., D] rows attended by H heads.
INDEXER_KEY_BLOCK = 4096
ENTRIES_BLOCK = 1024


def visible_blocks(q_pos: jax.Array, num_entries: int, ratio: int, block: int) -> jax.Array:
    """How many blocks of `block` entries (of `num_entries` slots) hold an entry some query at
    q_pos [B, T] can see: ceil(min(N, max visible count) / block), an int32 scalar."""
    count = jnp.minimum(jnp.max(masks.visible_entry_count(q_pos, ratio)), num_entries)
    return ((count + block - 1) // block).astype(jnp.int32)


def fold_visible_blocks(entries: jax.Array, q_pos: jax.Array, ratio: int, block: int, step,
                        init):
    """The loop both functions run: for each block of `block` rows of entries [B, N, ...] up to
    the last one visible at q_pos [B, T], carry = step(carry, rows [B, block, ...], row_idx
    [block] (entry index of each row), visible [B, T, block] (causally visible and not already
    covered by an earlier block)). Returns (carry, blocks run: the loop's own counter)."""
    n = entries.shape[1]
    count = masks.visible_entry_count(q_pos, ratio)[..., None]

    def body(i, state):
        carry, ran = state
        first = i * block
        start = jnp.minimum(first, n - block)                  # in bounds: may overlap
        rows = jax.lax.dynamic_slice_in_dim(entries, start, block, axis=1)
        row_idx = start + jnp.arange(block, dtype=jnp.int32)
        vis = (row_idx < count) & (row_idx >= first)
        return step(carry, rows, row_idx, vis), ran + 1

    return jax.lax.fori_loop(0, visible_blocks(q_pos, n, ratio, block), body,
                             (init, jnp.zeros((), jnp.int32)))


def blocked_indexer_topk(q: jax.Array, weights: jax.Array, keys: jax.Array, q_pos: jax.Array, *,
                         ratio: int, k: int, block: int | None = None):
    """`select_topk(indexer_scores(q, weights, keys, masks.entry_visible(q_pos, N, ratio),
    flat=True), k)` over the visible key blocks only.

    q [B, T, Hi, Di], weights [B, T, Hi], keys [B, N, Di] (the indexer cache), q_pos [B, T]
    -> (topk [B, T, min(k, N)] int32, -1 where fewer are visible; blocks run, int32 scalar).
    block: entries per step (None = INDEXER_KEY_BLOCK, read at trace time).
    Same picks in the same order: the running list is kept sorted (value, then lower index) and
    each block's entries have higher indices than every earlier one, so `lax.top_k` over
    [running | block] breaks ties exactly as over the whole row.
    """
    b, t = q.shape[:2]
    n = keys.shape[1]
    k_eff = min(k, n)
    if k_eff == 0:
        return jnp.zeros((b, t, 0), jnp.int32), jnp.zeros((), jnp.int32)
    block = min(block or INDEXER_KEY_BLOCK, n)

    def step(carry, rows, row_idx, vis):
        vals, idx = carry
        scores = indexer_scores(q, weights, rows, vis, flat=True)           # [B, T, block]
        both = jnp.concatenate([vals, scores], axis=-1)
        both_idx = jnp.concatenate([idx, jnp.broadcast_to(row_idx, scores.shape)], axis=-1)
        vals, at = jax.lax.top_k(both, k_eff)
        return vals, jnp.take_along_axis(both_idx, at, axis=-1)

    init = (jnp.full((b, t, k_eff), -jnp.inf, jnp.float32), jnp.full((b, t, k_eff), -1, jnp.int32))
    (vals, idx), ran = fold_visible_blocks(keys, q_pos, ratio, block, step, init)
    return jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32), ran


def blocked_entries_part(q: jax.Array, entries: jax.Array, q_pos: jax.Array, *, ratio: int,
                         scale: float, block: int | None = None):
    """The part of every visible cached entry (`_dense_part` over `masks.entry_visible`) over
    the visible blocks only, merged by lse (online softmax).

    q [B, T, H, D] fp32, entries [B, N, D] (any dtype; each block is read in fp32), q_pos
    [B, T] -> (out [B, T, H, D] fp32, lse [B, T, H] fp32, -inf where nothing is visible;
    blocks run, int32 scalar). block: entries per step (None = ENTRIES_BLOCK)."""
    b, t, h, d = q.shape
    n = entries.shape[1]
    block = min(block or ENTRIES_BLOCK, n)

    def step(carry, rows, row_idx, vis):
        out, lse = carry
        o_blk, lse_blk = _dense_part(q, rows.astype(jnp.float32), vis, scale, jnp.float32,
                                     flat=True)
        new = jnp.logaddexp(lse, lse_blk)
        safe = jnp.where(jnp.isfinite(new), new, 0.0)
        return (jnp.exp(lse - safe)[..., None] * out + jnp.exp(lse_blk - safe)[..., None] * o_blk,
                new)

    init = (jnp.zeros((b, t, h, d), jnp.float32), jnp.full((b, t, h), -jnp.inf, jnp.float32))
    (out, lse), ran = fold_visible_blocks(entries, q_pos, ratio, block, step, init)
    return out, lse, ran
