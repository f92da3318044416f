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


def _xla(q, kv, sink, *, window, scale, segment_ids, compressed, compressed_valid, ratio,
         topk_idx):
    b, s, h, d = q.shape
    w = window
    nb = -(-s // w)
    pad = nb * w - s
    qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, nb, w, h, d)
    kvp = jnp.pad(kv.astype(jnp.float32), ((0, 0), (0, pad), (0, 0))).reshape(b, nb, w, d)
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
    lw = jnp.einsum("bnqhd,bnkd->bnqhk", qf, keys) * scale
    parts = [jnp.where(mask_w[:, :, :, None, :], lw, -jnp.inf)]
    comp_values = None
    if compressed is not None:
        cf = compressed.astype(jnp.float32)
        n = cf.shape[1]
        if topk_idx is None:  # all visible entries (HCA: N = S/m' is small)
            vis = entry_visibility(s, ratio, compressed_valid, segment_ids)
            lc = jnp.einsum("bshd,bnd->bshn", q.astype(jnp.float32), cf) * scale
            lc = jnp.where(vis[:, :, None, :], lc, -jnp.inf)
            comp_values = ("dense", cf)
        else:  # gather the listed rows per query
            k = topk_idx.shape[-1]
            safe = jnp.clip(topk_idx, 0, max(n - 1, 0))  # address only; -1 is masked below
            rows = jnp.take_along_axis(cf[:, None], safe[..., None], axis=2) if n else \
                jnp.zeros((b, s, k, d), jnp.float32)                            # [B, S, K, D]
            lc = jnp.einsum("bshd,bskd->bshk", q.astype(jnp.float32), rows) * scale
            lc = jnp.where((topk_idx >= 0)[:, :, None, :], lc, -jnp.inf)
            comp_values = ("rows", rows)
        lc = jnp.pad(lc, ((0, 0), (0, pad), (0, 0), (0, 0)), constant_values=-jnp.inf)
        parts.append(lc.reshape(b, nb, w, h, lc.shape[-1]))
    sink_l = jnp.broadcast_to(sink.astype(jnp.float32), (b, nb, w, h))
    probs, lse = _joint_softmax(parts, sink_l)
    out = jnp.einsum("bnqhk,bnkd->bnqhd", probs[0], keys).reshape(b, nb * w, h, d)
    if comp_values is not None:
        pc = probs[1].reshape(b, nb * w, h, -1)[:, :s]
        kind, vals = comp_values
        if kind == "dense":
            oc = jnp.einsum("bshn,bnd->bshd", pc, vals)
        else:
            oc = jnp.einsum("bshk,bskd->bshd", pc, vals)
        out = out[:, :s] + oc
    out = out[:, :s]
    return out.astype(q.dtype), lse.reshape(b, nb * w, h)[:, :s]


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
