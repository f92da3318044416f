"""Pure-jnp reference of block-sparse (HCA / SWA) attention: the one attention math's dense
masked form (`sparse_lm.ops.attention.attention_reference`), obviously correct.

Same contract as `api.block_sparse_attention`; O(S * (S + N)) memory, for tests and small shapes.
Visibility is `sparse_lm.ops.masks`: query t sees raw key j iff t - W < j <= t, and compressed
entry e iff e < (t + 1) // ratio and the entry is valid; both only inside t's segment. A
per-head sink logit joins the softmax denominator; V = K.
"""
from __future__ import annotations

from sparse_lm.ops.attention import attention_reference


def attention(q, kv, sink, *, window: int, scale: float, compressed=None, compressed_valid=None,
              ratio: int = 0, segment_ids=None):
    """q [B, S, H, D], kv [B, S, D], sink [H], compressed [B, N, D] | None, compressed_valid
    [B, N] bool | None (None = all valid), segment_ids [B, S] | None
    -> (out [B, S, H, D] in q's dtype, lse [B, S, H] fp32)."""
    return attention_reference(q, kv, sink, window=window, scale=scale, segment_ids=segment_ids,
                               compressed=compressed, compressed_valid=compressed_valid,
                               ratio=ratio)
