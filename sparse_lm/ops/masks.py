"""Who sees what: the one definition of visibility (spec §4.4, §14.1, §14.23). Positions in,
boolean masks out.

Every path uses these functions: the full forward (positions = row indices of the packed row,
documents told apart by segment ids), chunked prefill and decode (positions = absolute token
positions, empty cache slots at negative positions), the kernels' references, and the kernels'
host-side plans, which are tested against them on random shapes.

  window key j is visible to query t   iff  0 <= j <= t,  t - j < W,  same document
  compressed entry e is visible to t   iff  e < (t + 1) // m,  e is valid,  same document

(a window of m tokens is visible at its own last token: the released code's rule, spec §14.1).
An entry's document is the one of its window's first token.

The functions take NumPy or JAX arrays and answer in the same kind: host-side plans call them
on NumPy arrays with static shapes, traced code on jax arrays. Leading batch axes broadcast.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
    """numpy when every array is numpy (or a Python scalar), else jax.numpy."""
    host = all(a is None or isinstance(a, (np.ndarray, np.generic, int)) for a in arrays)
    return np if host else jnp


def window_visible(q_pos, k_pos, window: int, q_seg=None, k_seg=None):
    """q_pos [..., T], k_pos [..., K] int (k_pos < 0 = an empty slot); q_seg [..., T], k_seg
    [..., K] or None -> [..., T, K] bool: 0 <= k_pos <= q_pos, q_pos - k_pos < window, and the
    same segment when segments are given."""
    if isinstance(window, (int, np.integer)) and window < 1:
        raise ValueError(f"window={window} is invalid: must be >= 1")
    dist = q_pos[..., :, None] - k_pos[..., None, :]
    vis = (k_pos[..., None, :] >= 0) & (dist >= 0) & (dist < window)
    if q_seg is not None:
        vis = vis & (q_seg[..., :, None] == k_seg[..., None, :])
    return vis


def visible_entry_count(q_pos, ratio: int):
    """[...] query positions -> [...] how many entries are visible: (t + 1) // m (entries
    0 .. count-1 are causally visible, before validity and documents)."""
    return (q_pos + 1) // ratio


def first_query_of_entry(entry, ratio: int):
    """Entry index (array or int) -> the first query position that sees it: (e + 1) * m - 1,
    the last token of its window (the inverse of `visible_entry_count`)."""
    return (entry + 1) * ratio - 1


def entry_visible(q_pos, num_entries: int, ratio: int, valid=None, q_seg=None, entry_seg=None):
    """q_pos [..., T] -> [..., T, N] bool: entry e is visible iff e < (t + 1) // m, valid[..., e]
    (valid [..., N] or None = all valid) and, with segments (q_seg [..., T], entry_seg
    [..., N]), the entry's document is the query's."""
    xp = _xp(q_pos, valid, q_seg, entry_seg)
    e = xp.arange(num_entries)
    vis = e < visible_entry_count(q_pos, ratio)[..., None]
    if valid is not None:
        vis = vis & valid[..., None, :]
    if q_seg is not None:
        vis = vis & (q_seg[..., :, None] == entry_seg[..., None, :])
    return vis


def entry_segments(segment_ids, num_entries: int, ratio: int):
    """[B, S] segment ids -> [B, N] the document of each entry (its window's first token).
    Entries whose window starts past S (never visible there) take the last token's document."""
    xp = _xp(segment_ids)
    first = xp.minimum(xp.arange(num_entries) * ratio, segment_ids.shape[-1] - 1)
    return segment_ids[..., first]


def window_validity(segment_ids, batch: int, seq: int, ratio: int):
    """[B, S] segment ids (or None) -> [B, S // m] bool: window i (tokens [m*i, m*i + m)) lies
    inside one document, so it compresses into a real entry."""
    n = seq // ratio
    if segment_ids is None:
        return jnp.ones((batch, n), bool)
    xp = _xp(segment_ids)
    seg = segment_ids[:, : n * ratio].reshape(batch, n, ratio)
    return xp.all(seg == seg[:, :, :1], axis=-1)


def row_positions(batch: int, seq: int, xp=jnp):
    """[B, S] row indices 0..S-1: the positions visibility is decided on in a full forward (the
    RoPE positions restart per document; the masks do not need them to)."""
    return xp.broadcast_to(xp.arange(seq), (batch, seq))


def sequence_entry_visible(seq: int, ratio: int, valid, segment_ids=None):
    """The full forward's entry mask: [B, S, N] bool for a packed row of S tokens (query rows
    0..S-1, valid [B, N] from `window_validity`, documents from `segment_ids`)."""
    b, n = valid.shape
    q_pos = row_positions(1, seq, _xp(valid))[0]
    seg_e = None if segment_ids is None else entry_segments(segment_ids, n, ratio)
    return entry_visible(q_pos, n, ratio, valid, segment_ids, seg_e)


def sequence_window_visible(seq: int, window: int, segment_ids=None):
    """The full forward's window mask: [S, S] (or [B, S, S] with segments) bool."""
    t = np.arange(seq) if segment_ids is None else jnp.arange(seq)
    return window_visible(t, t, window, segment_ids, segment_ids)
