"""Joint window + compressed attention with a per-head sink (spec §4.4-4.5): the one math.

Query t attends, in one softmax:
  * window: raw keys t-W+1 .. t of its own document (W = sliding window, t itself included);
  * compressed entries: either the entries listed in `topk_idx` (CSA; -1 = no entry; a duplicate
    listing counts once per listing, as in a gather kernel; the list is trusted: the selector
    only lists visible entries) or, without `topk_idx`, every visible entry (HCA, and CSA's
    dense warm-up);
  * the sink: a per-head logit in the denominator with no value.
KV is a single shared head (MQA) and doubles as the value (V = K). Who sees what is decided by
`sparse_lm.ops.masks` from positions.

Three forms of the same math, each returning (out, lse), lse fp32 with the sink included:
  attention_reference  dense masked over all S window keys and all N entries, fp32; obviously
                       correct (the kernels' references are this function).
  attention_xla        window as a blocked band (S*2W), listed entries gathered per query in
                       query chunks (S*k), all visible entries dense in query chunks (HCA);
                       operands stay in the compute dtype, products and softmax in fp32.
  cached_attention     chunk queries at positions q_pos against cached keys at key_pos (the
                       ring buffer + the chunk's rows; decode and chunked prefill), the
                       cache's entries read only up to the last visible block.
Each is a sum of softmax *parts* (window, entries) merged exactly by their lse with the sink
(`_part`, `_merge`). This module imports no kernel: the implementation switch that also reaches
the Pallas kernels is `sparse_lm.ops.implementations.sparse_attention`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sparse_lm.ops import masks, visible
from sparse_lm.ops.chunking import map_sequence_chunks

# Queries per step of the top-k part: bounds its largest temporaries (the gathered rows and
# their gradient, [B, chunk, K, D]) instead of holding them for all S queries (V4-Flash at
# S=4096: 2 GB per copy in bf16).
TOPK_QUERY_CHUNK = 512
# Queries per step of the dense reference on long rows (its [B, chunk, H, keys] logits bound
# its memory).
REFERENCE_QUERY_CHUNK = 1024


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated and returned in fp32 (operands in their own dtype)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def flat_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
    """q [B, T, H, D], keys [B, N, D] -> [B, T, H, N] fp32 dot products, the chunk and head axes
    flattened into one matmul per row: on XLA:CPU the four-axis einsum ("bthd,bnd->bthn") made a
    transposed copy of the whole key array on every call (O(N) extra work per decode step)."""
    b, t, h, d = q.shape
    return _mm("bxd,bnd->bxn", q.reshape(b, t * h, d), keys).reshape(b, t, h, -1)


def flat_values(probs: jax.Array, values: jax.Array) -> jax.Array:
    """probs [B, T, H, N], values [B, N, D] -> [B, T, H, D] fp32 (flattened like `flat_scores`)."""
    b, t, h, n = probs.shape
    return _mm("bxn,bnd->bxd", probs.reshape(b, t * h, n), values).reshape(b, t, h, -1)


def _part(logits: jax.Array, weigh, dtype):
    """Softmax over one part of the key set: logits [..., n] fp32 (masked = -inf); weigh(p) maps
    the unnormalized probabilities [..., n] to their weighted values [..., D] -> (the part's
    normalized output in `dtype`, its lse fp32 [...]; -inf where all n are masked)."""
    m = jnp.max(logits, axis=-1)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(logits - m[..., None])
    l = jnp.sum(e, axis=-1)
    l_safe = jnp.maximum(l, 1e-30)
    o = weigh(e) / l_safe[..., None]
    return o.astype(dtype), jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _merge(parts, sink: jax.Array, dtype):
    """[(out_i, lse_i)] + the sink logit per head -> (out in `dtype`, lse fp32): one softmax over
    the union of the parts' keys and the sink. The window part always has the query's own
    token, so the total lse is finite."""
    lse0 = parts[0][1]
    sink_l = jnp.broadcast_to(sink.astype(jnp.float32), lse0.shape)
    lse = functools.reduce(jnp.logaddexp, [p[1] for p in parts] + [sink_l])
    out = sum(jnp.exp(p[1] - lse)[..., None] * p[0].astype(jnp.float32) for p in parts)
    return out.astype(dtype), lse


def _masked(mask: jax.Array, logits: jax.Array) -> jax.Array:
    """mask [B, T, K] over logits [B, T, H, K]."""
    return jnp.where(mask[:, :, None, :], logits, -jnp.inf)


def _gathered_part(q, entries, topk_idx, scale, dtype):
    """The listed entries' part: q [B, T, H, D], entries [B, N, D], topk_idx [B, T, K] (-1 =
    none) -> (out [B, T, H, D], lse [B, T, H]). Rows are gathered from the entries in their own
    dtype (an fp32 copy, so that their gradient accumulates in fp32) and multiplied in q's."""
    n = entries.shape[1]
    safe = jnp.clip(topk_idx, 0, max(n - 1, 0))                 # address only; -1 is masked
    rows = jnp.take_along_axis(entries[:, None], safe[..., None], axis=2).astype(q.dtype)
    logits = _mm("bthd,btkd->bthk", q, rows) * scale
    return _part(_masked(topk_idx >= 0, logits),
                 lambda p: _mm("bthk,btkd->bthd", p.astype(rows.dtype), rows), dtype)


