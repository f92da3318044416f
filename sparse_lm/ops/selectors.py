"""Token selectors' math (issue 23): which compressed entries (or raw tokens) a query attends.

Every selector answers with an index list picks [B, S, K] int32 over its entries, -1 padding
(the contract of `ops.attention` and the kernels): a listed entry is visible, never twice.
The modules that own parameters are in `sparse_lm.model.selectors`; this file is pure math.

  dense        every visible entry (`visible_picks`): K = N.
  fixed        a static pattern over the visible entries (`fixed_pattern`): the newest `local`,
               the first `global`, and strided blocks (`block` of every `stride`, counted from
               the first visible entry), Longformer / BigBird-style; capped at K, by priority
               local > global > strided, newest first within a class (`fixed_picks`).
  dsa_tokens   the V3.2 indexer over raw tokens: entries are the tokens themselves (ratio 1),
               the ones inside the sliding window are excluded (`tokens_outside_window`).
  mlp_router   learned pair scores (`pair_mlp_scores`), fixed or adaptive k (`adaptive_k`),
               trained through `straight_through_gate` + `gated_entries_attention`.
Quality of any selection against dense attention: `dense_entry_mass`, `selection_quality`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_lm.ops.attention import attention_xla
from sparse_lm.ops.indexer import select_topk


def visible_picks(visible: jax.Array, k: int | None = None) -> jax.Array:
    """visible [B, S, N] bool -> [B, S, min(k, N)] the visible entries in ascending order, -1
    padding (k None = N: every visible entry)."""
    n = visible.shape[-1]
    order = jnp.where(visible, -jnp.arange(n, dtype=jnp.float32), -jnp.inf)
    return select_topk(order, n if k is None else k)


def _ranks(visible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, S, N] -> (rank of each entry among the query's visible ones from the first, and
    from the last), int32; meaningful where visible."""
    v = visible.astype(jnp.int32)
    from_first = jnp.cumsum(v, axis=-1) - 1
    return from_first, jnp.sum(v, axis=-1, keepdims=True) - 1 - from_first


def fixed_pattern(visible: jax.Array, *, local: int, global_: int, stride: int,
                  block: int) -> jax.Array:
    """The fixed selector's pattern [B, S, N] bool: a visible entry whose rank from the newest
    is < local, or whose rank from the first is < global_, or whose rank from the first mod
    stride is < block. Ranks count visible entries only, so documents and invalid windows
    need no special case."""
    first, last = _ranks(visible)
    return visible & ((last < local) | (first < global_) | (first % stride < block))


def fixed_picks(visible: jax.Array, k: int, *, local: int, global_: int, stride: int,
                block: int) -> jax.Array:
    """`fixed_pattern` as an index list [B, S, min(k, N)], -1 padding; when the pattern holds
    more than k entries, local ones go first, then global, then strided, newest first."""
    first, last = _ranks(visible)
    n = visible.shape[-1]
    tier = jnp.where(last < local, 3.0, jnp.where(first < global_, 2.0, 1.0))
    newest = jnp.arange(n, dtype=jnp.float32) / (n + 1)
    pattern = fixed_pattern(visible, local=local, global_=global_, stride=stride, block=block)
    return select_topk(jnp.where(pattern, tier + newest, -jnp.inf), k)


def tokens_outside_window(seq: int, window: int, segment_ids: jax.Array | None = None,
                          batch: int = 1) -> jax.Array:
    """dsa_tokens' candidates: [B, S, S] bool, token j is a candidate of query t iff
    j <= t - window (the window already attends t-W+1..t) and, with segments, j is in t's
    document."""
    t = jnp.arange(seq)
    vis = jnp.broadcast_to(t[None, :] <= t[:, None] - window, (batch, seq, seq))
    if segment_ids is not None:
        vis = vis & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return vis


def adaptive_k(count: jax.Array, fraction: float, k_max: int) -> jax.Array:
    """Visible entries per query [B, S] -> [B, S] int32 k_t = min(k_max, ceil(fraction *
    count_t)); 0 visible -> 0."""
    count = count.astype(jnp.float32)
    return jnp.minimum(jnp.ceil(fraction * count - 1e-6), k_max).astype(jnp.int32)


def limit_rows(picks: jax.Array, k_rows: jax.Array) -> jax.Array:
    """picks [B, S, K] (best first), k_rows [B, S] -> the first k_rows[b, s] picks of each query,
    the rest -1."""
    return jnp.where(jnp.arange(picks.shape[-1]) < k_rows[..., None], picks, -1)


def pair_mlp_scores(q_feat: jax.Array, e_feat: jax.Array, hidden_bias: jax.Array,
                    out_w: jax.Array) -> jax.Array:
    """The router's two-layer MLP over (query, entry) pairs, its first layer split by input:
    r[b,t,n] = out_w . relu(q_feat[b,t] + e_feat[b,n] + hidden_bias), with q_feat = W_q q_t
    [B, S, Hr] and e_feat = W_e e_n [B, N, Hr] already projected. -> [B, S, N] fp32.
    Cost per pair: 3*Hr (add, relu, multiply-add) on top of the two projections."""
    h = jax.nn.relu(q_feat[:, :, None, :].astype(jnp.float32)
                    + e_feat[:, None, :, :].astype(jnp.float32) + hidden_bias)
    return jnp.einsum("btnh,h->btn", h, out_w.astype(jnp.float32))


def picks_mask(picks: jax.Array, n: int) -> jax.Array:
    """[B, S, K] index list (-1 = none) -> [B, S, N] bool: the entry is listed."""
    return jnp.any(picks[..., None] == jnp.arange(n), axis=-2)


