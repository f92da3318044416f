"""Token selectors of CSA layers behind one interface (issue 23), picked by `cfg.selector`.

`make_selector(cfg)` builds the CSA layer's selector (the attribute `Attention.indexer`):
  lightning   `model.indexer.Indexer`, the V4 indexer over compressed entries (default); the
              attention runs it itself (unchanged).
  dense, fixed, dsa_tokens, mlp_router: the modules below. Each runs the layer's whole
              full-sequence attention (`attend_row`): its selection, the attention over the
              picks (through `Attention._sparse_attention`, so the xla / kernel paths take the
              index list), and its stats. All return picks [B, S, K] int32 with -1 padding.
Stats (the layer's usual keys): indexer_kl = the selector's own training objective (the loss
adds it with `loss.indexer_weight`): the KL of dsa_tokens, the weighted sparsity regulariser of
mlp_router, 0 for dense / fixed; indexer_recall = share of the dense attention mass on the
candidates that the picks keep (`ops.selectors.selection_quality`, on at most 512 sampled
queries). record=True adds topk, visible (the candidates) and dense_mass [B, S, N].

Cached path (chunked prefill, decode: `cached`, the same picks as the full forward): dense and
fixed select from positions alone; mlp_router scores the chunk's query latents against the
cached compressed entries, dsa_tokens against its per-token keys (`ops.kv_cache.TokenCache`,
which also holds the raw rows it attends), both one block of visible entries at a time with a
running top-k (`ops.visible.blocked_topk`: no [B, T, max_len / m] scores, work up to the last
visible entry only). The cache holds what each reads (`inference.cache.layer_cache`).
Every selector (and the lightning `Indexer`) has the same cached method:
  cached(cache, x, q_latent, kv, positions, inv_freq, lengths, n_new, *, entries, select, k)
  x [B, T, d] the chunk at positions [B, T], kv [B, T, D] its K=V rows, entries the layer's
  compressed-entry cache [B, N, D] (None for dsa_tokens) -> (the selector's new cache, picks
  [B, T, k] or None = every visible entry, the rows the attention reads, their compress
  ratio); select=False is the dense stage (no picks).

The mlp_router estimator, exactly (`ops.selectors.straight_through_gate`,
`gated_entries_attention`):
  scores   r[t,n] = v . relu(W_q sg(q_latent_t) + W_e sg(entry_n) + b) + c   (inputs detached:
           the router learns only through its own parameters)
  picks    top-k of r over the visible entries (fixed k = index_topk, or adaptive
           k_t = min(index_topk, ceil(fraction * visible_t))), -1 padded
  gate     g = hard + soft - sg(soft), hard = 1[n picked], soft = sigmoid((r + eps) / tau)
           (ste: eps = 0, tau = 1; gumbel: eps ~ Logistic(0, 1) per (b, t, n) resampled each
           step, tau annealed exponentially from start to end over selector_anneal_steps)
  forward  the attention with entry n's probability multiplied by g_n: its value IS the sparse
           attention of the picks (g = hard), the Gumbel noise enters only the surrogate
           gradient, so training, evaluation and inference select alike
  backward d loss / d r_n = d loss / d g_n * d soft_n / d r_n for EVERY visible entry n, with
           d out / d g_n = e^{l_n} (v_n - out) / Z: it needs the attention logit l_n of entries
           that were not picked, so training runs the dense-logit form
           (`gated_entries_attention`, O(S * N * H * D) like dense CSA, not O(S * k * H * D));
           inference can use the sparse kernels (same forward value).
  loss     + indexer_weight * selector_sparsity_weight * mean over visible entries of soft.
  cost     pair MLP: 2*c*Hr (projections) + 3*Hr per (query, entry) pair, Hr = selector_hidden.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.indexer import Indexer
from sparse_lm.model.layers import RMSNorm, param
from sparse_lm.ops import kv_cache, masks
from sparse_lm.ops import selectors as sel_ops
from sparse_lm.ops.indexer import (blocked_indexer_topk, compressed_attention_mass,
                                   indexer_objective, indexer_objective_selected, indexer_scores,
                                   sampled_rows, selected_attention_mass, select_topk)
from sparse_lm.ops.rope import apply_rope
from sparse_lm.ops.visible import INDEXER_KEY_BLOCK, block_size, blocked_topk


class SelectorClock(nnx.Variable):
    """Training steps seen by a learned selector (a buffer, advanced by the train step after
    the optimizer: `advance_selector_clocks`), for its temperature schedule and noise."""


def advance_selector_clocks(model: nnx.Module) -> None:
    """Add one to every `SelectorClock` of the model (in place; none: nothing happens)."""
    clocks = nnx.state(model, SelectorClock)
    nnx.update(model, jax.tree.map(lambda c: c + 1, clocks))


def _stats(kl, recall):
    return {"indexer_kl": jnp.asarray(kl, jnp.float32),
            "indexer_recall": jnp.asarray(recall, jnp.float32)}


class _Selector(nnx.Module):
    """Shared plumbing: the layer's attention over an index list, recall and recordings."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.topk = cfg.index_topk
        self.ratio = cfg.compress_ratio_csa

    def select(self, layer, x, q_latent, positions, segment_ids, entries, valid, *, k):
        """-> the selection: {"visible": candidates [B, S, N], "picks": [B, S, K], ...}."""
        raise NotImplementedError

    def objective(self, layer, q, rows, lse, sel, picks):
        """The selector's own training loss from the attention that ran (none: 0)."""
        return jnp.zeros((), jnp.float32)

    def entries_of(self, layer, kv, entries, valid):
        """The rows the picks index: the layer's compressed entries (dsa_tokens: raw tokens)."""
        return entries, valid

    def attend_row(self, layer, x, q, q_latent, kv, positions, segment_ids, entries, valid, *,
                   sparse: bool, implementation, topk, record: bool):
        """The layer's full-sequence attention with this selector -> (o, stats, recorded)."""
        k = self.topk if topk is None else topk
        rows, rows_valid = self.entries_of(layer, kv, entries, valid)
        if rows.shape[1] == 0:       # too short for one entry: window only
            o, _ = layer._sparse_attention(q, kv, segment_ids, None, None, None, implementation)
            return o, _stats(0.0, 0.0), {}
        sel = self.select(layer, x, q_latent, positions, segment_ids, rows, rows_valid, k=k)
        visible = sel["visible"]
        picks = sel["picks"] if sparse else None
        o, lse, extra = self.attention(layer, q, kv, segment_ids, rows, rows_valid, sel, picks,
                                       implementation)
        objective = self.objective(layer, q, rows, lse, sel, picks) + extra
        r = sampled_rows(q.shape[1], 512)
        mass = sel_ops.dense_entry_mass(q[:, r], rows, lse[:, r], visible[:, r],
                                        None if picks is None else picks[:, r],
                                        scale=layer.softmax_scale)
        recall, _ = sel_ops.selection_quality(mass, visible[:, r],
                                              None if picks is None else picks[:, r])
        recorded = {}
        if record:
            recorded = {"topk": picks, "visible": visible,
                        "dense_mass": sel_ops.dense_entry_mass(q, rows, lse, visible, picks,
                                                               scale=layer.softmax_scale)}
        return o, _stats(objective, recall), recorded

    def attention(self, layer, q, kv, segment_ids, rows, rows_valid, sel, picks,
                  implementation):
        """The attention over the picks (None: every visible entry) -> (o, lse, an extra
        objective term)."""
        o, lse = layer._sparse_attention(q, kv, segment_ids, rows, rows_valid, picks,
                                         implementation)
        return o, lse, jnp.zeros((), jnp.float32)