def _dense_part(q, keys, mask, scale, dtype, log_weight=None, flat=False):
    """Every key of `keys` [B, K, D] under mask [B, T, K] (log_weight [B, T, K] is added to
    the logits: log(count) for keys listed several times) -> (out, lse). flat: the flattened
    matmuls of the cached path (`flat_scores`); the full forward keeps the head axis apart, so
    that a sequence or head axis split over devices stays split."""
    if flat:
        logits = flat_scores(q, keys) * scale
        weigh = lambda p: flat_values(p.astype(keys.dtype), keys)        # noqa: E731
    else:
        logits = _mm("bthd,bkd->bthk", q, keys) * scale
        weigh = lambda p: _mm("bthk,bkd->bthd", p.astype(keys.dtype), keys)  # noqa: E731
    if log_weight is not None:
        logits = logits + log_weight[:, :, None, :]
    return _part(_masked(mask, logits), weigh, dtype)


def _selection_counts(topk_idx: jax.Array, n: int) -> jax.Array:
    """[B, S, K] indices (-1 = none) -> [B, S, N] how often each entry is listed."""
    return jnp.sum(jax.nn.one_hot(topk_idx, n, dtype=jnp.float32), axis=-2)


def _entries_part_dense(q, compressed, vis_or_topk, scale, dtype):
    """All visible entries (a [B, S, N] mask) or the listed ones counted densely (topk [B, S, K]
    int) as one dense part over the N entries."""
    if jnp.issubdtype(vis_or_topk.dtype, jnp.integer):
        counts = _selection_counts(vis_or_topk, compressed.shape[1])
        return _dense_part(q, compressed, counts > 0, scale, dtype,
                           jnp.log(jnp.maximum(counts, 1.0)))
    return _dense_part(q, compressed, vis_or_topk, scale, dtype)


