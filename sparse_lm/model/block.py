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

    def __call__(self, x, token_ids, positions, segment_ids=None, *, cache=None, lengths=None,
                 n_new=None, sparse: bool = True, implementation: str | None = None,
                 topk: int | None = None, topk_limit=None, record: bool = False):
        """x [B, S, n, d] streams -> (streams [B, S, n, d], MoE and indexer stats, the
        attention's updated cache (None without one), recorded internals).

        Arguments after token_ids and positions are those of `Attention.__call__`; with a
        cache the layer runs on a chunk appended to it (decode, chunked prefill).
        """
        pre, post, comb = self.attn_hc.weights(x)
        a, attn_stats, cache, recorded = self.attn(
            self.attn_norm(mhc.hc_collapse(x, pre)), positions, segment_ids, cache=cache,
            lengths=lengths, n_new=n_new, sparse=sparse, implementation=implementation,
            topk=topk, topk_limit=topk_limit, record=record)
        x = mhc.hc_expand(a, x, post, comb)
        pre, post, comb = self.ffn_hc.weights(x)
        f, stats, routing = self.moe(self.ffn_norm(mhc.hc_collapse(x, pre)), token_ids,
                                     record=record)
        return mhc.hc_expand(f, x, post, comb), {**stats, **attn_stats}, cache, {**recorded, **routing}
