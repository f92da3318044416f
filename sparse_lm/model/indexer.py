"""Lightning indexer module (CSA layers): picks the top-k compressed entries per query.

The indexer learns only through its KL objective, never from the language-model loss: its
inputs are detached and top-k has no gradient anyway. One selection rule for every path: the
full forward scores a packed row against its own compressed keys, the cached path scores a
chunk against the cached keys; both use `ops.indexer.indexer_scores` over `ops.masks`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.compressor import Compressor
from sparse_lm.model.layers import param
from sparse_lm.ops import masks
from sparse_lm.ops.implementations import INDEXER_TOPK, indexer_topk
from sparse_lm.ops.indexer import (blocked_indexer_topk, indexer_head_scores, indexer_scores,
                                   indexer_scores_selected)
from sparse_lm.ops.rope import apply_rope
from sparse_lm.sharding import kernels


def limit_picks(topk: jax.Array, limit) -> jax.Array:
    """Keep the first `limit` (a traced int or None) of each query's picks, best first; the rest
    become -1. One compiled forward then serves every k <= the k it selected."""
    if limit is None:
        return topk
    return jnp.where(jnp.arange(topk.shape[-1]) < limit, topk, -1)


STAGES = ("dense", "sparse", "select")


class ScoringInputs(NamedTuple):
    """What the dense stage's KL scores in query chunks: q [B, S, Hi, Di] (RoPE'd), weights
    [B, S, Hi] (scaled), keys [B, N, Di] (the indexer's parameters learn through them)."""
    q: jax.Array
    weights: jax.Array
    keys: jax.Array


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        nh, hd = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = param(rngs, (cfg.q_lora_rank, nh * hd), ("q_lora", "index_heads"), cfg.init_std)
        self.weights_proj = param(rngs, (cfg.hidden_size, nh), ("embed", "index_heads"), cfg.init_std)
        self.compressor = Compressor(cfg.hidden_size, hd, cfg.compress_ratio_csa, True,
                                     eps=cfg.rms_norm_eps, init_std=cfg.init_std, rngs=rngs)
        self.n_heads, self.head_dim, self.topk = nh, hd, cfg.index_topk
        self.ratio = cfg.compress_ratio_csa

    def project_queries(self, x, q_latent, positions, inv_freq):
        """x [B, S, d], q_latent [B, S, q_lora] -> q [B, S, Hi, Di] (RoPE'd), head weights
        [B, S, Hi] (scaled by 1/sqrt(Di * Hi)). Inputs are detached (see the module doc)."""
        sg = jax.lax.stop_gradient
        x, q_latent = sg(x), sg(q_latent)
        b, s, _ = x.shape
        q = (q_latent @ self.wq_b[...].astype(x.dtype)).reshape(b, s, self.n_heads, self.head_dim)
        q = apply_rope(q, positions, inv_freq)
        w = (x @ self.weights_proj[...].astype(x.dtype)) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    def keys(self, x, positions, inv_freq, segment_ids=None):
        """The compressed indexer keys of a packed row: [B, N, Di], valid [B, N]."""
        return self.compressor(jax.lax.stop_gradient(x), positions, inv_freq, segment_ids)

    def __call__(self, x, q_latent, positions, inv_freq, segment_ids=None, *, stage: str = "dense",
                 k: int | None = None, limit=None, implementation: str | None = None,
                 record: bool = False):
        """The selection of a packed row x [B, S, d] -> (scoring, topk [B, S, min(k, N)] int32
        (-1 where fewer are visible), recorded).

        Every stage selects with the fused score + top-k op (`implementations.indexer_topk`,
        no gradient): the [B, S, N] score matrix is never formed on the training path.
        scoring, by stage: "dense" (the warm-up) -> `ScoringInputs` (q, weights, keys),
        from which the caller computes the KL over every visible entry in query chunks
        (`ops.indexer.indexer_objective_chunked`); "sparse" -> the scores at the selected
        entries only [B, S, K] (-inf at -1 picks), so the backward never touches the
        [B, S, Hi, N] products (V3.2, spec §6); "select" -> None.
        k: overrides index_topk; limit: `limit_picks`; record: also return the full scores
        [B, S, N], the picks and the per-head scores for analysis (only this path builds them).
        """
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r}: expected one of {STAGES}")
        k = self.topk if k is None else k
        q, w = self.project_queries(x, q_latent, positions, inv_freq)
        keys, valid = self.keys(x, positions, inv_freq, segment_ids)
        sg = jax.lax.stop_gradient
        topk = limit_picks(self._select(sg(q), sg(w), sg(keys), valid, k, segment_ids,
                                        implementation), limit)
        recorded = {}
        if record:
            visible = masks.sequence_entry_visible(x.shape[1], self.ratio, valid, segment_ids)
            recorded = {"scores": indexer_scores(q, w, keys, visible), "topk": topk,
                        "head_scores": indexer_head_scores(q, w, keys, visible)}
        if stage == "sparse":
            return indexer_scores_selected(q, w, keys, topk), topk, recorded
        if stage == "dense":
            return ScoringInputs(q, w, keys), topk, recorded
        return None, topk, recorded

    def _select(self, q, w, keys, valid, k, segment_ids, implementation):
        """The fused score + top-k [B, S, min(k, N)]; under sharding rules a Pallas kernel runs
        inside `shard_map` split by batch (and, where the preset splits the queries along the
        sequence, by query rows at a traced position offset), never by the indexer heads: the
        score sums over every one of them."""
        b, s = q.shape[:2]
        n = keys.shape[1]
        k_eff = min(k, n)
        rows = ("activation_batch", "activation_length")

        def pick(q, w, keys, valid, segment_ids, key_segments=None, shard=None):
            return indexer_topk(q, w, keys, valid, k, ratio=self.ratio, segment_ids=segment_ids,
                                key_segments=key_segments, implementation=implementation,
                                query_offset=0 if shard is None else shard.offset())
        if n == 0 or not kernels.choose(INDEXER_TOPK, implementation):
            return pick(q, w, keys, valid, segment_ids)

        def pick_shard(shard, *local):
            return pick(*local, shard=shard)
        entries = ("activation_batch", "activation_kv_length")
        key_segments = (None if segment_ids is None
                        else masks.entry_segments(segment_ids, n, self.ratio))
        return kernels.kernel_call(
            pick, [("q", q, rows + (None, None)), ("weights", w, rows + (None,)),
                   ("keys", keys, entries + (None,)), ("valid", valid, entries),
                   ("segment_ids", segment_ids, rows), ("key_segments", key_segments, entries)],
            [((b, s, k_eff), jnp.int32, rows + (None,))],
            what=f"indexer top-k ({implementation or 'the target preference'})",
            sequence_fn=pick_shard)

    def cached(self, cache, x, q_latent, kv, positions, inv_freq, lengths, n_new, *, entries,
               select: bool, k: int | None = None):
        """The cached path for a chunk x [B, T, d] at positions [B, T]: store the chunk's
        compressed keys in the indexer cache (`CompressorCache`), then (select=True) score the
        chunk's queries against every cached key they can see, in key blocks up to the last
        visible one with a running top-k (`ops.indexer.blocked_indexer_topk`: no [B, T, N]
        scores) -> (new cache, topk [B, T, k] or None, entries, ratio): the selectors' protocol
        (`model.selectors._Selector.cached`); kv is not read."""
        cache = self.compressor.step(cache, jax.lax.stop_gradient(x), positions, lengths, n_new,
                                     inv_freq)
        if not select:
            return cache, None, entries, self.ratio
        q, w = self.project_queries(x, q_latent, positions, inv_freq)
        topk, _ = blocked_indexer_topk(q, w, cache.entries, positions, ratio=self.ratio,
                                       k=self.topk if k is None else k)
        return cache, topk, entries, self.ratio
