"""Host-side (XLA, O(S + N)) preparation shared by the indexer kernels: per-entry and per-query
segment ids with sentinels, and the range of key tiles each query block must visit."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparse_lm.ops import masks

KEY_NONE = int(np.iinfo(np.int32).min)          # segment of an invalid / padding entry
QUERY_PAD = int(np.iinfo(np.int32).min) + 1     # segment of a padding query (matches nothing)


@dataclasses.dataclass(frozen=True)
class Layout:
    b: int
    s: int
    h: int
    d: int
    n: int
    k: int
    ratio: int
    bq: int          # queries per program
    bk: int          # keys per step
    width: int       # L, merge width (>= k)
    scores_only: bool = False   # benchmark probe: a running max instead of the top-k merge

    @property
    def sp(self) -> int:
        return -(-self.s // self.bq) * self.bq

    @property
    def nq(self) -> int:
        return self.sp // self.bq

    @property
    def np_(self) -> int:
        return -(-self.n // self.bk) * self.bk

    @property
    def nk(self) -> int:
        return self.np_ // self.bk


def query_offsets(query_offset) -> jax.Array:
    """The position of query row 0 as the kernels' [1] int32 operand (TPU: scalar prefetch)."""
    return jnp.asarray(query_offset, jnp.int32).reshape(1)


def prepare(lay: Layout, key_valid, segment_ids, key_segments=None, query_offset=0):
    """-> kseg [B, Np] int32, qseg [B, Sp] int32, tile_lo [B * nq], tile_hi [B * nq] int32.

    query_offset (int or traced int32 scalar): the position of query row 0 (context
    parallelism: a shard's first row), so row t sits at position offset + t. key_segments
    [B, N] (or None = from segment_ids, which then cover the whole sequence): the entries'
    documents, for a shard whose segment_ids cover only its own rows.

    kseg: an entry's segment (0 without segment ids), KEY_NONE if invalid or padding.
    qseg: a query's segment, QUERY_PAD for padding rows.
    Query block j visits key tiles [tile_lo, tile_hi): hi from the causal rule (entries <
    (t+1)//ratio of its last query: `masks.visible_entry_count`), lo from the first entry of any
    of its queries' segments (entry documents: `masks.entry_segments`). Tested against
    `sparse_lm.ops.masks.entry_visible` in tests/kernels/test_plan_masks.py.
    """
    b, n, s, m = lay.b, lay.n, lay.s, lay.ratio
    valid = jnp.ones((b, n), bool) if key_valid is None else key_valid.astype(bool)
    if segment_ids is None:
        seg_e = jnp.zeros((b, n), jnp.int32)
        seg_q = jnp.zeros((b, s), jnp.int32)
    else:
        seg_q = segment_ids.astype(jnp.int32)
        seg_e = (masks.entry_segments(seg_q, n, m) if key_segments is None
                 else key_segments.astype(jnp.int32))
    kseg = jnp.where(valid, seg_e, KEY_NONE)
    kseg = jnp.pad(kseg, ((0, 0), (0, lay.np_ - n)), constant_values=KEY_NONE)
    qseg = jnp.pad(seg_q, ((0, 0), (0, lay.sp - s)), constant_values=QUERY_PAD)

    t = jnp.arange(lay.sp)
    hi = jnp.where(t < s, jnp.minimum(masks.visible_entry_count(
        query_offsets(query_offset)[0] + t, m), n), 0)                              # [Sp]
    if segment_ids is None:
        lo = jnp.zeros((b, lay.sp), jnp.int32)
    else:
        # First entry whose segment equals the query's (exact for any id pattern): a stable
        # sort of the entries by segment, then a binary search per query.
        def first_entry(ks, qs):
            order = jnp.argsort(ks, stable=True)
            sk = ks[order]
            pos = jnp.clip(jnp.searchsorted(sk, qs, side="left"), 0, lay.np_ - 1)
            return jnp.where(sk[pos] == qs, order[pos], lay.np_).astype(jnp.int32)
        lo = jax.vmap(first_entry)(kseg, qseg)                                # [B, Sp]
    hi_b = jnp.broadcast_to(hi, (b, lay.sp)).reshape(b, lay.nq, lay.bq)
    lo_b = jnp.where(jnp.broadcast_to(hi, (b, lay.sp)) > lo, lo, lay.np_).reshape(b, lay.nq, lay.bq)
    tile_hi = -(-jnp.max(hi_b, axis=2) // lay.bk)
    tile_lo = jnp.minimum(jnp.min(lo_b, axis=2) // lay.bk, tile_hi)
    return (kseg.astype(jnp.int32), qseg.astype(jnp.int32),
            tile_lo.reshape(-1).astype(jnp.int32), tile_hi.reshape(-1).astype(jnp.int32))


def finish(lay: Layout, idx, vals):
    """Kernel outputs [B, Sp, L] (best-first; vals None unless asked) -> [B, S, k] (a slice, no
    copy when S and k are already multiples of the blocks)."""
    crop = lambda x: x if x.shape[1:] == (lay.s, lay.k) else x[:, :lay.s, :lay.k]  # noqa: E731
    return crop(idx) if vals is None else (crop(idx), crop(vals))
