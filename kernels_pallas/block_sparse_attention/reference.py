"""Pure-jnp reference of block-sparse (HCA / SWA) attention: dense masks, obviously correct.

Same contract as `api.block_sparse_attention`; O(S * (S + N)) memory, for tests and small shapes.
Visibility (spec §4.4-4.5, `sparse_lm.ops.compress.entry_visibility`): query t sees raw key j iff
t - W < j <= t, and compressed entry e iff e < (t + 1) // ratio and the entry is valid; both only
inside t's segment. A per-head sink logit joins the softmax denominator; V = K.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q, kv, sink, *, window: int, scale: float, compressed=None, compressed_valid=None,
              ratio: int = 0, segment_ids=None):
    """q [B, S, H, D], kv [B, S, D], sink [H], compressed [B, N, D] | None, compressed_valid
    [B, N] bool | None (None = all valid), segment_ids [B, S] | None
    -> (out [B, S, H, D] in q's dtype, lse [B, S, H] fp32)."""
    b, s, h, d = q.shape
    t = jnp.arange(s)
    vis_w = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window)      # [S, S]
    vis_w = jnp.broadcast_to(vis_w, (b, s, s))
    if segment_ids is not None:
        vis_w = vis_w & (segment_ids[:, :, None] == segment_ids[:, None, :])
    keys = [kv.astype(jnp.float32)]
    masks = [vis_w]
    if compressed is not None and compressed.shape[1] > 0:
        n = compressed.shape[1]
        e = jnp.arange(n)
        vis_c = jnp.broadcast_to(e[None, :] < (t[:, None] + 1) // ratio, (b, s, n))
        if compressed_valid is not None:
            vis_c = vis_c & compressed_valid[:, None, :]
        if segment_ids is not None:
            first = jnp.minimum(e * ratio, s - 1)          # entries past S are never visible
            vis_c = vis_c & (segment_ids[:, :, None] == segment_ids[:, first][:, None, :])
        keys.append(compressed.astype(jnp.float32))
        masks.append(vis_c)
    k = jnp.concatenate(keys, axis=1)                      # [B, S + N, D]
    vis = jnp.concatenate(masks, axis=2)                   # [B, S, S + N]
    logits = jnp.einsum("bshd,bkd->bshk", q.astype(jnp.float32), k) * scale
    logits = jnp.where(vis[:, :, None, :], logits, -jnp.inf)
    sink_l = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], (b, s, h, 1))
    full = jnp.concatenate([logits, sink_l], axis=-1)
    lse = jax.nn.logsumexp(full, axis=-1)
    p = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bshk,bkd->bshd", p, k)
    return out.astype(q.dtype), lse
