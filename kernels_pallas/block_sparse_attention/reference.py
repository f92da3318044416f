"""Pure-jnp reference of block-sparse (HCA / SWA) attention: the one attention math's dense
masked form (`sparse_lm.ops.attention.attention_reference`), obviously correct.

Same contract as `api.block_sparse_attention`; O(S * (S + N)) memory, for tests and small shapes.
Visibility is `sparse_lm.ops.masks`: query t sees raw key j iff t - W < j <= t, and compressed
entry e iff e < (t + 1) // ratio and the entry is valid; both only inside t's segment. A
per-head sink logit joins the softmax denominator; V = K.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.ops import masks
from sparse_lm.ops.attention import attention_reference


def attention(q, kv, sink, *, window: int, scale: float, compressed=None, compressed_valid=None,
              ratio: int = 0, segment_ids=None):
    """q [B, S, H, D], kv [B, S, D], sink [H], compressed [B, N, D] | None, compressed_valid
    [B, N] bool | None (None = all valid), segment_ids [B, S] | None
    -> (out [B, S, H, D] in q's dtype, lse [B, S, H] fp32)."""
    return attention_reference(q, kv, sink, window=window, scale=scale, segment_ids=segment_ids,
                               compressed=compressed, compressed_valid=compressed_valid,
                               ratio=ratio)


def attention_at_offset(q, kv, sink, *, window: int, scale: float, compressed, compressed_valid,
                        ratio: int, segment_ids, query_offset, compressed_segments):
    """The same with q's rows at global position `query_offset` + t for the entries (entry e
    visible iff e < (offset + t + 1) // ratio, valid, same document by compressed_segments
    [B, N]); the window part in local positions. Dense [B, S, H, S + N] logits."""
    b, s, h, d = q.shape
    n = compressed.shape[1]
    t = jnp.arange(s)
    seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    ent_seg = (jnp.zeros((b, n), jnp.int32) if compressed_segments is None
               else compressed_segments.astype(jnp.int32))
    win = masks.window_visible(jnp.broadcast_to(t, (b, s)), jnp.broadcast_to(t, (b, s)), window,
                               seg, seg)
    ent = masks.entry_visible(jnp.asarray(query_offset, jnp.int32) + t, n, ratio,
                              compressed_valid, seg, ent_seg)
    vis = jnp.concatenate([win, ent], axis=-1)      # [B, S, S+N]
    keys = jnp.concatenate([kv, compressed.astype(kv.dtype)], axis=1).astype(jnp.float32)
    logits = jnp.einsum("bshd,bkd->bshk", q.astype(jnp.float32), keys) * scale
    logits = jnp.where(vis[:, :, None, :], logits, -jnp.inf)
    sink_l = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], (b, s, h, 1))
    lse = jax.nn.logsumexp(jnp.concatenate([logits, sink_l], axis=-1), axis=-1)
    p = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bshk,bkd->bshd", p, keys)
    return out.astype(q.dtype), lse
