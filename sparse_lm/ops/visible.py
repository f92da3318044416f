"""Visible-only work over a preallocated cache: the loop the cached path's indexer top-k and
dense entries part run over blocks of cached entries, stopping at the last visible one.

A cache holds `max_len // m` entry slots, of which a chunk at positions q_pos sees only
`masks.visible_entry_count(max(q_pos), m)`. `fold_visible_blocks` folds a step over blocks of
entries up to that count; its users:
  `blocked_topk`                       each key block's scores merged into a running
                                       top-k ([B, T, k + block] per step, never [B, T, N]):
                                       `ops.indexer.blocked_indexer_topk` (blocks of
                                       INDEXER_KEY_BLOCK keys) and the cached mlp_router and
                                       dsa_tokens selectors;
  `ops.attention.blocked_entries_part` every visible entry attended one block at a time, the
                                       blocks merged by their lse (online softmax); blocks of
                                       ENTRIES_BLOCK entries (HCA, CSA's dense warm-up).
Each returns how many blocks its loop ran (the loop's own counter), which is what a step's
work in these parts follows.

Why dynamic loop bounds (`lax.fori_loop` with a traced trip count, i.e. a while loop) and not
length-bucketed compiled steps: one compiled prefill step and one compiled decode step serve
every position (a 1M-token prefill in 1024-token chunks crosses 1024 positions, and buckets by
powers of two would compile ~log2(max_len) steps per chunk length and still do up to 2x the
visible work); the work is exactly the visible blocks, rounded up to one block. The price is
one block of masked work at the edge and a while loop whose per-iteration overhead (tens of
microseconds on XLA:CPU) is why blocks are thousands of entries wide.

Blocks are read with `dynamic_slice` at start min(i * block, N - block) (an in-bounds slice, so
the last block may overlap the previous one; entries already seen are masked), so N need not be
a multiple of the block.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.ops import masks

# Entries per loop step (read when a step is traced): at most INDEXER_KEY_BLOCK / ENTRIES_BLOCK,
# fewer for long chunks, so that one step's [T, heads, block] products stay near BLOCK_ELEMENTS
# (8 MB in fp32: cache-resident; on the 2-core CPU a 1024-token chunk scored its indexer keys
# at 4 ns per query-key pair in blocks of 512 against 18 ns in blocks of 4096), and never below
# MIN_BLOCK (the while loop's per-iteration overhead, tens of microseconds on XLA:CPU). A decode
# step's indexer blocks are INDEXER_KEY_BLOCK wide: with the multiply-add scorer, blocks of
# 16384 or 65536 keys were no faster at 1M tokens and cost more at an early position
# (`benchmarks/visible_blocks/cpu_1_{before,after}.json`).
INDEXER_KEY_BLOCK = 4096
ENTRIES_BLOCK = 1024
BLOCK_ELEMENTS = 1 << 21
MIN_BLOCK = 128


def block_size(largest: int, rows: int, num_entries: int) -> int:
    """Entries per step for `rows` query-head rows (T * heads) over `num_entries` slots: the
    largest of `largest` that keeps rows * block <= BLOCK_ELEMENTS (>= MIN_BLOCK), <= N."""
    fit = max(MIN_BLOCK, BLOCK_ELEMENTS // max(rows, 1))
    return max(1, min(largest, fit, num_entries))


def visible_blocks(q_pos: jax.Array, num_entries: int, ratio: int, block: int) -> jax.Array:
    """How many blocks of `block` entries (of `num_entries` slots) hold an entry some query at
    q_pos [B, T] can see: ceil(min(N, max visible count) / block), an int32 scalar."""
    count = jnp.minimum(jnp.max(masks.visible_entry_count(q_pos, ratio)), num_entries)
    return ((count + block - 1) // block).astype(jnp.int32)


def fold_visible_blocks(entries: jax.Array, q_pos: jax.Array, ratio: int, block: int, step,
                        init):
    """For each block of `block` rows of entries [B, N, ...] up to
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


def blocked_topk(score_block, entries: jax.Array, q_pos: jax.Array, *, ratio: int, k: int,
                 block: int):
    """Top-k over the entries visible at q_pos [B, T] with a running list, one block of
    entries [B, N, ...] at a time: score_block(rows [B, block, ...], visible [B, T, block],
    start (the block's first entry index, int32 scalar: a scorer may read the entries itself))
    -> [B, T, block] fp32 scores, -inf where not visible.
    -> (picks [B, T, min(k, N)] int32 best first, -1 where fewer are visible; blocks run).
    The picks and their order equal `lax.top_k` over the whole row: the running list stays
    sorted (value, then lower index) and every block's indices exceed the earlier ones', so
    ties break by the lower index as over the whole row."""
    b, t = q_pos.shape
    k_eff = min(k, entries.shape[1])
    if k_eff == 0:
        return jnp.zeros((b, t, 0), jnp.int32), jnp.zeros((), jnp.int32)

    def step(carry, rows, row_idx, vis):
        vals, idx = carry
        scores = score_block(rows, vis, row_idx[0])
        both = jnp.concatenate([vals, scores], axis=-1)
        both_idx = jnp.concatenate([idx, jnp.broadcast_to(row_idx, scores.shape)], axis=-1)
        vals, at = jax.lax.top_k(both, k_eff)
        return vals, jnp.take_along_axis(both_idx, at, axis=-1)

    init = (jnp.full((b, t, k_eff), -jnp.inf, jnp.float32), jnp.full((b, t, k_eff), -1, jnp.int32))
    (vals, idx), ran = fold_visible_blocks(entries, q_pos, ratio, block, step, init)
    return jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32), ran
