"""Lightning indexer module (CSA layers): picks the top-k compressed entries per query."""
from __future__ import annotations

import jax
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.compressor import Compressor
from sparse_lm.model.layers import param
from sparse_lm.ops.compress import entry_visibility
from sparse_lm.ops.indexer import (indexer_scores, indexer_scores_selected, select_topk,
                                   select_topk_fused)
from sparse_lm.ops.rope import apply_rope


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
        [B, S, Hi] (scaled by 1/sqrt(Di * Hi))."""
        b, s, _ = x.shape
        q = (q_latent @ self.wq_b[...].astype(x.dtype)).reshape(b, s, self.n_heads, self.head_dim)
        q = apply_rope(q, positions, inv_freq)
        w = (x @ self.weights_proj[...].astype(x.dtype)) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    def scores(self, x, q_latent, positions, inv_freq, segment_ids=None):
        """Indexer scores [B, S, N] fp32 (-inf where not visible)."""
        s = x.shape[1]
        q, w = self.project_queries(x, q_latent, positions, inv_freq)
        keys, valid = self.compressor(x, positions, inv_freq, segment_ids)
        visible = entry_visibility(s, self.ratio, valid, segment_ids)
        return indexer_scores(q, w, keys, visible)

    def select(self, x, q_latent, positions, inv_freq, segment_ids=None, *,
               implementation: str | None = None):
        """Top-k indices only [B, S, min(k, N)] (the second output of `__call__`) through the
        fused score + top-k kernels (`ops.indexer.select_topk_fused`): the [B, S, N] scores are
        never formed. For inference and the sparse stage when the KL objective is not needed."""
        sg = jax.lax.stop_gradient
        x, q_latent = sg(x), sg(q_latent)
        q, w = self.project_queries(x, q_latent, positions, inv_freq)
        keys, valid = self.compressor(x, positions, inv_freq, segment_ids)
        return select_topk_fused(q, w, keys, valid, self.topk, ratio=self.ratio,
                                 segment_ids=segment_ids, implementation=implementation)

    def __call__(self, x, q_latent, positions, inv_freq, segment_ids=None):
        """(scores [B, S, N], top-k indices [B, S, min(k, N)] int32, -1 where fewer are visible).

        The inputs are detached: the indexer learns only through its KL objective, never from the
        language-model loss (top-k has no gradient anyway).
        """
        scores = self.scores(jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_latent), positions,
                             inv_freq, segment_ids)
        return scores, select_topk(jax.lax.stop_gradient(scores), self.topk)

    def sparse_stage(self, x, q_latent, positions, inv_freq, segment_ids=None):
        """Sparse-stage form of `__call__`: (scores at the selected entries [B, S, K] (-inf where
        the pick is -1), top-k indices [B, S, K]). The top-k comes from the full scores without
        gradient; only the K selected scores carry one (the V3.2 sparse stage restricts the KL to
        the selected set, spec §6), so the backward pass never touches the [B, S, Hi, N] scores."""
        sg = jax.lax.stop_gradient
        x, q_latent = sg(x), sg(q_latent)
        s = x.shape[1]
        q, w = self.project_queries(x, q_latent, positions, inv_freq)
        keys, valid = self.compressor(x, positions, inv_freq, segment_ids)
        visible = entry_visibility(s, self.ratio, valid, segment_ids)
        topk = select_topk(sg(indexer_scores(q, w, keys, visible)), self.topk)
        return indexer_scores_selected(q, w, keys, topk), topk
