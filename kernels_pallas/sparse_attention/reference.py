"""Reference semantics of the CSA core (window + listed compressed entries + sink), pure jnp.

`reference` is the model's dense masked formulation (`sparse_lm.ops.attention`, obviously
correct, O(S^2 + S*N)); `xla` is the model's gathered formulation (window as a band, top-k rows
gathered per query; nothing S x S). Both return (out [B,S,H,D] in q's dtype, lse [B,S,H] fp32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.ops.attention import sparse_attention


def _model_attention(q, kv, compressed, topk_idx, sink, *, window, scale, segment_ids,
                     implementation):
    b, n = compressed.shape[:2]
    return sparse_attention(
        q, kv, sink, window=window, scale=scale, segment_ids=segment_ids, compressed=compressed,
        # The list is trusted (no visibility check), so validity/ratio do not enter the result.
        compressed_valid=jnp.ones((b, n), bool), ratio=1, topk_idx=topk_idx,
        implementation=implementation, return_lse=True)


def csa_reference(q: jax.Array, kv: jax.Array, compressed: jax.Array, topk_idx: jax.Array,
                  sink: jax.Array, *, window: int, scale: float,
                  segment_ids: jax.Array | None = None):
    """Dense masked reference: q [B,S,H,D], kv [B,S,D], compressed [B,N,D], topk_idx [B,S,K]
    int32 (-1 = none; a duplicate listing counts twice), sink [H] -> (out [B,S,H,D], lse [B,S,H])."""
    return _model_attention(q, kv, compressed, topk_idx, sink, window=window, scale=scale,
                            segment_ids=segment_ids, implementation="reference")


def csa_xla(q, kv, compressed, topk_idx, sink, *, window: int, scale: float,
            segment_ids=None):
    """Same result as `csa_reference`, gathered per query (the XLA path; differentiable by JAX)."""
    return _model_attention(q, kv, compressed, topk_idx, sink, window=window, scale=scale,
                            segment_ids=segment_ids, implementation="xla")
