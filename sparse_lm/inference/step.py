"""One cached forward step over a chunk of new tokens, using the model's own modules.

Every projection (queries, the K=V row, compressor and indexer projections, norms, RoPE, output
projection, mHC, MoE, head) is the model's method, the same code the full forward runs; only the
bookkeeping of the cache (ring buffer, compressor tails, entry writes) and the attention against
cached keys live here (`sparse_lm.inference.ops`).

`forward_chunk(model, cache, tokens, n_new, blocks=...)` is a pure function of its inputs (the
model is read, never written); `Decoder` wraps it in `jax.jit` over `(params, per-layer params,
cache)` with the cache donated.

The layers run unrolled, each on its own cache buffers (`Cache.layers`), also those of the
model's scanned cycle: a `lax.scan` over stacked per-layer caches made XLA write new stacked
output buffers and copy every cache on every step (O(max_len) work per decoded token), and
slicing the stacked parameters inside the step copied the cycle's weights on every step.
`layer_blocks` slices the stacked parameters once, outside the step. The price is compilation
time that grows with the number of layers (the full forward keeps its scan).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_lm.inference import ops
from sparse_lm.inference.cache import Cache, CompressorCache, LayerCache
from sparse_lm.model.attention import Attention
from sparse_lm.model.block import Block
from sparse_lm.model.compressor import Compressor
from sparse_lm.ops.indexer import select_topk

LOGITS_MODES = ("all", "last", "none")


def _compressor_step(comp: Compressor, cc: CompressorCache, h, positions, lengths, n_new,
                     inv_freq) -> CompressorCache:
    """Project the chunk, pool the windows it completes, store them, roll the tail forward."""
    kv, gate = comp.project(h, jnp.mod(positions, comp.ratio))
    pooled, idx, complete, tail_kv, tail_gate = ops.tail_step(
        cc.kv, cc.gate, kv, gate, lengths, n_new, ratio=comp.ratio, overlap=comp.overlap)
    new = comp.finish(pooled, idx * comp.ratio, inv_freq, cc.entries.dtype)
    return CompressorCache(kv=tail_kv, gate=tail_gate,
                           entries=ops.write_entries(cc.entries, new, idx, complete))


def attend_cached(attn: Attention, h, lc: LayerCache, lengths, n_new, *, sparse: bool = True):
    """Cached attention sublayer. h [B, T, d] (normed input of the chunk) -> (out [B, T, d],
    updated LayerCache). The chunk's compressed entries are stored before the attention, so a
    window completed by token t is seen by t's own query (spec §13.1)."""
    cfg = attn.cfg
    t = h.shape[1]
    positions = ops.chunk_positions(lengths, t)
    inv_freq = attn.inv_freq
    q, q_latent = attn.project_queries(h, positions)
    kv = attn.project_kv(h, positions)
    keys = jnp.concatenate([lc.window, kv.astype(lc.window.dtype)], axis=1)
    key_pos = jnp.concatenate([ops.ring_positions(lengths, lc.window.shape[1]), positions], axis=1)
    comp = idx_cache = entries = topk = None
    if attn.compressor is not None:
        comp = _compressor_step(attn.compressor, lc.compressor, h, positions, lengths, n_new,
                                inv_freq)
        entries = comp.entries
        if attn.indexer is not None:
            ind = attn.indexer
            idx_cache = _compressor_step(ind.compressor, lc.indexer, h, positions, lengths, n_new,
                                         inv_freq)
            if sparse:
                qi, wi = ind.project_queries(h, q_latent, positions, inv_freq)
                visible = ops.entry_visible(positions, idx_cache.entries.shape[1], ind.ratio)
                scores = ops.cached_indexer_scores(qi, wi, idx_cache.entries, visible)
                topk = select_topk(scores, ind.topk)
    o = ops.cached_attention(q, positions, keys, key_pos, attn.sink[...],
                             window=cfg.sliding_window, scale=attn.softmax_scale,
                             entries=entries, ratio=attn.ratio, topk_idx=topk)
    new_lc = LayerCache(window=ops.ring_update(lc.window, kv, lengths, n_new), compressor=comp,
                        indexer=idx_cache)
    return attn.project_output(o, positions), new_lc


def block_step(block: Block, x, tokens, lc: LayerCache, lengths, n_new, *, sparse: bool = True):
    """One layer on the chunk's streams x [B, T, n, d] -> (streams, updated LayerCache)."""
    x, lc = block.attention_residual(
        x, lambda h: attend_cached(block.attn, h, lc, lengths, n_new, sparse=sparse))
    x, _ = block.ffn_residual(x, tokens)
    return x, lc


def layer_blocks(model) -> list[Block]:
    """Every Block of the model in layer order (`cfg.layer_kinds`): head layers, the scanned
    cycle's blocks with their stacked parameters sliced per cycle, tail layers. Call it outside
    jit (as `Decoder` does) so that the slices are made once, not on every step."""
    blocks = list(model.head_layers)
    if model.cycles is not None:
        graphdef, params = nnx.split(model.cycles)
        for i in range(model.cfg.layer_groups.num_cycles):
            cyc = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))
            blocks += list(cyc.blocks)
    return blocks + list(model.tail_layers)


def forward_chunk(model, cache: Cache, tokens: jax.Array, n_new: jax.Array, *,
                  blocks: list[Block] | None = None, sparse: bool = True, logits: str = "all"):
    """Append a chunk to the cache and compute its logits.

    tokens [B, T] int; n_new [B] int in [0, T]: how many of the row's tokens are real (row b
    continues at position cache.lengths[b]; rows with n_new = 0 are left unchanged).
    blocks: the model's layers in order (`layer_blocks(model)`, made outside jit); None slices
    them here (inside a jitted step that copies the cycle's weights on every call).
    logits: "all" -> [B, T, V] (padding positions hold garbage), "last" -> [B, V] at each row's
    last real token (garbage for rows with n_new = 0), "none" -> None.
    Returns (logits, new cache). The caller guarantees lengths + n_new <= cache.max_len.
    """
    if logits not in LOGITS_MODES:
        raise ValueError(f"logits={logits!r} is invalid: allowed values {LOGITS_MODES}")
    if blocks is None:
        blocks = layer_blocks(model)
    if len(blocks) != len(cache.layers):
        raise ValueError(f"blocks has {len(blocks)} layers, the cache {len(cache.layers)}")
    lengths = cache.lengths
    n_new = n_new.astype(jnp.int32)
    x = model.embed_streams(tokens)
    layers = []
    for block, lc in zip(blocks, cache.layers):
        x, lc = block_step(block, x, tokens, lc, lengths, n_new, sparse=sparse)
        layers.append(lc)
    new_cache = Cache(lengths=lengths + n_new, layers=tuple(layers), max_len=cache.max_len)
    if logits == "none":
        return None, new_cache
    if logits == "last":
        last = jnp.clip(n_new - 1, 0, tokens.shape[1] - 1)
        x = jnp.take_along_axis(x, last[:, None, None, None], axis=1)
        return model.final_logits(x)[:, 0], new_cache
    return model.final_logits(x), new_cache