class DenseSelector(_Selector):
    """Every visible compressed entry (the dense CSA baseline)."""

    def select(self, layer, x, q_latent, positions, segment_ids, entries, valid, *, k):
        visible = masks.sequence_entry_visible(x.shape[1], self.ratio, valid, segment_ids)
        return {"visible": visible, "picks": None}

    def cached(self, cache, x, q_latent, kv, positions, inv_freq, lengths, n_new, *, entries,
               select: bool, k: int | None = None):
        return cache, None, entries, self.ratio    # the attention takes every visible entry


class FixedSelector(_Selector):
    """Local + global + strided compressed entries (`ops.selectors.fixed_picks`)."""

    def _picks(self, visible, k):
        c = self.cfg
        return sel_ops.fixed_picks(visible, k, local=c.fixed_local, global_=c.fixed_global,
                                   stride=c.fixed_stride, block=c.fixed_block)

    def select(self, layer, x, q_latent, positions, segment_ids, entries, valid, *, k):
        visible = masks.sequence_entry_visible(x.shape[1], self.ratio, valid, segment_ids)
        return {"visible": visible, "picks": self._picks(visible, k)}

    def cached(self, cache, x, q_latent, kv, positions, inv_freq, lengths, n_new, *, entries,
               select: bool, k: int | None = None):
        if not select:
            return cache, None, entries, self.ratio
        visible = masks.entry_visible(positions, entries.shape[1], self.ratio)
        return cache, self._picks(visible, self.topk if k is None else k), entries, self.ratio


