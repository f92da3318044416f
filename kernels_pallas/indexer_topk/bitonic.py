"""Bitonic networks over (score, index) pairs, the exact top-k merge of the fused indexer.

Order: a pair is *better* than another if its score is larger, or equal with a lower index
(exactly `lax.top_k`'s order, ties to the lower index). Every pair in a row is distinct (entry
indices are unique; empty slots carry distinct sentinel indices), so the order is total and a
compare-exchange never loses or duplicates an element.

The running state of a row block is its best L pairs sorted best-first ([R, L], L a power of
two >= k). A new tile of scores is sorted worst-first, paired element-wise with the state
(keeping the better of each pair gives a bitonic sequence holding the best L of the union) and
bitonic-merged back to best-first: log2(T)(log2(T)+1)/2 + log2(L) + 1 compare-exchange stages
for a tile of T <= L pairs. Data-oblivious: no scatter, no data-dependent control flow.

Two ways to reach the partner of lane i at stride s (i XOR s), one per backend:
  * "roll" (Mosaic TPU): two lane rotations of the whole row, selected by bit s of the lane;
  * "split" (Triton): reshape the row to [.., L/2s, 2, s], move the pair axis last and split
    it (tt.split / tt.join); Triton has no lane rotation, Mosaic cannot reshape lanes below 128.
Both are plain jnp and run in interpret mode.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

NEG_INF = float("-inf")
SENTINEL_BASE = 2 ** 30          # empty slot l holds (-inf, SENTINEL_BASE + l): worse than any
                                 # real entry (indices < 2^30), distinct, best-first by slot


def better(va, ia, vb, ib):
    """a strictly better than b: larger score, or equal score and lower index."""
    return (va > vb) | ((va == vb) & (ia < ib))


def empty_state(rows: int, width: int):
    """[rows, width] best-first state with no entry: (-inf, sentinel indices)."""
    lane = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    return jnp.full((rows, width), NEG_INF, jnp.float32), SENTINEL_BASE + lane


# --------------------------------------------------------------------------- "roll" exchange

def _roll(x, shift: int):
    return pltpu.roll(x, shift, 1)        # same direction as jnp.roll (checked in the tests)


def _roll_host(x, shift: int):
    return jnp.roll(x, shift, 1)


def _stage_roll(v, ix, s: int, size: int | None, descending: bool, roll=_roll):
    """One compare-exchange stage at stride s on [R, L] rows. size=None: a merge stage (one
    direction for the whole row); otherwise the stage of the size-`size` sorting level."""
    rows, width = v.shape
    lane = lax.broadcasted_iota(jnp.int32, (rows, width), 1)
    upper = (lane & s) != 0
    pv = jnp.where(upper, roll(v, s), roll(v, width - s))
    pi = jnp.where(upper, roll(ix, s), roll(ix, width - s))
    if size is None:
        block_desc = descending
    else:
        block_desc = ((lane & size) == 0) if descending else ((lane & size) != 0)
    want_better = (~upper) == block_desc
    keep = better(v, ix, pv, pi) == want_better
    return jnp.where(keep, v, pv), jnp.where(keep, ix, pi)


# -------------------------------------------------------------------------- "split" exchange

def _pairs(x, s: int):
    """[R, L] -> (lower, upper) halves of every stride-s pair, each [R, L/2s, s]."""
    rows, width = x.shape
    x4 = jnp.transpose(x.reshape(rows, width // (2 * s), 2, s), (0, 1, 3, 2))
    lo, hi = lax.split(x4, (1, 1), axis=3)
    return lo.reshape(rows, width // (2 * s), s), hi.reshape(rows, width // (2 * s), s)


def _unpairs(lo, hi):
    rows, nb, s = lo.shape
    x4 = jnp.stack([lo, hi], axis=-1)                         # [R, nb, s, 2]
    return jnp.transpose(x4, (0, 1, 3, 2)).reshape(rows, nb * 2 * s)


def _stage_split(v, ix, s: int, size: int | None, descending: bool):
    rows, width = v.shape
    (av, bv), (ai, bi) = _pairs(v, s), _pairs(ix, s)
    if size is None:
        block_desc = descending
    else:
        blk = lax.broadcasted_iota(jnp.int32, av.shape, 1) * (2 * s)   # lower lane's block base
        block_desc = ((blk & size) == 0) if descending else ((blk & size) != 0)
    a_better = better(av, ai, bv, bi)
    swap = a_better != block_desc           # the lower slot must hold the better iff block_desc
    lo_v, hi_v = jnp.where(swap, bv, av), jnp.where(swap, av, bv)
    lo_i, hi_i = jnp.where(swap, bi, ai), jnp.where(swap, ai, bi)
    return _unpairs(lo_v, hi_v), _unpairs(lo_i, hi_i)


def _stage_roll_host(v, ix, s, size, descending):
    return _stage_roll(v, ix, s, size, descending, roll=_roll_host)


# "roll_host": the roll network with jnp.roll, for use outside a kernel (tests).
_STAGES = {"roll": _stage_roll, "roll_host": _stage_roll_host, "split": _stage_split}


def sort(v, ix, *, descending: bool, exchange: str):
    """Full bitonic sort of each row of [R, T] (T a power of two)."""
    stage = _STAGES[exchange]
    width = v.shape[1]
    size = 2
    while size <= width:
        s = size // 2
        while s >= 1:
            v, ix = stage(v, ix, s, size, descending)
            s //= 2
        size *= 2
    return v, ix


def merge_tile(state_v, state_i, tile_v, tile_i, *, exchange: str):
    """Best-first state [R, L] + an unsorted tile [R, T] (T <= L, both powers of two) -> the best
    L pairs of the union, best-first."""
    stage = _STAGES[exchange]
    rows, width = state_v.shape
    tv, ti = sort(tile_v, tile_i, descending=False, exchange=exchange)      # worst first
    t = tv.shape[1]
    if t == width:
        pick = better(state_v, state_i, tv, ti)
        cv, ci = jnp.where(pick, state_v, tv), jnp.where(pick, state_i, ti)
    else:   # the tile sits in the last T slots of a worst-first row padded with (-inf, +inf idx)
        sv3 = state_v.reshape(rows, width // t, t)
        si3 = state_i.reshape(rows, width // t, t)
        last = lax.broadcasted_iota(jnp.int32, sv3.shape, 1) == (width // t - 1)
        pick = ~last | better(sv3, si3, tv[:, None, :], ti[:, None, :])
        cv = jnp.where(pick, sv3, tv[:, None, :]).reshape(rows, width)
        ci = jnp.where(pick, si3, ti[:, None, :]).reshape(rows, width)
    s = width // 2
    while s >= 1:
        cv, ci = stage(cv, ci, s, None, True)
        s //= 2
    return cv, ci


def kth_value(state_v, k: int):
    """[R, 1] the k-th best score of a best-first state (-inf while fewer than k entries)."""
    lane = lax.broadcasted_iota(jnp.int32, state_v.shape, 1)
    return jnp.min(jnp.where(lane < k, state_v, float("inf")), axis=1, keepdims=True)
