#!/usr/bin/env python
"""Independent float64 NumPy re-implementation of transformers 5.23.0 `DeepseekV4ForCausalLM` (no cache).

Written from tools/parity/NOTES.md; it needs only numpy + safetensors (no torch), so it also runs in the
project's regular environment. It checks that the reference data in tests/parity_data/ can be matched by an
implementation that follows NOTES.md, and it is a debugging oracle for the JAX port (every intermediate is plain
NumPy). Usage:

    python tools/parity/numpy_reference.py [tests/parity_data/<case> ...]

Prints the max |logit difference| per case and exits non-zero above --tol (default 1e-4).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# RoPE tables (float32 like transformers)
# ---------------------------------------------------------------------------------------------------------------
def _pow_f32(theta: float, dim: int) -> np.ndarray:
    """theta ** (arange(0, dim, 2) / dim) as torch computes it in float32: exponent in fp32, result correctly
    rounded to fp32 (= float64 pow, then cast)."""
    expo = np.arange(0, dim, 2, dtype=F32) / F32(dim)
    return (np.float64(theta) ** expo.astype(np.float64)).astype(F32)


def inv_freq_default(theta: float, dim: int) -> np.ndarray:
    return (F32(1.0) / _pow_f32(theta, dim)).astype(F32)


def inv_freq_yarn(theta, dim, factor, orig, beta_fast=32.0, beta_slow=1.0, truncate=True) -> np.ndarray:
    pos_freqs = _pow_f32(theta, dim)
    extra = (F32(1.0) / pos_freqs).astype(F32)
    inter = (F32(1.0) / (F32(factor) * pos_freqs)).astype(F32)

    def corr(nrot):  # python float64
        return (dim * math.log(orig / (nrot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=F32) - F32(low)) / F32(high - low), 0, 1).astype(F32)
    extra_factor = (F32(1.0) - ramp).astype(F32)
    return (inter * (F32(1.0) - extra_factor) + extra * extra_factor).astype(F32)


def rope_tables(cfg):
    r = int(cfg["head_dim"] * cfg["partial_rotary_factor"])
    rp = cfg["rope_parameters"]
    out = {}
    for label in ("main", "compress"):
        p = rp[label]
        if p.get("rope_type", "default") == "yarn":
            out[label] = inv_freq_yarn(p["rope_theta"], r, p["factor"], p["original_max_position_embeddings"],
                                       p.get("beta_fast") or 32, p.get("beta_slow") or 1, p.get("truncate", True))
            assert p.get("attention_factor", 1.0) == 1.0
        else:
            out[label] = inv_freq_default(p["rope_theta"], r)
    return out


def cos_sin(positions: np.ndarray, inv_freq: np.ndarray):
    ang = positions.astype(F32)[..., None] * inv_freq[None, :]  # float32 product, as transformers
    ang = ang.astype(np.float64)
    return np.cos(ang), np.sin(ang)


def rope(x, cos, sin):
    """Interleaved RoPE on the trailing 2*len(cos) channels. x [..., S, (H,) D]; cos/sin broadcastable [.., r/2]."""
    r = 2 * cos.shape[-1]
    nope, rp = x[..., :-r], x[..., -r:]
    a, b = rp[..., 0::2], rp[..., 1::2]
    out = np.empty_like(rp)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return np.concatenate([nope, out], axis=-1)


# ---------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------
def rms(x, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def linear(x, w):  # w [out, in]
    return x @ w.T


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def softplus_torch(x):  # torch threshold=20
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def silu(x):
    return x * sigmoid(x)


def hc_pre(X, fn, base, scale, cfg):
    """X [B,S,n,d] -> (post [B,S,n], comb [B,S,n,n] indexed [in j, out k], collapsed [B,S,d])."""
    n = cfg["hc_mult"]
    eps = cfg["hc_eps"]
    B, S = X.shape[:2]
    mix = linear(rms(X.reshape(B, S, -1), cfg["rms_norm_eps"]), fn)  # [B,S,(2+n)n]
    pre_w, post_w, comb_w = mix[..., :n], mix[..., n:2 * n], mix[..., 2 * n:].reshape(B, S, n, n)
    pre = sigmoid(pre_w * scale[0] + base[:n]) + eps
    post = 2.0 * sigmoid(post_w * scale[1] + base[n:2 * n])
    comb = softmax(comb_w * scale[2] + base[2 * n:].reshape(n, n), axis=-1) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(cfg["hc_sinkhorn_iters"] - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    collapsed = np.einsum("bsn,bsnd->bsd", pre, X)
    return post, comb, collapsed


def hc_post(out, X, post, comb):
    return post[..., None] * out[:, :, None, :] + np.einsum("bsjk,bsjd->bskd", comb, X)


def compress(x, kv_w, gate_w, pos_bias, norm_w, m, c, overlap, inv_freq, eps):
    """Gated pooling compressor (no cache). x [B,S,d] -> entries [B,n,c] (RoPE at position i*m)."""
    B, S, _ = x.shape
    n = S // m
    if n == 0:
        return np.zeros((B, 0, c))
    kv = linear(x[:, : n * m], kv_w).reshape(B, n, m, -1)
    gate = linear(x[:, : n * m], gate_w).reshape(B, n, m, -1) + pos_bias
    if overlap:
        new_kv = np.zeros((B, n, 2 * m, c))
        new_gate = np.full((B, n, 2 * m, c), -np.inf)
        new_kv[:, :, m:] = kv[..., c:]
        new_gate[:, :, m:] = gate[..., c:]
        new_kv[:, 1:, :m] = kv[:, :-1, :, :c]
        new_gate[:, 1:, :m] = gate[:, :-1, :, :c]
        kv, gate = new_kv, new_gate
    pooled = np.sum(kv * softmax(gate, axis=2), axis=2)
    pooled = rms(pooled, eps) * norm_w
    cos, sin = cos_sin(np.arange(n) * m, inv_freq)
    return rope(pooled, cos[None], sin[None])


def topk_indices(scores, k):
    """Indices of the k largest along the last axis (ties: lowest index first), descending."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