def blocked_entries_part(q: jax.Array, entries: jax.Array, q_pos: jax.Array, *, ratio: int,
                         scale: float, block: int | None = None):
    """The part of every visible cached entry (`_dense_part` over `masks.entry_visible`) over
    the visible blocks only, merged by lse (online softmax).

    q [B, T, H, D] fp32, entries [B, N, D] (any dtype; each block is read in fp32), q_pos
    [B, T] -> (out [B, T, H, D] fp32, lse [B, T, H] fp32, -inf where nothing is visible;
    blocks run, int32 scalar). block: entries per step (None = `ops.visible.block_size`)."""
    b, t, h, d = q.shape
    n = entries.shape[1]
    block = min(block or visible.block_size(visible.ENTRIES_BLOCK, t * h, n), n)

    def step(carry, rows, row_idx, vis):
        out, lse = carry
        o_blk, lse_blk = _dense_part(q, rows.astype(jnp.float32), vis, scale, jnp.float32,
                                     flat=True)
        new = jnp.logaddexp(lse, lse_blk)
        safe = jnp.where(jnp.isfinite(new), new, 0.0)
        return (jnp.exp(lse - safe)[..., None] * out + jnp.exp(lse_blk - safe)[..., None] * o_blk,
                new)

    init = (jnp.zeros((b, t, h, d), jnp.float32), jnp.full((b, t, h), -jnp.inf, jnp.float32))
    (out, lse), ran = visible.fold_visible_blocks(entries, q_pos, ratio, block, step, init)
    return out, lse, ran


# ------------------------------------------------------------------------- the three forms
def attention_reference(q: jax.Array, kv: jax.Array, sink: jax.Array, *, window: int,
                        scale: float, segment_ids: jax.Array | None = None,
                        compressed: jax.Array | None = None,
                        compressed_valid: jax.Array | None = None, ratio: int = 0,
                        topk_idx: jax.Array | None = None, query_chunk: int | None = -1):
    """Dense masked attention of a packed row, fp32. q [B, S, H, D]; kv [B, S, D]; sink [H];
    compressed [B, N, D] with compressed_valid [B, N] (None = all valid) and `ratio`;
    topk_idx [B, S, K] int32 or None -> (out [B, S, H, D] in q's dtype, lse [B, S, H] fp32).

    Every query is scored against every key its window can reach and every entry, under the
    masks. Rows longer than REFERENCE_QUERY_CHUNK go in contiguous query chunks, each against
    the keys from its first query's window start to its last query (no masked-out block is
    computed: ~S^2/2 work at window >= S, as a causal flash kernel), each rematerialized in the
    backward pass: the dense arm of the training benchmark runs this at S = 16K.
    query_chunk: -1 = REFERENCE_QUERY_CHUNK; None = every query at once (the dense-mask
    formulation whose memory the kernels' AOT reports compare against)."""
    b, s = q.shape[:2]
    has_entries = compressed is not None and compressed.shape[1] > 0
    entries = seg_e = valid = None
    if has_entries:
        n = compressed.shape[1]
        entries = compressed.astype(jnp.float32)
        valid = jnp.ones((b, n), bool) if compressed_valid is None else compressed_valid
        seg_e = None if segment_ids is None else masks.entry_segments(segment_ids, n, ratio)

    def chunk(qc, kc, t0, k0, qseg, kseg, sel):
        rows = t0 + masks.row_positions(b, qc.shape[1])
        krows = k0 + masks.row_positions(b, kc.shape[1])
        mask_w = masks.window_visible(rows, krows, window, qseg, kseg)
        qf = qc.astype(jnp.float32)
        parts = [_dense_part(qf, kc.astype(jnp.float32), mask_w, scale, jnp.float32)]
        if has_entries:
            if sel is None:
                sel = masks.entry_visible(rows, entries.shape[1], ratio, valid, qseg, seg_e)
            parts.append(_entries_part_dense(qf, entries, sel, scale, jnp.float32))
        return _merge(parts, sink, q.dtype)

    def piece(x, lo, hi):
        return None if x is None else x[:, lo:hi]
    sel_all = topk_idx if has_entries else None
    if query_chunk == -1:
        query_chunk = REFERENCE_QUERY_CHUNK
    if query_chunk is None or s <= query_chunk:
        return chunk(q, kv, 0, 0, segment_ids, segment_ids, sel_all)
    outs, lses = [], []
    for t0 in range(0, s, query_chunk):
        t1 = min(s, t0 + query_chunk)
        k0 = max(0, t0 - window + 1)
        step = jax.checkpoint(functools.partial(chunk, t0=t0, k0=k0))
        o, l = step(q[:, t0:t1], kv[:, k0:t1], qseg=piece(segment_ids, t0, t1),
                    kseg=piece(segment_ids, k0, t1), sel=piece(sel_all, t0, t1))
        outs.append(o)
        lses.append(l)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)