def straight_through_gate(scores: jax.Array, picks: jax.Array, visible: jax.Array, *,
                          temperature=1.0, noise: jax.Array | None = None):
    """The router's keep gate [B, S, N] and its relaxation, for `gated_entries_attention`:

        hard = 1[n listed in picks]                       (the forward value of the gate)
        soft = sigmoid((scores + noise) / temperature)    (visible entries; 0 elsewhere)
        gate = hard + soft - stop_gradient(soft)

    so the forward is exactly the hard selection and d gate / d scores = d soft / d scores at
    every visible entry, listed or not. ste: noise None, temperature 1. gumbel: noise =
    logistic noise log(u) - log(1 - u) (the difference of two Gumbels: the Gumbel-sigmoid /
    binary-concrete relaxation of each keep decision) and an annealed temperature.
    -> (gate, soft), fp32."""
    z = scores if noise is None else scores + noise
    soft = jnp.where(visible, jax.nn.sigmoid(z / temperature), 0.0)
    hard = picks_mask(picks, scores.shape[-1]).astype(jnp.float32)
    return hard + soft - jax.lax.stop_gradient(soft), soft


def gated_entries_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, entries: jax.Array,
                            visible: jax.Array, gate: jax.Array, *, window: int, scale: float,
                            segment_ids: jax.Array | None = None):
    """Joint window + sink + entries attention where entry n enters the softmax with a
    multiplicative gate g[b,t,n] >= 0 on its unnormalised probability:

        out = (Z_ws * o_ws + sum_n g_n e^{l_n} v_n) / (Z_ws + sum_n g_n e^{l_n}),
        lse = log(Z_ws + sum_n g_n e^{l_n}),

    (o_ws, log Z_ws) = the window + sink attention (`attention_xla` without entries), l_n the
    logits of every visible entry (dense: O(S * N * H * D), forward and backward). With g the
    0/1 selection it equals the sparse attention of that index list; its derivative in g_n,
    e^{l_n} (v_n - out) / Z, exists for unlisted entries too: the straight-through path needs
    these dense logits. q [B, S, H, D], kv [B, S, D], sink [H], entries [B, N, D], visible /
    gate [B, S, N] -> (out [B, S, H, D] in q's dtype, lse [B, S, H] fp32)."""
    o_ws, lse_ws = attention_xla(q, kv, sink, window=window, scale=scale,
                                 segment_ids=segment_ids)
    qf = q.astype(jnp.float32)
    ef = entries.astype(jnp.float32)
    logits = jnp.einsum("bshd,bnd->bshn", qf, ef) * scale
    logits = jnp.where(visible[:, :, None, :], logits, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.maximum(lse_ws, jnp.max(logits, axis=-1)))   # [B, S, H]
    w_ws = jnp.exp(lse_ws - top)
    p = jnp.exp(logits - top[..., None]) * gate.astype(jnp.float32)[:, :, None, :]
    z = w_ws + jnp.sum(p, axis=-1)
    num = w_ws[..., None] * o_ws.astype(jnp.float32) + jnp.einsum("bshn,bnd->bshd", p, ef)
    return (num / z[..., None]).astype(q.dtype), top + jnp.log(z)


def dense_entry_mass(q: jax.Array, entries: jax.Array, lse: jax.Array, visible: jax.Array,
                     picks: jax.Array | None, *, scale: float) -> jax.Array:
    """The dense attention's mass on each candidate [B, S, N] fp32 (summed over heads, 0 where
    not visible), from the lse [B, S, H] of the attention that ran over window + sink + the
    listed entries (picks [B, S, K]; None = every visible entry was attended): the dense
    softmax adds the unlisted visible entries, lse_dense = logaddexp(lse, logsumexp(their
    logits)). q [B, S, H, D], entries [B, N, D]. No gradient (a metric)."""
    sg = jax.lax.stop_gradient
    logits = jnp.einsum("bshd,bnd->bshn", sg(q).astype(jnp.float32),
                        sg(entries).astype(jnp.float32)) * scale
    lse = sg(lse).astype(jnp.float32)
    if picks is not None:
        rest = visible & ~picks_mask(picks, entries.shape[1])
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(
            jnp.where(rest[:, :, None, :], logits, -jnp.inf), axis=-1))
    return jnp.where(visible, jnp.sum(jnp.exp(logits - lse[..., None]), axis=2), 0.0)


def selection_quality(mass: jax.Array, visible: jax.Array, picks: jax.Array | None):
    """How much of dense attention a selection keeps: mass [B, S, N] (`dense_entry_mass`),
    visible [B, S, N], picks [B, S, K] (None = every visible entry) ->
      mass recall      share of the dense attention mass on the candidates that the listed
                       entries carry;
      critical recall  share of queries whose highest-mass candidate is listed;
    fp32 scalars, means over queries with a candidate carrying mass."""
    listed = visible if picks is None else picks_mask(picks, mass.shape[-1]) & visible
    total = jnp.sum(mass, axis=-1)
    has = jnp.any(visible, axis=-1) & (total > 0)
    kept = jnp.sum(jnp.where(listed, mass, 0.0), axis=-1) / jnp.where(has, total, 1.0)
    best = jnp.argmax(jnp.where(visible, mass, -1.0), axis=-1)
    hit = jnp.take_along_axis(listed, best[..., None], axis=-1)[..., 0]
    count = jnp.maximum(jnp.sum(has), 1)
    return (jnp.sum(jnp.where(has, kept, 0.0)) / count,
            jnp.sum(jnp.where(has & hit, 1.0, 0.0)) / count)