# ---------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------
def attention(p, pre, x, cfg, l, ltype, inv, positions, debug):
    B, S, _ = x.shape
    H, D = cfg["num_attention_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    table = inv["main"] if ltype == "sliding_attention" else inv["compress"]
    cos, sin = cos_sin(positions, table)  # [S, r/2]

    q_res = rms(linear(x, p[pre + "q_a_proj.weight"]), eps) * p[pre + "q_a_norm.weight"]
    q = linear(q_res, p[pre + "q_b_proj.weight"]).reshape(B, S, H, D)
    q = rms(q, eps)  # per-head, unweighted
    q = rope(q, cos[None, :, None, :], sin[None, :, None, :])
    kv = rms(linear(x, p[pre + "kv_proj.weight"]), eps) * p[pre + "kv_norm.weight"]
    kv = rope(kv, cos[None], sin[None])  # [B,S,D]

    t = positions[:, None]
    s = positions[None, :]
    win_mask = (s <= t) & (s > t - cfg["sliding_window"])  # [S,S]
    keys = kv
    mask = np.broadcast_to(win_mask, (B, S, S))
    if ltype != "sliding_attention":
        m = cfg["compress_rates"][ltype]
        cp = pre + "compressor."
        ov = ltype == "compressed_sparse_attention"
        comp = compress(x, p[cp + "kv_proj.weight"], p[cp + "gate_proj.weight"], p[cp + "position_bias"],
                        p[cp + "kv_norm.weight"], m, D, ov, inv["compress"], eps)  # [B,T,D]
        T = comp.shape[1]
        thresh = (positions + 1) // m  # [S]
        visible = np.arange(T)[None, :] < thresh[:, None]  # [S,T]
        if ov and T > 0:
            ip = cp + "indexer."
            cI, nI = cfg["index_head_dim"], cfg["index_n_heads"]
            kI = compress(x, p[ip + "kv_proj.weight"], p[ip + "gate_proj.weight"], p[ip + "position_bias"],
                          p[ip + "kv_norm.weight"], m, cI, True, inv["compress"], eps)  # [B,T,cI]
            cq, sq = cos_sin(positions, inv["compress"])
            qI = linear(q_res, p[ip + "q_b_proj.weight"]).reshape(B, S, nI, cI)
            qI = rope(qI, cq[None, :, None, :], sq[None, :, None, :])
            sc = np.maximum(np.einsum("bshc,btc->bsht", qI, kI), 0.0) * cI ** -0.5
            w = linear(x, p[ip + "scorer.weights_proj.weight"]) * nI ** -0.5  # [B,S,nI]
            score = np.einsum("bsht,bsh->bst", sc, w)
            score = np.where(visible[None], score, -np.inf)
            k = min(cfg["index_topk"], T)
            idx = topk_indices(score, k)  # [B,S,k]
            idx = np.where(idx >= thresh[None, :, None], -1, idx)
            debug[f"indexer_topk_l{l}"] = idx
            sel = np.zeros((B, S, T), dtype=bool)
            bb, ss, kk = np.nonzero(idx >= 0)
            sel[bb, ss, idx[bb, ss, kk]] = True
            cmask = sel
        else:
            cmask = np.broadcast_to(visible, (B, S, T))
        keys = np.concatenate([kv, comp], axis=1)
        mask = np.concatenate([mask, cmask], axis=-1)

    logits = np.einsum("bshd,btd->bhst", q, keys) * D ** -0.5
    logits = np.where(mask[:, None], logits, -np.inf)
    sinks = np.broadcast_to(p[pre + "sinks"][None, :, None, None], (B, H, S, 1))
    probs = softmax(np.concatenate([logits, sinks], axis=-1), axis=-1)[..., :-1]
    o = np.einsum("bhst,btd->bshd", probs, keys)
    o = rope(o, cos[None, :, None, :], -sin[None, :, None, :])  # de-rotate at the query position
    g = cfg["o_groups"]
    o = o.reshape(B, S, g, -1)  # consecutive heads per group
    wa = p[pre + "o_a_proj.weight"].reshape(g, cfg["o_lora_rank"], -1)
    u = np.einsum("bsgi,goi->bsgo", o, wa).reshape(B, S, -1)
    return linear(u, p[pre + "o_b_proj.weight"])


def moe(p, pre, x, ids, cfg, l, is_hash, debug):
    B, S, d = x.shape
    K = cfg["num_experts_per_tok"]
    L = cfg["swiglu_limit"]
    flat = x.reshape(-1, d)
    scores = np.sqrt(softplus_torch(linear(flat, p[pre + "gate.weight"])))
    if is_hash:
        idx = p[pre + "gate.tid2eid"][ids.reshape(-1)]
    else:
        idx = topk_indices(scores + p[pre + "gate.e_score_correction_bias"], K)
        debug[f"router_topk_l{l}"] = np.sort(idx, axis=-1).reshape(B, S, K)
    w = np.take_along_axis(scores, idx, axis=-1)
    w = w / (w.sum(-1, keepdims=True) + 1e-20) * cfg["routed_scaling_factor"]
    gu, dn = p[pre + "experts.gate_up_proj"], p[pre + "experts.down_proj"]
    I = cfg["moe_intermediate_size"]
    out = np.zeros_like(flat)
    for j in range(K):
        e = idx[:, j]
        h = np.einsum("nd,nod->no", flat, gu[e])
        gate, up = np.minimum(h[:, :I], L), np.clip(h[:, I:], -L, L)
        out += np.einsum("ni,ndi->nd", silu(gate) * up, dn[e]) * w[:, j:j + 1]
    sh = pre + "shared_experts."
    gate = np.minimum(linear(flat, p[sh + "gate_proj.weight"]), L)
    up = np.clip(linear(flat, p[sh + "up_proj.weight"]), -L, L)
    out += linear(silu(gate) * up, p[sh + "down_proj.weight"])
    return out.reshape(B, S, d)


def forward(cfg, p, ids, debug=None):
    debug = {} if debug is None else debug
    B, S = ids.shape
    eps = cfg["rms_norm_eps"]
    inv = rope_tables(cfg)
    positions = np.arange(S)
    X = np.repeat(p["model.embed_tokens.weight"][ids][:, :, None, :], cfg["hc_mult"], axis=2)
    for l, ltype in enumerate(cfg["layer_types"]):
        pre = f"model.layers.{l}."
        post, comb, y = hc_pre(X, p[pre + "attn_hc.fn"], p[pre + "attn_hc.base"], p[pre + "attn_hc.scale"], cfg)
        a = attention(p, pre + "self_attn.", rms(y, eps) * p[pre + "input_layernorm.weight"], cfg, l, ltype, inv,
                      positions, debug)
        X = hc_post(a, X, post, comb)
        post, comb, y = hc_pre(X, p[pre + "ffn_hc.fn"], p[pre + "ffn_hc.base"], p[pre + "ffn_hc.scale"], cfg)
        f = moe(p, pre + "mlp.", rms(y, eps) * p[pre + "post_attention_layernorm.weight"], ids, cfg, l,
                cfg["mlp_layer_types"][l] == "hash_moe", debug)
        X = hc_post(f, X, post, comb)
    B, S, n, d = X.shape
    mix = linear(rms(X.reshape(B, S, -1), eps), p["model.hc_head.hc_fn"])
    pre_w = sigmoid(mix * p["model.hc_head.hc_scale"][0] + p["model.hc_head.hc_base"]) + cfg["hc_eps"]
    y = np.einsum("bsn,bsnd->bsd", pre_w, X)
    y = rms(y, eps) * p["model.norm.weight"]
    return linear(y, p["lm_head.weight"]), inv


def check_case(case_dir: Path, tol: float) -> bool:
    cfg = json.loads((case_dir / "config.json").read_text())
    meta = json.loads((case_dir / "meta.json").read_text())
    params = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in
              load_file(str(case_dir / "model.safetensors")).items()}
    io = np.load(case_dir / "io.npz")
    debug = {}
    logits, inv = forward(cfg, params, io["input_ids"].astype(np.int64), debug)
    ref = io["logits"].astype(np.float64)
    diff = np.abs(logits - ref)
    rel = float(diff.max() / np.abs(ref).max())
    inv_diff = max(float(np.abs(inv[k].astype(np.float64) - np.array(meta["inv_freq"][k])).max()) for k in inv)
    sel_ok = True
    for key in io.files:
        if key.startswith("indexer_topk_"):
            a, b = np.sort(io[key], axis=-1), np.sort(debug[key], axis=-1)
            sel_ok &= bool(np.array_equal(a, b))
        elif key.startswith("router_topk_"):
            sel_ok &= bool(np.array_equal(io[key], debug[key]))
    ok = diff.max() <= tol and sel_ok and inv_diff == 0.0
    print(f"{case_dir.name}: max|dlogit| {diff.max():.3e} (rel to max|logit| {rel:.2e}), mean {diff.mean():.2e}, "
          f"selections identical: {sel_ok}, inv_freq max diff vs transformers: {inv_diff:.1e} -> "
          f"{'OK' if ok else 'FAIL'}")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[2] / "tests" / "parity_data"
    dirs = [Path(c) for c in args.cases] or sorted(p for p in root.iterdir() if (p / "io.npz").exists())
    ok = all([check_case(d, args.tol) for d in dirs])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
