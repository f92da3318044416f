"""Reference semantics of the CSA core (window + listed compressed entries + sink), pure jnp:
the one attention math of `sparse_lm.ops.attention` with the entries given as a list.

`csa_reference` is `attention_reference` (dense masked, obviously correct, O(S^2 + S*N));
`csa_xla` is `attention_xla` (window as a band, top-k rows gathered per query; nothing S x S).
Both return (out [B,S,H,D] in q's dtype, lse [B,S,H] fp32).
"""
from __future__ import annotations

import jax

from sparse_lm.ops.attention import attention_reference, attention_xla


def _listed(fn, q, kv, compressed, topk_idx, sink, *, window, scale, segment_ids):
    # The list is trusted (no visibility check), so validity/ratio do not enter the result.
    return fn(q, kv, sink, window=window, scale=scale, segment_ids=segment_ids,
              compressed=compressed, compressed_valid=None, ratio=1, topk_idx=topk_idx)


def csa_reference(q: jax.Array, kv: jax.Array, compressed: jax.Array, topk_idx: jax.Array,
                  sink: jax.Array, *, window: int, scale: float,
                  segment_ids: jax.Array | None = None):
    """Dense masked reference: q [B,S,H,D], kv [B,S,D], compressed [B,N,D], topk_idx [B,S,K]
    int32 (-1 = none; a duplicate listing counts twice), sink [H] -> (out [B,S,H,D], lse [B,S,H])."""
    return _listed(attention_reference, q, kv, compressed, topk_idx, sink, window=window,
                   scale=scale, segment_ids=segment_ids)


def csa_xla(q, kv, compressed, topk_idx, sink, *, window: int, scale: float,
            segment_ids=None):
    """Same result as `csa_reference`, gathered per query (the XLA path; differentiable by JAX)."""
    return _listed(attention_xla, q, kv, compressed, topk_idx, sink, window=window, scale=scale,
                   segment_ids=segment_ids)
