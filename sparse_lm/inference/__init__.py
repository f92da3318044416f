"""Cached inference: compressed KV caches, chunked prefill, decode and generation (spec §13).

- `cache`: the per-layer caches as pytrees (`init_cache`, `cache_bytes`, `cache_logical_axes`).
- `ops`: pure functions of the cached path (ring buffer, compressor tails, cached attention).
- `step`: `forward_chunk`, one cached forward over a chunk of new tokens using the model's modules
  (layers unrolled, `layer_blocks`: the model's layers in order, cycle parameters sliced once).
- `decode`: `Decoder` (jitted prefill/decode with donated caches), `sample_tokens`, `generate`.
"""
from sparse_lm.inference.cache import (Cache, CompressorCache, LayerCache, cache_bytes,
                                       cache_logical_axes, init_cache)
from sparse_lm.inference.decode import (Decoder, InferenceError, generate, sample_tokens,
                                        validate_sampling)
from sparse_lm.inference.step import forward_chunk, layer_blocks

__all__ = ["Cache", "CompressorCache", "LayerCache", "cache_bytes", "cache_logical_axes",
           "init_cache", "Decoder", "InferenceError", "generate", "sample_tokens", "validate_sampling",
           "forward_chunk", "layer_blocks"]
