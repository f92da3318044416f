"""Compressor module: projections + gate bias + norm around `ops.compress.compress`."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparse_lm.model.layers import RMSNorm, constant, param
from sparse_lm.ops import kv_cache
from sparse_lm.ops.compress import add_position_bias, compress, entry_positions
from sparse_lm.ops.rope import apply_rope


class Compressor(nnx.Module):
    """Compress [B, S, d] hidden states into [B, S // ratio, out_dim] entries (normed, RoPE'd).

    overlap=True is the CSA form (two channel halves: [previous window | current window]).
    """

    def __init__(self, d: int, out_dim: int, ratio: int, overlap: bool, *, eps: float,
                 init_std: float, rngs: nnx.Rngs):
        width = (2 if overlap else 1) * out_dim
        self.wkv = param(rngs, (d, width), ("embed", "kv"), init_std)
        self.wgate = param(rngs, (d, width), ("embed", "kv"), init_std)
        self.ape = constant((ratio, width), (None, "kv"), 0.0)
        self.norm = RMSNorm(out_dim, eps, "kv")
        self.ratio, self.overlap = ratio, overlap

    def project(self, x, slots):
        """x [B, S, d], slots [B, S] (index of each token in its window) -> kv, gate [B, S, w]
        fp32; the gate already includes the position bias `ape`."""
        xf = x.astype(jnp.float32)
        kv = xf @ self.wkv[...].astype(jnp.float32)
        gate = xf @ self.wgate[...].astype(jnp.float32)
        return kv, add_position_bias(gate, self.ape[...], slots)

    def finish(self, pooled, entry_pos, inv_freq, dtype):
        """pooled [B, N, out_dim] fp32, entry_pos [B, N] -> normed, RoPE'd entries in `dtype`."""
        return apply_rope(self.norm(pooled.astype(dtype)), entry_pos, inv_freq)

    def __call__(self, x, positions, inv_freq, segment_ids=None):
        """x [B, S, d] -> entries [B, N, out_dim] (x's dtype), valid [B, N]."""
        b, s, _ = x.shape
        slots = jnp.broadcast_to(jnp.arange(s) % self.ratio, (b, s))   # windows on the row grid
        kv, gate = self.project(x, slots)
        pooled, valid = compress(kv, gate, None, ratio=self.ratio, overlap=self.overlap,
                                 segment_ids=segment_ids)
        return self.finish(pooled, entry_positions(positions, self.ratio), inv_freq, x.dtype), valid

    def step(self, cache: kv_cache.CompressorCache, x, positions, lengths, n_new,
             inv_freq) -> kv_cache.CompressorCache:
        """The cached form of `__call__` for a chunk x [B, T, d] at positions [B, T]: project
        it, pool the windows it completes, store them in the entries cache, roll the
        uncompressed tail forward (`ops.kv_cache.tail_step`)."""
        kv, gate = self.project(x, jnp.mod(positions, self.ratio))
        pooled, idx, complete, tail_kv, tail_gate = kv_cache.tail_step(
            cache.kv, cache.gate, kv, gate, lengths, n_new, ratio=self.ratio,
            overlap=self.overlap)
        new = self.finish(pooled, idx * self.ratio, inv_freq, cache.entries.dtype)
        return kv_cache.CompressorCache(
            kv=tail_kv, gate=tail_gate,
            entries=kv_cache.write_entries(cache.entries, new, idx, complete))
