"""Cached inference: compressed KV caches, chunked prefill, decode and generation (spec §13).

- `cache`: the model's cache as a pytree (`init_cache`, `cache_bytes`, `cache_logical_axes`);
  one `LayerCache` per layer, whose bookkeeping lives in `sparse_lm.ops.kv_cache`.
- `step`: `forward_chunk`, one cached forward over a chunk of new tokens through the model's own
  layers (unrolled: `DeepseekV4.layer_blocks`, cycle parameters sliced once).
- `decode`: `Decoder` (jitted prefill/decode with donated caches), `sample_tokens`, `generate`.
- `dense`: the dense full-context baseline (`full_attention_config`, `init_full_kv_cache`) that
  the same `Decoder` runs.
"""
from sparse_lm.inference.cache import (Cache, CompressorCache, LayerCache, cache_bytes,
                                       cache_logical_axes, init_cache)
from sparse_lm.inference.decode import (Decoder, InferenceError, generate, sample_tokens,
                                        validate_sampling)
from sparse_lm.inference.dense import full_attention_config, init_full_kv_cache
from sparse_lm.inference.step import forward_chunk

__all__ = ["Cache", "CompressorCache", "LayerCache", "cache_bytes", "cache_logical_axes",
           "init_cache", "Decoder", "InferenceError", "generate", "sample_tokens", "validate_sampling",
           "forward_chunk", "full_attention_config", "init_full_kv_cache"]
