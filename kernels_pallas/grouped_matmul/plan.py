"""Work lists of the grouped-matmul kernels: which (group, row tile) pairs a kernel visits.

Rows are sorted by group: group g owns rows [start_g, end_g) with end_g = sum(sizes[:g+1]).
A row tile of `tm` rows can hold the end of one group and the start of the next, so it is
visited once per group it touches; every visit writes only the rows of its own group. Built in
plain jnp from the (traced) group sizes; the list has a static length (an upper bound) and the
entries past the real count repeat the last real one, so the kernels skip them without any new
block being fetched.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class WorkList:
    group: jax.Array    # [I] int32: group of visit i (may be G = the "rows past the groups" tail)
    tile: jax.Array     # [I] int32: row tile of visit i
    start: jax.Array    # [G'] int32: first row of each group (G' = G, or G + 1 with the tail)
    end: jax.Array      # [G'] int32: one past the last row
    count: jax.Array    # [1] int32: number of real visits (<= I)

    @property
    def length(self) -> int:
        return int(self.group.shape[0])

    def scalars(self):
        return self.group, self.tile, self.start, self.end, self.count


def work_list(group_sizes: jax.Array, m_padded: int, tm: int, *, visit_empty: bool,
              tail: bool) -> WorkList:
    """group_sizes [G] int32 over rows [0, m_padded) (m_padded a multiple of tm).

    visit_empty: every empty group gets one visit (the transposed product must write zeros for
                 it); otherwise empty groups are not visited.
    tail:        add a group G for the rows past sum(group_sizes) (the forward product writes
                 zeros there, like `lax.ragged_dot`).
    """
    tiles = m_padded // tm
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m_padded).astype(jnp.int32)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    if tail:
        starts = jnp.concatenate([starts, ends[-1:]])
        ends = jnp.concatenate([ends, jnp.full((1,), m_padded, jnp.int32)])
    g_all = starts.shape[0]
    nonempty = ends > starts
    first = jnp.minimum(starts // tm, tiles - 1)
    last = jnp.maximum(ends - 1, 0) // tm
    empty_visits = 1 if visit_empty else 0
    ntiles = jnp.where(nonempty, last - first + 1, empty_visits)
    if tail and visit_empty:   # the tail never needs a visit when empty
        ntiles = ntiles.at[-1].set(jnp.where(nonempty[-1], ntiles[-1], 0))
    item_end = jnp.cumsum(ntiles).astype(jnp.int32)
    count = item_end[-1]
    # Non-empty groups cover disjoint row ranges: at most tiles + (#groups - 1) visits, plus one
    # per empty group when they are visited.
    length = tiles + g_all + (g_all if visit_empty else 0)
    i = jnp.minimum(jnp.arange(length, dtype=jnp.int32), jnp.maximum(count - 1, 0))
    group = jnp.minimum(jnp.searchsorted(item_end, i, side="right"), g_all - 1).astype(jnp.int32)
    tile = first[group] + i - (item_end[group] - ntiles[group])
    tile = jnp.clip(tile, 0, tiles - 1).astype(jnp.int32)
    return WorkList(group, tile, starts, ends, jnp.reshape(count, (1,)).astype(jnp.int32))