def _window_band(q, kv, segment_ids, window, scale, dtype):
    """The window part as a blocked band: query block j (W queries) sees key blocks j-1 and j,
    since the band [t-W+1, t] never reaches further. Cost S*2W. -> (out, lse) [B, S, ...]."""
    b, s, h, d = q.shape
    w = window
    nb = -(-s // w)
    pad = nb * w - s
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, w, h, d)
    kvp = jnp.pad(kv, ((0, 0), (0, pad), (0, 0))).reshape(b, nb, w, d)
    keys = jnp.concatenate([jnp.pad(kvp[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0))), kvp], axis=2)
    qpos = jnp.arange(nb)[:, None] * w + jnp.arange(w)[None, :]                 # [nb, W]
    kpos = (jnp.arange(nb)[:, None] - 1) * w + jnp.arange(2 * w)[None, :]       # [nb, 2W]
    qseg = kseg = None
    if segment_ids is not None:
        segp = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(b, nb, w)
        qseg = segp
        kseg = jnp.concatenate(
            [jnp.pad(segp[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1), segp], axis=2)
    mask = jnp.broadcast_to(masks.window_visible(qpos, kpos, w, qseg, kseg), (b, nb, w, 2 * w))
    logits = _mm("bnqhd,bnkd->bnqhk", qp, keys) * scale
    o, lse = _part(jnp.where(mask[:, :, :, None, :], logits, -jnp.inf),
                   lambda p: _mm("bnqhk,bnkd->bnqhd", p.astype(keys.dtype), keys), dtype)
    return o.reshape(b, nb * w, h, d)[:, :s], lse.reshape(b, nb * w, h)[:, :s]


def attention_xla(q: jax.Array, kv: jax.Array, sink: jax.Array, *, window: int, scale: float,
                  segment_ids: jax.Array | None = None, compressed: jax.Array | None = None,
                  compressed_valid: jax.Array | None = None, ratio: int = 0,
                  topk_idx: jax.Array | None = None):
    """`attention_reference` without anything S x S or S x N: the window as a band; the listed
    entries gathered, or all visible entries dense, TOPK_QUERY_CHUNK queries at a time under a
    rematerialized scan (`map_sequence_chunks`, so one chunk's gathered rows or logits are
    live, forward and backward). Operands and each part's output stay in the compute dtype (bf16
    runs hold half the bytes); products and the softmax are fp32, as in the kernels."""
    b, s = q.shape[:2]
    parts = [_window_band(q, kv, segment_ids, window, scale, q.dtype)]
    if compressed is not None and compressed.shape[1]:
        if topk_idx is None:
            # every visible entry, TOPK_QUERY_CHUNK queries at a time: the [B, chunk, H, N]
            # logits (and the [B, chunk, N] mask) of one chunk are live, not [B, S, H, N]
            # (HCA at S = 64K, N = 2K: 2 GiB per fp32 copy)
            n = compressed.shape[1]
            valid = jnp.ones((b, n), bool) if compressed_valid is None else compressed_valid
            entries = compressed.astype(q.dtype)
            seg_e = None if segment_ids is None else masks.entry_segments(segment_ids, n, ratio)

            def every_entry(qc, rows, seg=None):
                vis = masks.entry_visible(rows, n, ratio, valid, seg, seg_e)
                return _dense_part(qc, entries, vis, scale, q.dtype)
            xs = (q, masks.row_positions(b, s)) + (() if segment_ids is None else (segment_ids,))
            parts.append(map_sequence_chunks(every_entry, xs, chunk=TOPK_QUERY_CHUNK,
                                             pad_values=(0,) * len(xs)))
        else:
            entries = compressed.astype(jnp.float32)
            parts.append(map_sequence_chunks(
                lambda qc, tc: _gathered_part(qc, entries, tc, scale, q.dtype), (q, topk_idx),
                chunk=TOPK_QUERY_CHUNK, pad_values=(0, -1)))
    return _merge(parts, sink, q.dtype)


def cached_attention(q: jax.Array, q_pos: jax.Array, keys: jax.Array, key_pos: jax.Array,
                     sink: jax.Array, *, window: int, scale: float,
                     entries: jax.Array | None = None, ratio: int = 0,
                     topk_idx: jax.Array | None = None, return_lse: bool = False):
    """The same math for chunk queries against a cache (one document per row).

    q [B, T, H, D] at positions q_pos [B, T]; keys [B, K, D] (the ring buffer followed by the
    chunk's rows) at key_pos [B, K] (negative = empty slot); sink [H]; entries [B, N, D] (the
    whole preallocated entries cache: only entries visible by `masks.entry_visible` take
    part), either all visible ones (topk_idx None: HCA, dense CSA; `blocked_entries_part` attends
    them in blocks up to the last visible one) or the listed ones (topk_idx [B, T, k], -1 =
    none). Returns out [B, T, H, D] in q's dtype (and lse [B, T, H] fp32)."""
    qf = q.astype(jnp.float32)
    mask_w = masks.window_visible(q_pos, key_pos, window)
    parts = [_dense_part(qf, keys.astype(jnp.float32), mask_w, scale, jnp.float32, flat=True)]
    if entries is not None and entries.shape[1] > 0:   # max_len < m leaves no room for entries
        if topk_idx is None:    # the visible blocks only, never [B, T, H, N] logits
            parts.append(blocked_entries_part(qf, entries, q_pos, ratio=ratio, scale=scale)[:2])
        elif topk_idx.shape[-1]:   # rows gathered in the cache's dtype, then read in fp32
            parts.append(_gathered_part(qf, entries, topk_idx, scale, jnp.float32))
    out, lse = _merge(parts, sink, q.dtype)
    return (out, lse) if return_lse else out


MASS_PARTS = ("window", "compressed", "sink")


def attention_mass_split(q: jax.Array, kv: jax.Array, sink: jax.Array, lse: jax.Array, *,
                         window: int, scale: float, segment_ids: jax.Array | None = None,
                         entries: jax.Array | None = None, attended: jax.Array | None = None):
    """How a packed row's softmax splits between the window, the compressed entries and the sink.

    q [B, S, H, D]; kv [B, S, D]; sink [H]; lse [B, S, H] of the joint softmax (any of the three
    forms); entries [B, N, D] with attended [B, S, N] (bool, or how often each entry is listed:
    a listed entry counts once per listing) or None (no compressed part).
    Returns {"window", "compressed", "sink"} -> [B, S, H] fp32; they sum to 1 when `lse` is the
    lse of exactly this attention. Dense over S x S and S x N: for analysis batches.
    """
    qf = q.astype(jnp.float32)
    b, s = qf.shape[:2]
    lse = lse.astype(jnp.float32)
    rows = masks.row_positions(b, s)
    mask = masks.window_visible(rows, rows, window, segment_ids, segment_ids)
    lw = _mm("bshd,btd->bsht", qf, kv.astype(jnp.float32)) * scale
    out = {"window": jnp.sum(jnp.where(mask[:, :, None, :], jnp.exp(lw - lse[..., None]), 0.0), -1)}
    if entries is not None and entries.shape[1] > 0:
        if attended is None:
            raise ValueError("entries given without `attended` [B, S, N]")
        lc = _mm("bshd,bnd->bshn", qf, entries.astype(jnp.float32)) * scale
        count = attended.astype(jnp.float32)[:, :, None, :]
        out["compressed"] = jnp.sum(jnp.where(count > 0, count * jnp.exp(lc - lse[..., None]),
                                              0.0), -1)
    else:
        out["compressed"] = jnp.zeros(lse.shape, jnp.float32)
    out["sink"] = jnp.exp(sink.astype(jnp.float32)[None, None, :] - lse)
    return out
