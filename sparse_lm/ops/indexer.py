"""Lightning indexer (spec §6): ReLU multi-head scores over compressed keys, then top-k.

Top-k picks are indices into the compressed entries; an unused pick is -1 (never clamped to 0:
entry 0 is a real entry). `lax.top_k` breaks ties by the lower index.
"""
import jax
import jax.numpy as jnp

from sparse_lm.ops import masks, visible
from sparse_lm.ops.attention import flat_scores


def indexer_scores(q: jax.Array, weights: jax.Array, keys: jax.Array, visible: jax.Array, *,
                   precision=None, flat: bool = False) -> jax.Array:
    """I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s]); invisible entries get -inf.

    q [B, S, Hi, Di], weights [B, S, Hi] (already scaled), keys [B, N, Di], visible [B, S, N].
    Returns [B, S, N] fp32. precision: of both products (the compiled kernels' tests ask for
    HIGHEST). flat: the dot products as one matmul per row with the query and head axes
    flattened (`ops.attention.flat_scores`: no transposed copy of cached keys on XLA:CPU).
    """
    qf, kf = q.astype(jnp.float32), keys.astype(jnp.float32)
    if flat:
        scores = head_weighted_sum(jax.nn.relu(flat_scores(qf, kf)), weights)
    else:
        dots = jnp.einsum("bthd,bsd->bths", qf, kf, precision=precision)
        scores = jnp.einsum("bths,bth->bts", jax.nn.relu(dots), weights.astype(jnp.float32),
                            precision=precision)
    return jnp.where(visible, scores, -jnp.inf)


