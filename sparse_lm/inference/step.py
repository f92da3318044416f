"""One cached forward step over a chunk of new tokens: the model's own layers, each given its
cache (`Block.__call__(..., cache=...)`, the same body as the full forward).

`forward_chunk(model, cache, tokens, n_new, blocks=...)` is a pure function of its inputs (the
model is read, never written); `Decoder` wraps it in `jax.jit` over `(params, per-layer params,
cache)` with the cache donated.

The layers run unrolled, each on its own cache buffers (`Cache.layers`), also those of the
model's scanned cycle: a `lax.scan` over stacked per-layer caches made XLA write new stacked
output buffers and copy every cache on every step (O(max_len) work per decoded token), and
slicing the stacked parameters inside the step copied the cycle's weights on every step.
`DeepseekV4.layer_blocks` slices the stacked parameters once, outside the step. The price is
compilation time that grows with the number of layers (the full forward keeps its scan).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.inference.cache import Cache
from sparse_lm.model.block import Block
from sparse_lm.ops.kv_cache import chunk_positions

LOGITS_MODES = ("all", "last", "none")


def forward_chunk(model, cache: Cache, tokens: jax.Array, n_new: jax.Array, *,
                  blocks: list[Block] | None = None, sparse: bool = True, logits: str = "all"):
    """Append a chunk to the cache and compute its logits.

    tokens [B, T] int; n_new [B] int in [0, T]: how many of the row's tokens are real (row b
    continues at position cache.lengths[b]; rows with n_new = 0 are left unchanged).
    blocks: the model's layers in order (`model.layer_blocks()`, made outside jit); None slices
    them here (inside a jitted step that copies the cycle's weights on every call).
    logits: "all" -> [B, T, V] (padding positions hold garbage), "last" -> [B, V] at each row's
    last real token (garbage for rows with n_new = 0), "none" -> None.
    Returns (logits, new cache). The caller guarantees lengths + n_new <= cache.max_len.
    """
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits={logits!r} is invalid: allowed values {LOGITS_MODES}")
    if blocks is None:
        blocks = model.layer_blocks()
    if len(blocks) != len(cache.layers):
        raise ValueError(f"blocks has {len(blocks)} layers, the cache {len(cache.layers)}")
    lengths = cache.lengths
    n_new = n_new.astype(jnp.int32)
    positions = chunk_positions(lengths, tokens.shape[1])
    x = model.embed_streams(tokens)
    layers = []
    for block, lc in zip(blocks, cache.layers):
        x, _, lc, _ = block(x, tokens, positions, cache=lc, lengths=lengths, n_new=n_new,
                            sparse=sparse)
        layers.append(lc)
    new_cache = Cache(lengths=lengths + n_new, layers=tuple(layers), max_len=cache.max_len)
    if logits == "none":
        return None, new_cache
    if logits == "last":
        last = jnp.clip(n_new - 1, 0, tokens.shape[1] - 1)
        x = jnp.take_along_axis(x, last[:, None, None, None], axis=1)
        return model.final_logits(x)[:, 0], new_cache
    return model.final_logits(x), new_cache
