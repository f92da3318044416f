"""The dense full-context baseline decoder: the same model with every layer a causal attention
over a full K=V cache [B, max_len, D].

    cfg_d = full_attention_config(cfg, max_len)       # every layer window-only, window = max_len
    dec = Decoder(build_model(cfg_d))                  # the library decoder, unchanged
    cache = init_full_kv_cache(cfg_d, batch, max_len)  # one FullKVCache per layer
    logits, cache = dec.decode(cache, tokens)

Same query/KV/output projections, sinks, mHC, MoE and head as the sparse model; no compressor or
indexer. Each step writes its rows in place (`ops.kv_cache.write_rows`: a scatter behind an
optimization barrier, so the donated cache is updated without a copy) and attends every held
row (`Attention` with a `FullKVCache`, the one attention math). This is what the decode
benchmark measures the sparse cache against.
"""
from __future__ import annotations

import jax.numpy as jnp

from sparse_lm.config import ModelConfig
from sparse_lm.inference.cache import Cache
from sparse_lm.model.layers import dtype_of
from sparse_lm.ops.kv_cache import FullKVCache


def full_attention_config(cfg: ModelConfig, window: int | None = None) -> ModelConfig:
    """`cfg` with every layer a window-only (SWA) layer, the same schedule shape (so the same
    head / scanned cycle / tail grouping and hash layers); `window` replaces the sliding window
    if given (>= the context: full causal attention)."""
    def swa(kinds):
        return tuple("swa" for _ in kinds)
    return cfg.replace(layer_prefix=swa(cfg.layer_prefix), layer_cycle=swa(cfg.layer_cycle),
                       layer_tail=swa(cfg.layer_tail),
                       sliding_window=cfg.sliding_window if window is None else window)


def init_full_kv_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """An empty full-context cache: one [B, max_len, D] array per layer. The model must be
    window-only with sliding_window >= max_len (`full_attention_config`): a shorter window would
    make this a wasteful ring buffer, a compressed layer has no such cache."""
    for name, v in (("batch", batch), ("max_len", max_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid: must be an integer >= 1")
    kinds = sorted(set(cfg.layer_kinds) - {"swa"})
    if kinds:
        raise ValueError(f"init_full_kv_cache: the model has {kinds} layers; a full KV cache "
                         "serves window-only models (use full_attention_config)")
    if cfg.sliding_window < max_len:
        raise ValueError(f"init_full_kv_cache: sliding_window={cfg.sliding_window} < "
                         f"max_len={max_len}; use full_attention_config(cfg, window=max_len)")
    dtype = dtype or dtype_of(cfg.dtype)
    shape = (batch, max_len, cfg.head_dim)
    return Cache(lengths=jnp.zeros((batch,), jnp.int32),
                 layers=tuple(FullKVCache(kv=jnp.zeros(shape, dtype)) for _ in cfg.layer_kinds),
                 max_len=max_len)


def full_kv_cache_bytes(cache: Cache) -> int:
    """Bytes of a full KV cache's arrays (`lengths` not counted); works on `jax.eval_shape`."""
    return sum(int(lc.kv.size) * jnp.dtype(lc.kv.dtype).itemsize for lc in cache.layers)
