"""Attention block for every layer kind (SWA-only, CSA, HCA), spec §4, with or without a cache.

One body for training, evaluation, analysis, chunked prefill and decode (as a transformer's
attention runs with or without a KV cache): the projections, the compressor, the indexer's
selection, the joint window + compressed attention and the output projection are the same
calls; only where keys and entries come from differs:
  * no cache: a packed row x [B, S, d] attends its own keys and compressed entries
    (`implementations.sparse_attention`);
  * a `LayerCache`: a chunk of T new tokens per row is appended after the `lengths` tokens the
    cache holds, attends the ring buffer + its own rows and the cached entries
    (`ops.attention.cached_attention`), and the cache is updated (`ops.kv_cache`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.compressor import Compressor
from sparse_lm.model.indexer import Indexer
from sparse_lm.model.layers import RMSNorm, constant, param
from sparse_lm.model.selectors import make_selector
from sparse_lm.ops import kv_cache, masks
from sparse_lm.ops.attention import attention_mass_split, cached_attention
from sparse_lm.ops.implementations import SPARSE_ATTENTION, sparse_attention
from sparse_lm.ops.indexer import (compressed_attention_mass, indexer_objective_chunked,
                                   indexer_objective_selected, selected_attention_mass,
                                   sparse_stage_recall)
from sparse_lm.ops.norms import rms_norm
from sparse_lm.ops.rope import Yarn, apply_rope, inv_frequencies
from sparse_lm.sharding import kernels
from sparse_lm.sharding.constraints import constrain


def rope_table(cfg: ModelConfig, kind: str) -> np.ndarray:
    """SWA-only layers and MTP: theta=rope_theta, never YaRN. CSA/HCA: compress theta (+YaRN)."""
    if kind == "swa":
        return inv_frequencies(cfg.rope_head_dim, cfg.rope_theta)
    yarn = Yarn(cfg.yarn_factor, cfg.yarn_original_max_position, cfg.yarn_beta_fast,
                cfg.yarn_beta_slow) if cfg.yarn else None
    return inv_frequencies(cfg.rope_head_dim, cfg.compress_rope_theta, yarn)


def _zero_stats():
    return {"indexer_kl": jnp.zeros((), jnp.float32), "indexer_recall": jnp.zeros((), jnp.float32)}


class Attention(nnx.Module):
    """Low-rank query with a shared latent, one shared K=V head, joint window+compressed
    attention with sinks, output de-rotation and grouped low-rank output projection."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        d, h, hd, std = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.init_std
        g = cfg.o_groups
        self.wq_a = param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), std)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, "q_lora")
        self.wq_b = param(rngs, (cfg.q_lora_rank, h * hd), ("q_lora", "heads"), std)
        self.wkv = param(rngs, (d, hd), ("embed", "kv"), std)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps, "kv")
        self.wo_a = param(rngs, (g, h // g * hd, cfg.o_lora_rank), ("o_groups", "heads", "o_lora"), std)
        self.wo_b = param(rngs, (g * cfg.o_lora_rank, d), ("o_lora", "embed"), std)
        self.sink = constant((h,), ("heads",), 0.0)
        self.kind = kind
        self.ratio = cfg.ratio_of(kind)
        self.compressor = (Compressor(d, hd, self.ratio, kind == "csa", eps=cfg.rms_norm_eps,
                                      init_std=std, rngs=rngs) if kind != "swa" else None)
        # the CSA selector (`cfg.selector`): the lightning Indexer, or one of model/selectors.py
        self.indexer = make_selector(cfg, rngs=rngs) if kind == "csa" else None
        self.cfg = cfg

    def __call__(self, x, positions, segment_ids=None, *, cache: kv_cache.LayerCache | None = None,
                 lengths=None, n_new=None, sparse: bool = True, implementation: str | None = None,
                 topk: int | None = None, topk_limit=None, record: bool = False):
        """x [B, S, d] (normed) at positions [B, S] -> (out [B, S, d], stats, cache, recorded).

        Without `cache` x is a packed row (documents told apart by segment_ids [B, S]); with a
        `LayerCache` x is a chunk appended after `lengths` [B] tokens, of which the first
        n_new [B] per row are real, and the updated cache is returned (else None).
        sparse=False makes CSA attend every visible entry (the indexer warm-up stage).
        topk overrides index_topk, topk_limit keeps only the best `limit` picks (a traced int:
        one compiled forward for every k), record=True also returns the layer's internals
        (`recorded`, for analysis; empty otherwise).
        stats: indexer_kl (the indexer's training objective) and indexer_recall (share of the
        dense attention mass on compressed entries that the top-k keeps); zeros for non-CSA
        layers and on the cached path. In the sparse stage the KL is restricted to the selected
        entries (V3.2, spec §6) and the recall is measured on at most 512 evenly strided
        queries per row (exact for S <= 512).
        """
        q, q_latent = self.project_queries(x, positions)
        kv = self.project_kv(x, positions)
        if cache is not None:
            o, new_cache = self._attend_cached(cache, x, q, q_latent, kv, positions, lengths,
                                               n_new, sparse=sparse, topk=topk)
            return self.project_output(o, positions), _zero_stats(), new_cache, {}
        o, stats, recorded = self._attend_row(x, q, q_latent, kv, positions, segment_ids,
                                              sparse=sparse, implementation=implementation,
                                              topk=topk, topk_limit=topk_limit, record=record)
        return self.project_output(o, positions), stats, None, recorded

    def _sparse_attention(self, q, kv, segment_ids, entries, valid, picks, implementation):
        """`sparse_attention` of a packed row -> (out, lse). Under sharding rules a Pallas
        kernel runs inside `shard_map` (`sharding.kernels`); where the preset splits the queries
        along the sequence, each shard runs it on its rows behind a window halo from the
        previous shards (`kernels.sequence_shard_attention`)."""
        cfg = self.cfg
        impl = implementation or cfg.attention_impl
        b, s, h, d = q.shape
        q_names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

        def attend(q, kv, sink, segment_ids, entries, valid, picks, impl=impl, **shard_rows):
            # shard_rows: a sequence shard's query_offset / offset_range / compressed_segments
            return sparse_attention(q, kv, sink, window=cfg.sliding_window,
                                    scale=self.softmax_scale, segment_ids=segment_ids,
                                    compressed=entries, compressed_valid=valid, ratio=self.ratio,
                                    topk_idx=picks, implementation=impl, return_lse=True,
                                    **shard_rows)
        sink = self.sink[...]
        if not kernels.choose(SPARSE_ATTENTION, impl):
            return attend(q, kv, sink, segment_ids, entries, valid, picks)
        rows = ("activation_batch", "activation_length")
        whole = ("activation_batch", "activation_kv_length")
        # the entries' documents, for a sequence shard's block-sparse call over every entry
        entry_seg = (None if entries is None or picks is not None or segment_ids is None
                     else masks.entry_segments(segment_ids, entries.shape[1], self.ratio))

        def attend_shard(shard, q, kv, sink, segment_ids, entries, valid, picks, entry_seg):
            return kernels.sequence_shard_attention(
                shard, attend, q, kv, sink, segment_ids, entries, valid, picks, entry_seg,
                window=cfg.sliding_window, ratio=self.ratio)
        return kernels.kernel_call(
            lambda *a: attend(*a[:-1]),
            [("q", q, q_names), ("kv", kv, rows + ("activation_kv",)),
             ("sink", sink, ("activation_heads",)), ("segment_ids", segment_ids, rows),
             ("entries", entries, whole + ("activation_kv",)), ("entries_valid", valid, whole),
             ("topk", picks, rows + (None,)), ("entry_segments", entry_seg, whole)],
            [((b, s, h, d), q.dtype, q_names), ((b, s, h), jnp.float32, q_names[:3])],
            what=f"sparse attention ({impl or 'the target preference'})",
            sequence_fn=attend_shard)

    # ------------------------------------------------------------------ the two key sources
    def _attend_row(self, x, q, q_latent, kv, positions, segment_ids, *, sparse, implementation,
                    topk, topk_limit, record):
        inv_freq = self.inv_freq
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
        kv = constrain(kv, ("activation_batch", "activation_kv_length", "activation_kv"))
        entries = valid = picks = scores = None
        recorded = {}
        if self.compressor is not None:
            entries, valid = self.compressor(x, positions, inv_freq, segment_ids)
            entries = constrain(entries, ("activation_batch", "activation_kv_length", "activation_kv"))
            if self.indexer is not None and not isinstance(self.indexer, Indexer):
                # an ablation selector (model/selectors.py) runs the attention over its picks
                return self.indexer.attend_row(self, x, q, q_latent, kv, positions, segment_ids,
                                               entries, valid, sparse=sparse,
                                               implementation=implementation, topk=topk,
                                               record=record)
            if self.indexer is not None:
                impl = implementation or self.cfg.attention_impl
                # The indexer's "reference" form is the naive [B, S, N] score matrix; the model's
                # "reference" names the attention math (the query-chunked dense arm of
                # bench_train), so the selection takes the indexer's query-chunked "xla" form
                # there: the same picks, and no O(S x N) buffer on any training path.
                scores, picks, recorded = self.indexer(
                    x, q_latent, positions, inv_freq, segment_ids,
                    stage="sparse" if sparse else "dense", k=topk, limit=topk_limit,
                    implementation="xla" if impl == "reference" else impl, record=record)
        o, lse = self._sparse_attention(q, kv, segment_ids, entries, valid,
                                        picks if sparse else None, implementation)
        stats = _zero_stats()
        sg = jax.lax.stop_gradient
        if scores is not None and picks.shape[-1] > 0 and sparse:
            # Sparse stage: KL over the selected set only (V3.2); recall on sampled queries.
            mass = selected_attention_mass(sg(q), sg(entries), sg(lse), picks, self.softmax_scale)
            stats = {"indexer_kl": indexer_objective_selected(scores, mass, picks),
                     "indexer_recall": sparse_stage_recall(q, entries, lse, valid, picks,
                                                           ratio=self.ratio,
                                                           scale=self.softmax_scale,
                                                           segment_ids=segment_ids)}
        elif scores is not None and picks.shape[-1] > 0:
            # Dense stage: KL over every visible entry and the recall of the picks, in query
            # chunks (the [B, S, N] scores and mass, [B, S, H, N] products, never exist at once).
            kl, recall = indexer_objective_chunked(
                scores.q, scores.weights, scores.keys, q, entries, lse, valid, picks,
                ratio=self.ratio, scale=self.softmax_scale, segment_ids=segment_ids)
            stats = {"indexer_kl": kl, "indexer_recall": recall}
        if record:
            recorded.update(self._record(q, kv, lse, entries, valid, picks if sparse else None,
                                         segment_ids, implementation))
        return o, stats, recorded

    def _attend_cached(self, cache, x, q, q_latent, kv, positions, lengths, n_new, *, sparse,
                       topk):
        """The chunk's compressed entries are stored before the attention, so a window
        completed by token t is seen by t's own query (spec §13.1)."""
        cfg = self.cfg
        inv_freq = self.inv_freq
        if isinstance(cache, kv_cache.FullKVCache):
            return self._attend_full_kv(cache, q, kv, positions, lengths, n_new)
        keys = jnp.concatenate([cache.window, kv.astype(cache.window.dtype)], axis=1)
        key_pos = jnp.concatenate([kv_cache.ring_positions(lengths, cache.window.shape[1]),
                                   positions], axis=1)
        comp = idx_cache = entries = picks = None
        ratio = self.ratio
        if cache.compressor is not None:     # HCA, CSA (not with dsa_tokens: raw tokens)
            comp = self.compressor.step(cache.compressor, x, positions, lengths, n_new, inv_freq)
            entries = comp.entries
        if self.indexer is not None:         # CSA: the selector's picks and the rows they index
            idx_cache, picks, entries, ratio = self.indexer.cached(
                cache.indexer, x, q_latent, kv, positions, inv_freq, lengths, n_new,
                entries=entries, select=sparse, k=topk)
        o = cached_attention(q, positions, keys, key_pos, self.sink[...],
                             window=cfg.sliding_window, scale=self.softmax_scale,
                             entries=entries, ratio=ratio, topk_idx=picks)
        new = kv_cache.LayerCache(window=kv_cache.ring_update(cache.window, kv, lengths, n_new),
                                  compressor=comp, indexer=idx_cache)
        return o, new

    def _attend_full_kv(self, cache, q, kv, positions, lengths, n_new):
        """A window-only layer over a plain full-context cache (`kv_cache.FullKVCache`): the
        chunk's rows are written in place, then the queries attend every row their window
        reaches (the dense decode baseline; a window >= max_len makes it full attention)."""
        if self.compressor is not None:
            raise ValueError(f"a {self.kind} layer has no full-KV cache form: FullKVCache "
                             "serves window-only (swa) layers")
        rows = kv_cache.write_rows(cache.kv, kv, lengths, n_new)
        key_pos = jnp.broadcast_to(jnp.arange(rows.shape[1], dtype=jnp.int32),
                                   rows.shape[:2])
        o = cached_attention(q, positions, rows, key_pos, self.sink[...],
                             window=self.cfg.sliding_window, scale=self.softmax_scale)
        return o, kv_cache.FullKVCache(kv=rows)

    def _record(self, q, kv, lse, entries, valid, picks, segment_ids, implementation):
        """What analysis reads of this layer: the attention mass of the window, the compressed
        entries and the sink [B, S, H] (`{part}_mass`); for compressed layers the visibility
        [B, S, N] and the dense attention mass per entry [B, S, N] (every visible entry
        attended: the indexer's KL target before normalising)."""
        cfg = self.cfg
        s = q.shape[1]
        out, attended = {}, None
        has_entries = entries is not None and entries.shape[1] > 0
        if self.compressor is not None:
            out["visible"] = masks.sequence_entry_visible(s, self.ratio, valid, segment_ids)
            if has_entries:
                attended = (out["visible"] if picks is None else jnp.sum(
                    jax.nn.one_hot(picks, entries.shape[1], dtype=jnp.float32), axis=-2))
        split = attention_mass_split(q, kv, self.sink[...], lse, window=cfg.sliding_window,
                                     scale=self.softmax_scale, segment_ids=segment_ids,
                                     entries=entries if attended is not None else None,
                                     attended=attended)
        out.update({f"{k}_mass": v for k, v in split.items()})
        if has_entries:
            dense_lse = lse
            if picks is not None:      # the dense softmax's lse: every visible entry attended
                _, dense_lse = self._sparse_attention(q, kv, segment_ids, entries, valid, None,
                                                      implementation)
            out["dense_mass"] = compressed_attention_mass(q, entries, dense_lse, out["visible"],
                                                          self.softmax_scale)
        return out

    # ------------------------------------------------------------------ pieces
    @property
    def inv_freq(self) -> np.ndarray:
        """[rope_head_dim // 2] inverse frequencies of this layer kind's RoPE table."""
        return rope_table(self.cfg, self.kind)

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(head_dim), no YaRN mscale (spec §4.2)."""
        return self.cfg.head_dim ** -0.5

    def project_queries(self, x, positions):
        """x [B, S, d] (normed) -> q [B, S, H, D] (per-head RMS-normed, RoPE'd) and the shared
        query latent [B, S, q_lora_rank] (also the indexer's query input)."""
        cfg = self.cfg
        b, s, _ = x.shape
        dt = x.dtype
        q_latent = self.q_norm(x @ self.wq_a[...].astype(dt))
        q = (q_latent @ self.wq_b[...].astype(dt)).reshape(b, s, cfg.num_heads, cfg.head_dim)
        return apply_rope(rms_norm(q, None, cfg.rms_norm_eps), positions, self.inv_freq), q_latent

    def project_kv(self, x, positions):
        """x [B, S, d] (normed) -> the shared K=V row of each token [B, S, D] (normed, RoPE'd)."""
        return apply_rope(self.kv_norm(x @ self.wkv[...].astype(x.dtype)), positions, self.inv_freq)

    def project_output(self, o, positions):
        """Attention output o [B, S, H, D] -> de-rotated, grouped low-rank projection [B, S, d]."""
        cfg = self.cfg
        b, s, h, hd = o.shape
        dt = o.dtype
        o = apply_rope(o, positions, self.inv_freq, inverse=True)
        g = cfg.o_groups
        u = jnp.einsum("bsgi,gio->bsgo", o.reshape(b, s, g, h // g * hd), self.wo_a[...].astype(dt))
        return u.reshape(b, s, -1) @ self.wo_b[...].astype(dt)