def head_weighted_sum(terms: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_h weights[b,t,h] * terms[b,t,h,n] as a sum of Hi row terms, h in order: terms
    [B, T, Hi, N], weights [B, T, Hi] -> [B, T, N] fp32. On XLA:CPU the einsum form becomes a
    batched matrix-vector product over the head axis, a second pass over the products; the
    row sum fuses with the ReLU into one elementwise pass."""
    w = weights.astype(jnp.float32)
    out = terms[:, :, 0] * w[:, :, 0, None]
    for h in range(1, terms.shape[2]):
        out = out + terms[:, :, h] * w[:, :, h, None]
    return out


def indexer_head_scores(q: jax.Array, weights: jax.Array, keys: jax.Array,
                        visible: jax.Array) -> jax.Array:
    """The per-head terms of `indexer_scores`: [B, S, Hi, N] fp32 = weights[b,t,h] *
    relu(q[b,t,h] . keys[b,n]), 0 where not visible (for analysis: which heads pick what).
    q [B, S, Hi, Di], weights [B, S, Hi], keys [B, N, Di], visible [B, S, N]."""
    dots = jnp.einsum("bthd,bnd->bthn", q.astype(jnp.float32), keys.astype(jnp.float32))
    s = jax.nn.relu(dots) * weights.astype(jnp.float32)[..., None]
    return jnp.where(visible[:, :, None, :], s, 0.0)


def select_topk(scores: jax.Array, k: int) -> jax.Array:
    """[B, S, N] scores (-inf = not visible) -> [B, S, min(k, N)] int32 indices, -1 where unused."""
    n = scores.shape[-1]
    k_eff = min(k, n)
    if k_eff == 0:
        return jnp.zeros(scores.shape[:-1] + (0,), jnp.int32)
    vals, idx = jax.lax.top_k(scores, k_eff)
    return jnp.where(jnp.isfinite(vals), idx, -1).astype(jnp.int32)


# A decode step of a small indexer (T * Hi * Di products per key at most this many) scores a key
# block with unrolled multiply-adds over key columns read straight from the cache: one
# elementwise pass over the block, where the matmul form first copies the block out of the cache
# and writes [T * Hi, block] products. One query x 4 heads x 16 over 262,144 keys, top-16:
# 4.1 -> 1.9 ms (`benchmarks/visible_blocks/cpu_1_{before,after}.json`, a loaded 2-core CPU).
FMA_TERMS = 256


def fma_scores(q: jax.Array, weights: jax.Array, column) -> jax.Array:
    """`sum_h w[b,t,h] * relu(q[b,t,h] . k[b,n])` as T * Hi * Di unrolled multiply-adds, d then h
    in order: q [B, T, Hi, Di], weights [B, T, Hi], column(j) -> key column j [B, n] fp32 ->
    [B, T, n] fp32."""
    b, t, h, d = q.shape
    qf, w = q.astype(jnp.float32), weights.astype(jnp.float32)
    cols = [column(j)[:, None, :] for j in range(d)]                       # [B, 1, n] each
    out = []
    for i in range(t):
        acc = None
        for head in range(h):
            dot = cols[0] * qf[:, i, head, 0, None, None]
            for j in range(1, d):
                dot = dot + cols[j] * qf[:, i, head, j, None, None]
            term = jax.nn.relu(dot) * w[:, i, head, None, None]
            acc = term if acc is None else acc + term
        out.append(acc)
    return jnp.concatenate(out, axis=1)


def block_scorer(q: jax.Array, weights: jax.Array, keys: jax.Array, block: int):
    """The cached path's scores of one key block, `ops.visible.blocked_topk`'s `score_block`:
    score(rows [B, block, Di], visible [B, T, block], start) -> [B, T, block] fp32, -inf where
    not visible. Small decode steps (T * Hi * Di <= FMA_TERMS) read the block's key columns
    from the whole cache at `start` with `fma_scores` (the `rows` copy is then unused and
    removed by XLA); larger ones take the matmul form of `indexer_scores(flat=True)`."""
    t, h, d = q.shape[1:]
    b = keys.shape[0]
    if t * h * d > FMA_TERMS:
        return lambda rows, vis, start: indexer_scores(q, weights, rows, vis, flat=True)

    def score(rows, vis, start):
        def column(j):
            col = jax.lax.dynamic_slice(keys, (0, start, j), (b, block, 1))
            return col[..., 0].astype(jnp.float32)
        return jnp.where(vis, fma_scores(q, weights, column), -jnp.inf)
    return score


def blocked_indexer_topk(q: jax.Array, weights: jax.Array, keys: jax.Array, q_pos: jax.Array, *,
                         ratio: int, k: int, block: int | None = None):
    """`select_topk(indexer_scores(q, weights, keys, masks.entry_visible(q_pos, N, ratio),
    flat=True), k)` over the visible key blocks only.

    q [B, T, Hi, Di], weights [B, T, Hi], keys [B, N, Di] (the indexer cache), q_pos [B, T]
    -> (topk [B, T, min(k, N)] int32, -1 where fewer are visible; blocks run, int32 scalar).
    block: entries per step (None = `ops.visible.block_size`).
    Same picks in the same order as over the whole row (`ops.visible.blocked_topk`), up to the
    summation order of the scores (`block_scorer`).
    """
    t, n = q.shape[1], keys.shape[1]
    block = max(1, min(block or visible.block_size(visible.INDEXER_KEY_BLOCK, t * q.shape[2], n),
                       n))
    return visible.blocked_topk(block_scorer(q, weights, keys, block), keys, q_pos, ratio=ratio,
                                k=k, block=block)


def compressed_attention_mass(q: jax.Array, entries: jax.Array, lse: jax.Array,
                              visible: jax.Array, scale: float) -> jax.Array:
    """Probability the main attention puts on each compressed entry, summed over heads.

    q [B, S, H, D], entries [B, N, D], lse [B, S, H] of the joint softmax, visible [B, S, N]
    -> [B, S, N] fp32 (0 where not visible).
    """
    logits = jnp.einsum("bshd,bnd->bshn", q.astype(jnp.float32), entries.astype(jnp.float32)) * scale
    p = jnp.exp(logits - lse[..., None])
    return jnp.where(visible, jnp.sum(p, axis=2), 0.0)


def _kl_rows(scores: jax.Array, mass: jax.Array, allowed: jax.Array):
    """Per-query KL(target || softmax(scores)) over the `allowed` entries, target = `mass`
    (no gradient) L1-normalised over them. [B, S, N] each -> (kl [B, S], target [B, S, N],
    has [B, S]: the query has an allowed entry carrying mass)."""
    mass = jax.lax.stop_gradient(mass)
    total = jnp.sum(mass, axis=-1)
    has = jnp.any(allowed, axis=-1) & (total > 0)
    target = mass / jnp.where(has, total, 1.0)[..., None]
    logq = jax.nn.log_softmax(jnp.where(allowed, scores, -1e30), axis=-1)
    kl = jnp.sum(jnp.where(allowed & (target > 0),
                           target * (jnp.log(jnp.maximum(target, 1e-30)) - logq), 0.0), axis=-1)
    return kl, target, has


def indexer_objective(scores: jax.Array, mass: jax.Array, visible: jax.Array,
                      selected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KL(target || softmax(scores)) and the recall of the selection.

    scores [B, S, N] (-inf where invisible); mass [B, S, N] dense attention mass on entries;
    selected [B, S, K] top-k indices (-1 = none). The KL target is `mass` L1-normalised over the
    visible entries (the V3.2 recipe applied to compressed entries, spec §6). Recall = share of
    that mass on the selected entries. Both are means over queries that see at least one entry.
    """
    kl_rows, target, has = _kl_rows(scores, mass, visible)
    n = scores.shape[-1]
    picked = jnp.sum(jax.nn.one_hot(selected, n, dtype=jnp.float32), axis=-2) > 0
    recall_rows = jnp.sum(jnp.where(picked, target, 0.0), axis=-1)
    count = jnp.maximum(jnp.sum(has), 1)
    return (jnp.sum(jnp.where(has, kl_rows, 0.0)) / count,
            jnp.sum(jnp.where(has, recall_rows, 0.0)) / count)


def indexer_objective_chunked(q: jax.Array, weights: jax.Array, keys: jax.Array,
                              q_attn: jax.Array, entries: jax.Array, lse: jax.Array,
                              valid: jax.Array, selected: jax.Array, *, ratio: int, scale: float,
                              segment_ids: jax.Array | None = None,
                              chunk: int = 256) -> tuple[jax.Array, jax.Array]:
    """`indexer_objective(indexer_scores(...), compressed_attention_mass(...), visible, selected)`
    over query chunks: the [B, S, N] scores and attention mass (and their [B, S, H, N]
    products) never exist at once; memory is O(chunk * N * max(Hi, H)), forward and backward
    (each chunk is rematerialised in the backward pass).

    q [B, S, Hi, Di], weights [B, S, Hi], keys [B, N, Di] (the indexer's; gradients flow to
    them), q_attn [B, S, H, D], entries [B, N, D], lse [B, S, H] (the main attention's; no
    gradient), valid [B, N], selected [B, S, K] -> (kl, recall) as `indexer_objective`.
    """
    b, s = q.shape[:2]
    n = keys.shape[1]
    chunk = max(1, min(int(chunk), s))
    pad = -s % chunk
    nc = (s + pad) // chunk

    def padded(x, value=0):
        return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    sg = jax.lax.stop_gradient
    qp, wp, sel = padded(q), padded(weights), padded(selected, -1)
    qa, lsep = padded(sg(q_attn)), padded(sg(lse))
    seg_q = None if segment_ids is None else padded(segment_ids)
    seg_e = None if segment_ids is None else masks.entry_segments(segment_ids, n, ratio)
    entries = sg(entries)

    @jax.checkpoint
    def one(carry, c):
        kl_sum, recall_sum, count = carry
        rows = c * chunk + jnp.arange(chunk)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)  # noqa: E731
        vis = masks.entry_visible(rows, n, ratio, valid, None if seg_q is None else take(seg_q),
                                  seg_e) & (rows < s)[:, None]
        scores = indexer_scores(take(qp), take(wp), keys, vis)
        mass = compressed_attention_mass(take(qa), entries, take(lsep), vis, scale)
        kl, recall = indexer_objective(scores, mass, vis, take(sel))
        has = jnp.sum(jnp.any(vis, axis=-1) & (jnp.sum(sg(mass), axis=-1) > 0))
        return (kl_sum + kl * has, recall_sum + recall * has, count + has), None

    zero = jnp.zeros((), jnp.float32)
    (kl_sum, recall_sum, count), _ = jax.lax.scan(one, (zero, zero, jnp.zeros((), jnp.int32)),
                                                  jnp.arange(nc))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    return kl_sum / denom, recall_sum / denom


