"""Joint window + compressed attention with a per-head sink (spec §4.4-4.5), one entry point.

Query t attends, in one softmax:
  * window: raw keys t-W+1 .. t of its own document (W = sliding window, t itself included);
  * compressed entries: either the entries listed in `topk_idx` (CSA; -1 = no entry; duplicates
    count once per listing, as in a gather kernel; the list is trusted, the indexer only lists
    visible entries) or, without `topk_idx`, every visible entry (HCA, and CSA's dense warm-up);
  * the sink: a per-head logit in the denominator with no value.
KV is a single shared head (MQA) and doubles as the value (V = K).

Implementations (same function, same results):
  "reference": dense masked attention over all S window keys and all N entries; obviously correct.
  "xla":       window as a blocked band (cost S*2W), top-k entries gathered per query (S*k), HCA
               dense over the S/m' entries; nothing is S x S.
  "pallas":    the kernels of `kernels_pallas`: the token-sparse CSA kernel when entries are
               listed, the block-sparse kernel otherwise (HCA, SWA, dense CSA). Compiled on TPU
               (Mosaic) and GPU (Triton); interpreted on CPU (slow: for tests).
None picks "pallas" on TPU and GPU and "xla" on CPU (logged once per platform).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from sparse_lm.ops.chunking import map_sequence_chunks
from sparse_lm.ops.compress import entry_visibility

IMPLEMENTATIONS = ("reference", "xla", "pallas")
_log = logging.getLogger(__name__)


def default_implementation(platform: str, num_heads: int, head_dim: int, dtype) -> str:
    """Best available implementation: the Pallas kernels on TPU/GPU where their tiles accept the
    shapes, else "xla" (logged once per reason)."""
    if platform not in ("tpu", "gpu"):
        return _chosen(platform, "xla", "no compiled kernels on this platform", fallback=False)
    from kernels_pallas.sparse_attention.api import check_kernel_shapes
    try:
        check_kernel_shapes(f"pallas_{platform}", jax.ShapeDtypeStruct((1, 1, num_heads, head_dim),
                                                                       dtype), compiled=True)
    except ValueError as e:
        return _chosen(platform, "xla", str(e))
    return _chosen(platform, "pallas", "compiled kernels", fallback=False)


@functools.cache
def _chosen(platform: str, impl: str, why: str, fallback: bool = True) -> str:
    (_log.warning if fallback else _log.info)(
        "sparse_attention on %s: implementation %r (%s)", platform, impl, why)
    return impl


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, *, window: int, scale: float,
                     segment_ids: jax.Array | None = None, compressed: jax.Array | None = None,
                     compressed_valid: jax.Array | None = None, ratio: int = 0,
                     topk_idx: jax.Array | None = None, implementation: str | None = None,
                     return_lse: bool = False):
    """q [B, S, H, D]; kv [B, S, D]; sink [H]; compressed [B, N, D] with compressed_valid [B, N]
    (entries of windows of `ratio` tokens); topk_idx [B, S, K] int32 or None.

    Returns out [B, S, H, D] in q's dtype (and lse [B, S, H] fp32, sink included, if asked).
    """
    if implementation is None:
        implementation = default_implementation(jax.default_backend(), q.shape[2], q.shape[3],
                                                q.dtype)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is invalid: allowed values "
                         f"{IMPLEMENTATIONS + (None,)}")
    b, s, h, d = q.shape
    if kv.shape != (b, s, d):
        raise ValueError(f"kv has shape {kv.shape}, expected {(b, s, d)} (one shared head)")
    if compressed is not None:
        if ratio < 1 or compressed_valid is None:
            raise ValueError("compressed entries need `ratio` >= 1 and `compressed_valid`")
        if topk_idx is not None and (topk_idx.ndim != 3 or topk_idx.shape[:2] != (b, s)):
            raise ValueError(f"topk_idx has shape {topk_idx.shape}, expected [B={b}, S={s}, K]")
    elif topk_idx is not None:
        raise ValueError("topk_idx given without compressed entries")
    if compressed is not None and (compressed.shape[1] == 0
                                   or (topk_idx is not None and topk_idx.shape[-1] == 0)):
        compressed = compressed_valid = topk_idx = None   # too short for one entry: window only
    fn = {"reference": _reference, "xla": _xla, "pallas": _pallas}[implementation]
    out, lse = fn(q, kv, sink, window=window, scale=scale, segment_ids=segment_ids,
                  compressed=compressed, compressed_valid=compressed_valid, ratio=ratio,
                  topk_idx=topk_idx)
    return (out, lse) if return_lse else out


def _joint_softmax(logit_parts, sink_logits):
    """Softmax over the concatenation of logit_parts [..., n_i] plus one sink column [...].

    Returns the probability parts and lse. Every row has at least its own token, so it is finite.
    """
    m = jnp.maximum(functools.reduce(jnp.maximum, [jnp.max(l, axis=-1) for l in logit_parts]),
                    sink_logits)
    exps = [jnp.exp(l - m[..., None]) for l in logit_parts]
    denom = sum(jnp.sum(e, axis=-1) for e in exps) + jnp.exp(sink_logits - m)
    return [e / denom[..., None] for e in exps], m + jnp.log(denom)


def _selection_counts(topk_idx: jax.Array, n: int) -> jax.Array:
    """[B, S, K] indices (-1 = none) -> [B, S, N] how often each entry is listed."""
    return jnp.sum(jax.nn.one_hot(topk_idx, n, dtype=jnp.float32), axis=-2)


def _reference(q, kv, sink, *, window, scale, segment_ids, compressed, compressed_valid, ratio,
               topk_idx):
    b, s, h, d = q.shape
    qf, kvf = q.astype(jnp.float32), kv.astype(jnp.float32)
    t = jnp.arange(s)
    band = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window)     # [S(q), S(k)]
    mask_w = jnp.broadcast_to(band, (b, s, s))
    if segment_ids is not None:
        mask_w = mask_w & (segment_ids[:, :, None] == segment_ids[:, None, :])
    lw = jnp.einsum("bshd,btd->bsht", qf, kvf) * scale
    parts = [jnp.where(mask_w[:, :, None, :], lw, -jnp.inf)]
    values = [kvf]
    if compressed is not None:
        n = compressed.shape[1]
        cf = compressed.astype(jnp.float32)
        lc = jnp.einsum("bshd,bnd->bshn", qf, cf) * scale
        if topk_idx is None:
            vis = entry_visibility(s, ratio, compressed_valid, segment_ids)
            lc = jnp.where(vis[:, :, None, :], lc, -jnp.inf)
        else:  # a listed entry counts once per listing: add log(count) to its logit
            counts = _selection_counts(topk_idx, n)[:, :, None, :]
            lc = jnp.where(counts > 0, lc + jnp.log(jnp.maximum(counts, 1.0)), -jnp.inf)
        parts.append(lc)
        values.append(cf)
    sink_l = jnp.broadcast_to(sink.astype(jnp.float32), (b, s, h))
    probs, lse = _joint_softmax(parts, sink_l)
    out = sum(jnp.einsum("bshk,bkd->bshd", p, v) for p, v in zip(probs, values))
    return out.astype(q.dtype), lse


def _mm(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated and returned in fp32 (operands in their own dtype)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


# Queries per step of the top-k part: bounds its largest temporaries (the gathered rows and
# their gradient, [B, chunk, K, D]) instead of holding them for all S queries (V4-Flash at
# S=4096: 2 GB per copy in bf16).
TOPK_QUERY_CHUNK = 512


def _piece(logits: jax.Array, values: jax.Array, spec: str, dtype):
    """Softmax over one part of the key set: logits [..., n] (masked = -inf), values -> (the
    part's normalized output in `dtype`, its lse fp32 [...]; -inf where all n are masked).
    Parts merge exactly with their lse (`_merge`); holding each in the compute dtype keeps no
    fp32 [B, S, H, D] copy per part."""
    m = jnp.max(logits, axis=-1)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.exp(logits - m[..., None])
    l = jnp.sum(e, axis=-1)
    l_safe = jnp.maximum(l, 1e-30)
    o = _mm(spec, e.astype(values.dtype), values) / l_safe[..., None]
    return o.astype(dtype), jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _merge(pieces, sink_logits, dtype):
    """[(out_i, lse_i)] + the sink logit [...] -> (out in `dtype`, lse fp32): one softmax over
    the union of the parts' keys and the sink. The window part always has the query's own token,
    so the total lse is finite."""
    lse = functools.reduce(jnp.logaddexp, [p[1] for p in pieces] + [sink_logits])
    out = sum(jnp.exp(p[1] - lse)[..., None] * p[0].astype(jnp.float32) for p in pieces)
    return out.astype(dtype), lse


def _topk_part(q, compressed, topk_idx, scale):
    """The listed entries' part (`_piece`): q [B, S, H, D], compressed [B, N, D], topk_idx
    [B, S, K] -> (out [B, S, H, D] in q's dtype, lse [B, S, H] fp32).

    Queries go TOPK_QUERY_CHUNK at a time through a rematerialized scan (`map_sequence_chunks`),
    so only one chunk's gathered rows are live, forward and backward. Rows are gathered from an
    fp32 copy of the entries (their gradient accumulates in fp32) and multiplied in q's dtype.
    """
    n = compressed.shape[1]
    entries = compressed.astype(jnp.float32)

    def part(qc, tc):
        safe = jnp.clip(tc, 0, n - 1)               # address only; -1 is masked below
        rows = jnp.take_along_axis(entries[:, None], safe[..., None], axis=2).astype(q.dtype)
        logits = _mm("bshd,bskd->bshk", qc, rows) * scale
        return _piece(jnp.where((tc >= 0)[:, :, None, :], logits, -jnp.inf), rows,
                      "bshk,bskd->bshd", q.dtype)
    return map_sequence_chunks(part, (q, topk_idx), chunk=TOPK_QUERY_CHUNK, pad_values=(0, -1))


def _xla(q, kv, sink, *, window, scale, segment_ids, compressed, compressed_valid, ratio,
         topk_idx):
    """Window, compressed entries and sink as separate softmax parts merged by their lse;
    operands and each part's output stay in the compute dtype (bf16 runs hold half the bytes),
    products and the softmax are fp32, as in the kernels."""
    b, s, h, d = q.shape
    w = window
    nb = -(-s // w)
    pad = nb * w - s
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, w, h, d)
    kvp = jnp.pad(kv, ((0, 0), (0, pad), (0, 0))).reshape(b, nb, w, d)
    # Block j of queries sees key blocks j-1 and j: the band [t-W+1, t] never reaches further.
    keys = jnp.concatenate([jnp.pad(kvp[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0))), kvp], axis=2)
    qpos = jnp.arange(nb)[:, None] * w + jnp.arange(w)[None, :]                 # [nb, W]
    kpos = (jnp.arange(nb)[:, None] - 1) * w + jnp.arange(2 * w)[None, :]       # [nb, 2W]
    band = ((kpos[:, None, :] <= qpos[:, :, None]) & (qpos[:, :, None] - kpos[:, None, :] < w)
            & (kpos[:, None, :] >= 0))                                          # [nb, W, 2W]
    mask_w = jnp.broadcast_to(band, (b, nb, w, 2 * w))
    if segment_ids is not None:
        segp = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(b, nb, w)
        seg_k = jnp.concatenate(
            [jnp.pad(segp[:, :-1], ((0, 0), (1, 0), (0, 0)), constant_values=-1), segp], axis=2)
        mask_w = mask_w & (segp[:, :, :, None] == seg_k[:, :, None, :])
    lw = _mm("bnqhd,bnkd->bnqhk", qp, keys) * scale
    o_w, lse_w = _piece(jnp.where(mask_w[:, :, :, None, :], lw, -jnp.inf), keys,
                        "bnqhk,bnkd->bnqhd", q.dtype)
    pieces = [(o_w.reshape(b, nb * w, h, d)[:, :s], lse_w.reshape(b, nb * w, h)[:, :s])]
    if compressed is not None:
        if topk_idx is None:  # all visible entries (HCA: N = S/m' is small)
            vis = entry_visibility(s, ratio, compressed_valid, segment_ids)
            lc = _mm("bshd,bnd->bshn", q, compressed) * scale
            pieces.append(_piece(jnp.where(vis[:, :, None, :], lc, -jnp.inf), compressed,
                                 "bshn,bnd->bshd", q.dtype))
        elif compressed.shape[1]:
            pieces.append(_topk_part(q, compressed, topk_idx, scale))
    return _merge(pieces, jnp.broadcast_to(sink.astype(jnp.float32), (b, s, h)), q.dtype)


def _pallas(q, kv, sink, *, window, scale, segment_ids, compressed, compressed_valid, ratio,
            topk_idx):
    # Imported here so that the model core does not depend on the kernels package at import time.
    platform = jax.default_backend()
    if topk_idx is not None:
        from kernels_pallas.sparse_attention import api as csa
        impl = "pallas_gpu" if platform == "gpu" else "pallas_tpu"
        return csa.csa_attention(q, kv, compressed, topk_idx, sink, window=window, scale=scale,
                                 segment_ids=segment_ids, implementation=impl)
    from kernels_pallas.block_sparse_attention import api as bsa
    impl = "gpu" if platform == "gpu" else "tpu"
    return bsa.block_sparse_attention(q, kv, sink, window=window, scale=scale,
                                      compressed=compressed,
                                      # all entries are valid without documents: the kernel then
                                      # skips masking positionally full blocks
                                      compressed_valid=None if segment_ids is None else compressed_valid,
                                      ratio=ratio if compressed is not None else 0,
                                      segment_ids=segment_ids, implementation=impl)
