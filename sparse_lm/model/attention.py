"""Attention block for every layer kind (SWA-only, CSA, HCA), spec §4."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.compressor import Compressor
from sparse_lm.model.indexer import Indexer
from sparse_lm.model.layers import RMSNorm, constant, param
from sparse_lm.ops.attention import sparse_attention
from sparse_lm.ops.compress import entry_visibility
from sparse_lm.ops.indexer import (compressed_attention_mass, indexer_objective,
                                   indexer_objective_selected, selected_attention_mass,
                                   sparse_stage_recall)
from sparse_lm.ops.norms import rms_norm
from sparse_lm.ops.rope import Yarn, apply_rope, inv_frequencies
from sparse_lm.sharding.constraints import constrain


def rope_table(cfg: ModelConfig, kind: str) -> np.ndarray:
    """SWA-only layers and MTP: theta=rope_theta, never YaRN. CSA/HCA: compress theta (+YaRN)."""
    if kind == "swa":
        return inv_frequencies(cfg.rope_head_dim, cfg.rope_theta)
    yarn = Yarn(cfg.yarn_factor, cfg.yarn_original_max_position, cfg.yarn_beta_fast,
                cfg.yarn_beta_slow) if cfg.yarn else None
    return inv_frequencies(cfg.rope_head_dim, cfg.compress_rope_theta, yarn)


class Attention(nnx.Module):
    """Low-rank query with a shared latent, one shared K=V head, joint window+compressed
    attention with sinks, output de-rotation and grouped low-rank output projection."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        d, h, hd, std = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.init_std
        g = cfg.o_groups
        self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), std)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, "q_lora")
        self.wq_b = param(rngs, (cfg.q_lora_rank, h * hd), ("q_lora", "heads"), std)
        self.wkv = param(rngs, (d, hd), ("embed", "kv"), std)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps, "kv")
        self.wo_a = param(rngs, (g, h // g * hd, cfg.o_lora_rank), ("o_groups", "heads", "o_lora"), std)
        self.wo_b = param(rngs, (g * cfg.o_lora_rank, d), ("o_lora", "embed"), std)
        self.sink = constant((h,), ("heads",), 0.0)
        self.kind = kind
        self.ratio = cfg.ratio_of(kind)
        self.compressor = (Compressor(d, hd, self.ratio, kind == "csa", eps=cfg.rms_norm_eps,
                                      init_std=std, rngs=rngs) if kind != "swa" else None)
        self.indexer = Indexer(cfg, rngs=rngs) if kind == "csa" else None
        self.cfg = cfg

    def __call__(self, x, positions, segment_ids=None, *, sparse: bool = True,
                 implementation: str | None = None):
        """x [B, S, d] (normed) -> (out [B, S, d], stats).

        sparse=False makes CSA attend every visible entry (the indexer warm-up stage). stats:
        indexer_kl (the indexer's training objective) and indexer_recall (share of the dense
        attention mass on compressed entries that the top-k keeps); zeros for non-CSA layers.
        In the sparse stage the KL is restricted to the selected entries (V3.2, spec §6) and the
        recall is measured on at most 512 evenly strided queries per row (exact for S <= 512).
        """
        cfg = self.cfg
        s = x.shape[1]
        inv_freq = self.inv_freq
        q, q_latent = self.project_queries(x, positions)
        kv = self.project_kv(x, positions)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
        kv = constrain(kv, ("activation_batch", "activation_kv_length", "activation_kv"))
        entries = valid = topk = scores = None
        if self.compressor is not None:
            entries, valid = self.compressor(x, positions, inv_freq, segment_ids)
            entries = constrain(entries, ("activation_batch", "activation_kv_length", "activation_kv"))
            if self.indexer is not None and sparse:
                scores, topk = self.indexer.sparse_stage(x, q_latent, positions, inv_freq,
                                                         segment_ids)
            elif self.indexer is not None:
                scores, topk = self.indexer(x, q_latent, positions, inv_freq, segment_ids)
        o, lse = sparse_attention(q, kv, self.sink[...], window=cfg.sliding_window,
                                  scale=self.softmax_scale,
                                  segment_ids=segment_ids, compressed=entries,
                                  compressed_valid=valid, ratio=self.ratio,
                                  topk_idx=topk if sparse else None,
                                  implementation=implementation or cfg.attention_impl,
                                  return_lse=True)
        stats = {"indexer_kl": jnp.zeros((), jnp.float32), "indexer_recall": jnp.zeros((), jnp.float32)}
        if scores is not None and scores.shape[-1] > 0 and sparse:
            # Sparse stage: KL over the selected set only (V3.2); recall on sampled queries.
            sg = jax.lax.stop_gradient
            mass = selected_attention_mass(sg(q), sg(entries), sg(lse), topk, self.softmax_scale)
            stats = {"indexer_kl": indexer_objective_selected(scores, mass, topk),
                     "indexer_recall": sparse_stage_recall(q, entries, lse, valid, topk,
                                                           ratio=self.ratio,
                                                           scale=self.softmax_scale,
                                                           segment_ids=segment_ids)}
        elif scores is not None and scores.shape[-1] > 0:
            sg = jax.lax.stop_gradient
            visible = entry_visibility(s, self.ratio, valid, segment_ids)
            mass = compressed_attention_mass(sg(q), sg(entries), sg(lse), visible,
                                             self.softmax_scale)
            kl, recall = indexer_objective(scores, mass, visible, topk)
            stats = {"indexer_kl": kl, "indexer_recall": recall}
        return self.project_output(o, positions), stats

    # ------------------------------------------------------------------ pieces (shared with decode)
    @property
    def inv_freq(self) -> np.ndarray:
        """[rope_head_dim // 2] inverse frequencies of this layer kind's RoPE table."""
        return rope_table(self.cfg, self.kind)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(head_dim), no YaRN mscale (spec §4.2)."""
        return self.cfg.head_dim ** -0.5

    def project_queries(self, x, positions):
        """x [B, S, d] (normed) -> q [B, S, H, D] (per-head RMS-normed, RoPE'd) and the shared
        query latent [B, S, q_lora_rank] (also the indexer's query input)."""
        cfg = self.cfg
        b, s, _ = x.shape
        dt = x.dtype
        q_latent = self.q_norm(x @ self.wq_a[...].astype(dt))
        q = (q_latent @ self.wq_b[...].astype(dt)).reshape(b, s, cfg.num_heads, cfg.head_dim)
        return apply_rope(rms_norm(q, None, cfg.rms_norm_eps), positions, self.inv_freq), q_latent

    def project_kv(self, x, positions):
        """x [B, S, d] (normed) -> the shared K=V row of each token [B, S, D] (normed, RoPE'd)."""
        return apply_rope(self.kv_norm(x @ self.wkv[...].astype(x.dtype)), positions, self.inv_freq)

    def project_output(self, o, positions):
        """Attention output o [B, S, H, D] -> de-rotated, grouped low-rank projection [B, S, d]."""
        cfg = self.cfg
        b, s, h, hd = o.shape
        dt = o.dtype
        o = apply_rope(o, positions, self.inv_freq, inverse=True)
        g = cfg.o_groups
        u = jnp.einsum("bsgi,gio->bsgo", o.reshape(b, s, g, h // g * hd), self.wo_a[...].astype(dt))
        return u.reshape(b, s, -1) @ self.wo_b[...].astype(dt)
