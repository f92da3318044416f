"""One transformer layer on the 4-stream mHC residual: attention sublayer, then MoE sublayer."""
from __future__ import annotations

from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.attention import Attention
from sparse_lm.model.layers import RMSNorm
from sparse_lm.model.mhc import HyperConnection
from sparse_lm.model.moe import MoE
from sparse_lm.ops import mhc


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, routing: str, *, rngs: nnx.Rngs,
                 hash_seed: int = 0):
        self.attn_hc = HyperConnection(cfg, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.attn = Attention(cfg, kind, rngs=rngs)
        self.ffn_hc = HyperConnection(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "embed")
        self.moe = MoE(cfg, routing, rngs=rngs, hash_seed=hash_seed)

    def __call__(self, x, token_ids, positions, segment_ids=None, *, sparse: bool = True,
                 implementation: str | None = None):
        """x [B, S, n, d] streams -> (streams [B, S, n, d], MoE and indexer stats)."""
        x, attn_stats = self.attention_residual(
            x, lambda h: self.attn(h, positions, segment_ids, sparse=sparse,
                                   implementation=implementation))
        x, stats = self.ffn_residual(x, token_ids)
        return x, {**stats, **attn_stats}

    def attention_residual(self, x, attend):
        """The attention sublayer on the streams x [B, S, n, d].

        `attend(h)` maps the normed collapsed input h [B, S, d] to (out [B, S, d], aux): the
        full forward calls `self.attn`, decoding calls the cached attention. Returns
        (streams [B, S, n, d], aux).
        """
        pre, post, comb = self.attn_hc.weights(x)
        a, aux = attend(self.attn_norm(mhc.hc_collapse(x, pre)))
        return mhc.hc_expand(a, x, post, comb), aux

    def ffn_residual(self, x, token_ids):
        """The MoE sublayer: streams [B, S, n, d], token_ids [B, S] -> (streams, MoE stats)."""
        pre, post, comb = self.ffn_hc.weights(x)
        f, stats = self.moe(self.ffn_norm(mhc.hc_collapse(x, pre)), token_ids)
        return mhc.hc_expand(f, x, post, comb), stats
