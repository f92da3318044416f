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
        pre, post, comb = self.attn_hc.weights(x)
        a, attn_stats = self.attn(self.attn_norm(mhc.hc_collapse(x, pre)), positions, segment_ids,
                      sparse=sparse, implementation=implementation)
        x = mhc.hc_expand(a, x, post, comb)
        pre, post, comb = self.ffn_hc.weights(x)
        f, stats = self.moe(self.ffn_norm(mhc.hc_collapse(x, pre)), token_ids)
        return mhc.hc_expand(f, x, post, comb), {**stats, **attn_stats}