class DSATokenSelector(_Selector):
    """DeepSeek-V3.2's indexer over raw tokens: ReLU multi-head scores of the query against one
    key per token, top-k among the tokens outside the sliding window (the window attends those
    already); the attention's entries are the layer's own K=V rows. Learns by the V3.2 KL:
    over every candidate in the dense stage, over the picked ones in the sparse stage."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg)
        nh, hd = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = param(rngs, (cfg.q_lora_rank, nh * hd), ("q_lora", "index_heads"), cfg.init_std)
        self.weights_proj = param(rngs, (cfg.hidden_size, nh), ("embed", "index_heads"), cfg.init_std)
        self.wk = param(rngs, (cfg.hidden_size, hd), ("embed", "kv"), cfg.init_std)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, "kv")
        self.n_heads, self.head_dim = nh, hd

    # the lightning indexer's query side, unchanged
    project_queries = Indexer.project_queries

    def entries_of(self, layer, kv, entries, valid):
        return kv, jnp.ones(kv.shape[:2], bool)

    def keys(self, x, positions, inv_freq):
        """One key per token [B, S, Di] (RoPE'd) from the detached layer input x [B, S, d]."""
        return apply_rope(self.k_norm(jax.lax.stop_gradient(x) @ self.wk[...].astype(x.dtype)),
                          positions, inv_freq)

    def select(self, layer, x, q_latent, positions, segment_ids, entries, valid, *, k):
        b, s, _ = x.shape
        inv_freq = layer.inv_freq
        q, w = self.project_queries(x, q_latent, positions, inv_freq)
        keys = self.keys(x, positions, inv_freq)
        cand = sel_ops.tokens_outside_window(s, self.cfg.sliding_window, segment_ids, b)
        scores = indexer_scores(q, w, keys, cand)
        return {"visible": cand, "picks": select_topk(jax.lax.stop_gradient(scores), k),
                "scores": scores}

    def objective(self, layer, q, rows, lse, sel, picks):
        """The V3.2 KL: over every candidate in the dense stage (picks None), over the picked
        ones in the sparse stage; the target is the attention's mass, without gradient."""
        sg = jax.lax.stop_gradient
        scores, visible = sel["scores"], sel["visible"]
        if picks is None:
            mass = compressed_attention_mass(sg(q), sg(rows), sg(lse), visible,
                                             layer.softmax_scale)
            return indexer_objective(scores, mass, visible, sel["picks"])[0]
        mass = selected_attention_mass(sg(q), sg(rows), sg(lse), picks, layer.softmax_scale)
        at = jnp.take_along_axis(scores, jnp.maximum(picks, 0), axis=-1)
        return indexer_objective_selected(jnp.where(picks >= 0, at, -jnp.inf), mass, picks)

    def attention(self, layer, q, kv, segment_ids, rows, rows_valid, sel, picks,
                  implementation):
        if picks is None:            # dense stage: every candidate, listed (they are not the
            picks = sel_ops.visible_picks(sel["visible"])   # causal entries of a ratio)
        return super().attention(layer, q, kv, segment_ids, rows, rows_valid, sel, picks,
                                 implementation)

    def cached(self, cache, x, q_latent, kv, positions, inv_freq, lengths, n_new, *, entries,
               select: bool, k: int | None = None):
        """The chunk's rows and keys are written first (a query may pick an earlier token of its
        own chunk); the candidates of the query at p are the tokens j <= p - W, i.e. the
        tokens visible at p - W with ratio 1."""
        if not select:
            raise ValueError("model.selector='dsa_tokens' has no dense stage on the cached path "
                             "(sparse=False would attend every token, the window included, "
                             "i.e. full attention): decode with sparse=True, or use the dense "
                             "decoder (sparse_lm.inference.dense) as the full-attention baseline")
        rows = kv_cache.write_rows(cache.kv_rows, kv, lengths, n_new)
        keys = kv_cache.write_rows(cache.index_keys, self.keys(x, positions, inv_freq),
                                   lengths, n_new)
        q, w = self.project_queries(x, q_latent, positions, inv_freq)
        picks, _ = blocked_indexer_topk(q, w, keys, positions - self.cfg.sliding_window, ratio=1,
                                        k=self.topk if k is None else k)
        return kv_cache.TokenCache(kv_rows=rows, index_keys=keys), picks, rows, 1


class MLPRouterSelector(_Selector):
    """A learned two-layer MLP over (query, entry) pairs trained jointly with the model through
    a straight-through (ste) or Gumbel-sigmoid (gumbel) gate: the estimator is written out in
    the module docstring."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg)
        hr = cfg.selector_hidden
        self.w_query = param(rngs, (cfg.q_lora_rank, hr), ("q_lora", None), cfg.init_std)
        self.w_entry = param(rngs, (cfg.head_dim, hr), ("kv", None), cfg.init_std)
        self.pair_bias = param(rngs, (hr,), (None,), 0.0)
        self.pair_out = param(rngs, (hr,), (None,), hr ** -0.5)
        self.pair_offset = param(rngs, (), (), 0.0)
        self.clock = SelectorClock(jnp.zeros((), jnp.int32))
        self.noise_seed = SelectorClock(jax.random.randint(rngs.params(), (), 0, 2 ** 30))

    def temperature(self):
        """tau(step) = start * (end / start) ** min(1, step / anneal_steps); 1 for ste."""
        t = self.cfg.selector_temperature
        if t is None:
            return jnp.float32(1.0)
        frac = jnp.minimum(1.0, self.clock[...].astype(jnp.float32) / self.cfg.selector_anneal_steps)
        return jnp.float32(t[0]) * (jnp.float32(t[1] / t[0]) ** frac)

    def query_features(self, q_latent):
        """[B, S, c] query latents (detached) -> W_q q [B, S, Hr] fp32."""
        return jax.lax.stop_gradient(q_latent).astype(jnp.float32) @ self.w_query[...]

    def pair_scores(self, q_feat, entries):
        """r [B, S, N] fp32 from query features [B, S, Hr] and entries [B, N, D] (detached)."""
        ef = jax.lax.stop_gradient(entries).astype(jnp.float32) @ self.w_entry[...]
        return (sel_ops.pair_mlp_scores(q_feat, ef, self.pair_bias[...], self.pair_out[...])
                + self.pair_offset[...])

    def scores(self, q_latent, entries):
        """r [B, S, N] fp32 from detached query latents [B, S, c] and entries [B, N, D]."""
        return self.pair_scores(self.query_features(q_latent), entries)

    def _limit(self, picks, count):
        """Adaptive k (selector_k_fraction of the `count` [B, S] visible entries) or fixed k."""
        if not self.cfg.selector_k_fraction:
            return picks
        return sel_ops.limit_rows(picks, sel_ops.adaptive_k(count, self.cfg.selector_k_fraction,
                                                            picks.shape[-1]))

    def select(self, layer, x, q_latent, positions, segment_ids, entries, valid, *, k):
        visible = masks.sequence_entry_visible(x.shape[1], self.ratio, valid, segment_ids)
        r = self.scores(q_latent, entries)
        picks = select_topk(jnp.where(visible, jax.lax.stop_gradient(r), -jnp.inf), k)
        return {"visible": visible, "picks": self._limit(picks, jnp.sum(visible, axis=-1)),
                "scores": r}

    def cached(self, cache, x, q_latent, kv, positions, inv_freq, lengths, n_new, *, entries,
               select: bool, k: int | None = None):
        """The chunk's query latents scored against the cached entries, one block of visible
        entries at a time (the pair MLP of one block: [B, T, block, Hr])."""
        if not select:
            return cache, None, entries, self.ratio
        q_feat = self.query_features(q_latent)
        n, t, hr = entries.shape[1], q_feat.shape[1], q_feat.shape[2]

        def score(rows, vis, start):
            return jnp.where(vis, self.pair_scores(q_feat, rows), -jnp.inf)
        picks, _ = blocked_topk(score, entries, positions, ratio=self.ratio,
                                k=self.topk if k is None else k,
                                block=block_size(INDEXER_KEY_BLOCK, t * hr, n))
        count = jnp.clip(masks.visible_entry_count(positions, self.ratio), 0, n)
        return cache, self._limit(picks, count), entries, self.ratio

    def attention(self, layer, q, kv, segment_ids, rows, rows_valid, sel, picks,
                  implementation):
        """The gated dense-logit attention (the estimator of the module docstring) and the
        weighted sparsity regulariser: the mean relaxed gate over visible entries."""
        if picks is None:
            return super().attention(layer, q, kv, segment_ids, rows, rows_valid, sel, None,
                                     implementation)
        visible = sel["visible"]
        noise = None
        if self.cfg.selector_estimator == "gumbel":
            key = jax.random.fold_in(jax.random.key(self.noise_seed[...]), self.clock[...])
            noise = jax.random.logistic(key, visible.shape, jnp.float32)
        gate, soft = sel_ops.straight_through_gate(sel["scores"], picks, visible,
                                                   temperature=self.temperature(), noise=noise)
        o, lse = sel_ops.gated_entries_attention(q, kv, layer.sink[...], rows, visible, gate,
                                                 window=self.cfg.sliding_window,
                                                 scale=layer.softmax_scale,
                                                 segment_ids=segment_ids)
        sparsity = jnp.sum(soft) / jnp.maximum(jnp.sum(visible), 1)
        return o, lse, self.cfg.selector_sparsity_weight * sparsity


def make_selector(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The CSA layer's selector for `cfg.selector` (config.SELECTORS)."""
    if cfg.selector == "lightning":
        return Indexer(cfg, rngs=rngs)
    if cfg.selector == "dense":
        return DenseSelector(cfg)
    if cfg.selector == "fixed":
        return FixedSelector(cfg)
    if cfg.selector == "dsa_tokens":
        return DSATokenSelector(cfg, rngs=rngs)
    return MLPRouterSelector(cfg, rngs=rngs)
