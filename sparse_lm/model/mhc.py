"""mHC parameter sites: one per sublayer (attention, MoE) and one final collapse (`HcHead`)."""
from __future__ import annotations

from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.layers import constant, param
from sparse_lm.ops import mhc


class HyperConnection(nnx.Module):
    """Wraps a sublayer F: y = collapse(X); X' = post (x) F(y) + comb^T X."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        n, d = cfg.hc_mult, cfg.hidden_size
        m = (2 + n) * n
        self.fn = param(rngs, (n * d, m), ("hc_embed", None), cfg.init_std)
        self.base = constant((m,), (None,), 0.0)
        self.scale = constant((3,), (None,), cfg.hc_alpha_init)
        self.cfg = cfg

    def weights(self, x):
        c = self.cfg
        return mhc.hc_weights(x, self.fn[...], self.base[...], self.scale[...], n=c.hc_mult,
                              norm_eps=c.rms_norm_eps, hc_eps=c.hc_eps,
                              sinkhorn_iters=c.hc_sinkhorn_iters)


class HcHead(nnx.Module):
    """Final collapse of the streams before the output norm (no post, no Sinkhorn)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        n, d = cfg.hc_mult, cfg.hidden_size
        self.fn = param(rngs, (n * d, n), ("hc_embed", None), cfg.init_std)
        self.base = constant((n,), (None,), 0.0)
        self.scale = constant((1,), (None,), cfg.hc_alpha_init)
        self.cfg = cfg

    def __call__(self, x):
        """x [B, S, n, d] -> [B, S, d]."""
        pre = mhc.hc_head_weights(x, self.fn[...], self.base[...], self.scale[...],
                                  norm_eps=self.cfg.rms_norm_eps, hc_eps=self.cfg.hc_eps)
        return mhc.hc_collapse(x, pre)