# ---------------------------------------------------------------- sparse stage (spec §6, V3.2)
def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, D], idx [B, S, K] (-1 = unused, read as row 0) -> [B, S, K, D]."""
    return jax.vmap(lambda xb, ib: xb[jnp.maximum(ib, 0)])(x, idx)


def indexer_scores_selected(q: jax.Array, weights: jax.Array, keys: jax.Array,
                            selected: jax.Array) -> jax.Array:
    """`indexer_scores` at the selected entries only: [B, S, K] fp32, -inf where the pick is -1.

    q [B, S, Hi, Di], weights [B, S, Hi], keys [B, N, Di], selected [B, S, K]. O(S * K) work,
    forward and backward (the sparse stage's KL needs no gradient through the other entries).
    """
    k = gather_rows(keys.astype(jnp.float32), selected)
    dots = jnp.einsum("bthd,btkd->bthk", q.astype(jnp.float32), k)
    scores = jnp.einsum("bthk,bth->btk", jax.nn.relu(dots), weights.astype(jnp.float32))
    return jnp.where(selected >= 0, scores, -jnp.inf)


def selected_attention_mass(q: jax.Array, entries: jax.Array, lse: jax.Array,
                            selected: jax.Array, scale: float) -> jax.Array:
    """`compressed_attention_mass` at the selected entries: [B, S, K] fp32 (0 where -1)."""
    e = gather_rows(entries.astype(jnp.float32), selected)
    logits = jnp.einsum("bshd,bskd->bshk", q.astype(jnp.float32), e) * scale
    p = jnp.sum(jnp.exp(logits - lse[..., None]), axis=2)
    return jnp.where(selected >= 0, p, 0.0)


def indexer_objective_selected(scores_sel: jax.Array, mass_sel: jax.Array,
                               selected: jax.Array) -> jax.Array:
    """Sparse-stage KL (V3.2, spec §6): KL(target || softmax(scores)) over the selected set only,
    target = the main attention's mass on the selected entries, L1-normalised over them.

    scores_sel [B, S, K] (-inf where the pick is -1), mass_sel [B, S, K], selected [B, S, K].
    Mean over queries with at least one selected entry carrying mass.
    """
    kl_rows, _, has = _kl_rows(scores_sel, mass_sel, selected >= 0)
    count = jnp.maximum(jnp.sum(has), 1)
    return jnp.sum(jnp.where(has, kl_rows, 0.0)) / count


def sampled_rows(seq: int, samples: int) -> jax.Array:
    """min(seq, samples) evenly strided query rows ending at the last one (all rows if seq <= samples)."""
    n = min(seq, samples)
    return jnp.asarray([(i + 1) * seq // n - 1 for i in range(n)], jnp.int32)


def sparse_stage_recall(q: jax.Array, entries: jax.Array, lse_sparse: jax.Array, valid: jax.Array,
                        selected: jax.Array, *, ratio: int, scale: float,
                        segment_ids: jax.Array | None = None, samples: int = 512) -> jax.Array:
    """Indexer recall during the sparse stage (a metric, no gradient): the share of the DENSE
    attention mass on compressed entries that the top-k keeps, as `indexer_objective`'s recall,
    measured on `sampled_rows(S, samples)` queries (exact when S <= samples), so it costs
    O(samples * N) instead of O(S * N).

    The sparse attention's lse covers window + sink + selected entries; the dense one adds every
    visible unselected entry: lse_dense = logaddexp(lse_sparse, logsumexp(unselected logits)).
    q [B, S, H, D], entries [B, N, D], lse_sparse [B, S, H], valid [B, N], selected [B, S, K].
    """
    sg = jax.lax.stop_gradient
    b, s = q.shape[:2]
    n = entries.shape[1]
    rows = sampled_rows(s, samples)
    qs = sg(q)[:, rows].astype(jnp.float32)
    lse = sg(lse_sparse)[:, rows]
    sel = selected[:, rows]
    vis = masks.entry_visible(rows, n, ratio, valid,
                              None if segment_ids is None else segment_ids[:, rows],
                              None if segment_ids is None else masks.entry_segments(
                                  segment_ids, n, ratio))
    logits = jnp.einsum("bshd,bnd->bshn", qs, sg(entries).astype(jnp.float32)) * scale
    picked = jnp.any(sel[..., None] == jnp.arange(n), axis=-2) & vis          # [B, R, N]
    rest = jnp.where((vis & ~picked)[:, :, None, :], logits, -jnp.inf)
    lse_dense = jnp.logaddexp(lse, jax.nn.logsumexp(rest, axis=-1))
    mass = jnp.where(vis, jnp.sum(jnp.exp(logits - lse_dense[..., None]), axis=2), 0.0)
    total = jnp.sum(mass, axis=-1)
    has = jnp.any(vis, axis=-1) & (total > 0)
    kept = jnp.sum(jnp.where(picked, mass, 0.0), axis=-1) / jnp.where(has, total, 1.0)
    return jnp.sum(jnp.where(has, kept, 0.0)) / jnp.maximum(jnp.sum(has), 1)
