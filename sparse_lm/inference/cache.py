"""Decode caches as pytrees (spec §13): a fixed-size *state* part and a growing *entries* part.

One `LayerCache` per attention layer (its fields, layout and bookkeeping are documented in
`sparse_lm.ops.kv_cache`): the window ring buffer [B, W, D], and for CSA/HCA the compressor's
uncompressed tail (fp32, gates with the position bias) and its compressed entries
[B, max_len // m, c], for CSA also the indexer's tail and keys (what the layer's selector needs:
`ops.kv_cache`; dsa_tokens keeps every token's row and key instead).
SWA-only layers have only the window. ``Cache.lengths`` [B] counts the tokens each row holds.

The state part (window + tails) has a fixed size per sequence; the entries part is preallocated
to ``max_len`` and is the only part that grows with context. ``Cache.layers`` holds one
`LayerCache` per layer in layer order (`cfg.layer_kinds`), each its own set of buffers, also for
the layers of the model's scanned cycle: a step updates every layer's buffers in place and
writes only the new rows. (Stacking the cycle's caches along a layer axis and scanning over
them made XLA copy every stacked cache on every step, O(max_len) work per decoded token.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.config import ModelConfig
from sparse_lm.model.layers import dtype_of
from sparse_lm.ops.kv_cache import CompressorCache, LayerCache, TokenCache, dataclass_pytree

__all__ = ["Cache", "CompressorCache", "LayerCache", "TokenCache", "cache_bytes",
           "cache_logical_axes", "init_cache", "layer_cache", "measured_bytes_per_token"]

# Cache arrays that grow with context (preallocated to max_len); the others are fixed state.
GROWING = ("entries", "kv_rows", "index_keys")


@dataclass_pytree(meta=("max_len",))
class Cache:
    lengths: jax.Array                     # [B] int32 tokens held per row
    layers: tuple[LayerCache, ...]         # one per layer, in layer order
    max_len: int

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def _compressor_cache(batch, max_len, out_dim, ratio, overlap, dtype) -> CompressorCache:
    f = 2 if overlap else 1
    shape = (batch, f * ratio, f * out_dim)
    return CompressorCache(kv=jnp.zeros(shape, jnp.float32),
                           gate=jnp.full(shape, -jnp.inf, jnp.float32),
                           entries=jnp.zeros((batch, max_len // ratio, out_dim), dtype))


def layer_cache(cfg: ModelConfig, kind: str, batch: int, max_len: int, dtype=None) -> LayerCache:
    """Empty cache of one attention layer of `kind` ("swa" | "csa" | "hca"); a CSA layer's
    holds what its selector (`cfg.selector`) reads: lightning the indexer's compressed keys,
    dsa_tokens every token's row and key (no compression), the others the entries only."""
    dtype = dtype or dtype_of(cfg.dtype)
    window = jnp.zeros((batch, cfg.sliding_window, cfg.head_dim), dtype)
    comp = idx = None
    if kind == "csa" and cfg.selector == "dsa_tokens":
        return LayerCache(window=window, compressor=None, indexer=TokenCache(
            kv_rows=jnp.zeros((batch, max_len, cfg.head_dim), dtype),
            index_keys=jnp.zeros((batch, max_len, cfg.index_head_dim), dtype)))
    if kind != "swa":
        comp = _compressor_cache(batch, max_len, cfg.head_dim, cfg.ratio_of(kind), kind == "csa",
                                 dtype)
    if kind == "csa" and cfg.selector == "lightning":
        idx = _compressor_cache(batch, max_len, cfg.index_head_dim, cfg.compress_ratio_csa, True,
                                dtype)
    return LayerCache(window=window, compressor=comp, indexer=idx)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> Cache:
    """Empty cache for `batch` sequences of up to `max_len` tokens each (prompt + generation).

    dtype: of the window and the entries (default: the model's compute dtype); the compressor
    tails are always fp32. Use `jax.eval_shape(lambda: init_cache(...))` to size a cache
    without allocating it.
    """
    for name, v in (("batch", batch), ("max_len", max_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid: must be an integer >= 1")
    return Cache(lengths=jnp.zeros((batch,), jnp.int32),
                 layers=tuple(layer_cache(cfg, kind, batch, max_len, dtype)
                              for kind in cfg.layer_kinds),
                 max_len=max_len)


# ---------------------------------------------------------------------- structure helpers
def _leaf_name(path) -> str:
    return getattr(path[-1], "name", getattr(path[-1], "idx", None))


def _nbytes(a) -> int:
    return int(a.size) * jnp.dtype(a.dtype).itemsize


def cache_bytes(cfg: ModelConfig, cache: Cache) -> dict[str, dict[str, int]]:
    """Bytes of the cache arrays per layer kind, split into "state" (window ring buffer and
    compressor tails: fixed per sequence) and "entries" (what grows with context, `GROWING`:
    compressed entries, indexer keys, dsa_tokens' per-token rows; preallocated to max_len), summed over the layers of that kind and the batch, plus "layers"
    (how many layers of that kind). Works on arrays and on `jax.eval_shape` results alike.
    `lengths` (4 bytes per sequence) is not counted.
    """
    kinds = cfg.layer_kinds
    if len(kinds) != len(cache.layers):
        raise ValueError(f"cache has {len(cache.layers)} layer caches, the config "
                         f"{len(kinds)} layers")
    out: dict[str, dict[str, int]] = {}
    for kind, lc in zip(kinds, cache.layers):
        d = out.setdefault(kind, {"layers": 0, "state": 0, "entries": 0})
        d["layers"] += 1
        for path, leaf in jax.tree_util.tree_leaves_with_path(lc):
            d["entries" if _leaf_name(path) in GROWING else "state"] += _nbytes(leaf)
    return out


def cache_logical_axes(cache: Cache) -> Cache:
    """A pytree like `cache` whose leaves are logical axis-name tuples (the activation
    vocabulary of the sharding rules): batch on "activation_batch", the length of what grows
    with context (`GROWING`) on "activation_length", the channel dim on "activation_kv". Map
    it through the logical rules to get the cache's PartitionSpecs."""
    def names(path, leaf):
        if getattr(path[0], "name", None) == "lengths":
            return ("activation_batch",)
        if _leaf_name(path) in GROWING:
            return ("activation_batch", "activation_length", "activation_kv")
        return ("activation_batch", None, "activation_kv")   # ring buffer, compressor tails
    return jax.tree_util.tree_map_with_path(names, cache)


def measured_bytes_per_token(cfg: ModelConfig, *, max_lens: tuple[int, int] | None = None,
                             dtype=None, batch: int = 1) -> dict[str, float]:
    """Cache bytes per token of context, measured on the cache arrays `init_cache` builds.

    The slope of `cache_bytes` between two maximum lengths (default 64Ki and 128Ki tokens, both
    multiples of every compress ratio), per sequence. Keys: each layer kind present -> bytes
    per token of one layer of that kind, and "total" -> summed over all layers (the MTP block
    has no cache). Shapes come from `jax.eval_shape`, so nothing is allocated; they are the
    shapes of the arrays the decoder really uses.
    """
    a, b = max_lens or (1 << 16, 1 << 17)
    if not 1 <= a < b:
        raise ValueError(f"max_lens={max_lens!r} is invalid: need 1 <= first < second")

    def sizes(n):
        return cache_bytes(cfg, jax.eval_shape(lambda: init_cache(cfg, batch, n, dtype)))

    lo, hi = sizes(a), sizes(b)
    out = {}
    total = 0.0
    for kind, d in hi.items():
        grow = (d["entries"] + d["state"]) - (lo[kind]["entries"] + lo[kind]["state"])
        slope = grow / (b - a) / batch
        out[kind] = slope / d["layers"]
        total += slope
    out["total"] = total
    return out
