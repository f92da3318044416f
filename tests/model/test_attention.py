"""Joint window + compressed attention with sinks: implementations agree with each other and with
a per-query loop written straight from the spec."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from sparse_lm.ops.implementations import sparse_attention
from sparse_lm.ops.masks import sequence_entry_visible


def naive_attention(q, kv, sink, comp, valid, ratio, topk, window, scale, seg):
    """Per query and head: gather the key set of spec §4.4, one softmax with the sink."""
    b, s, h, d = q.shape
    out = np.zeros_like(q)
    vis = None if comp is None else np.asarray(sequence_entry_visible(s, ratio, jnp.asarray(valid),
                                                                None if seg is None else jnp.asarray(seg)))
    for bi in range(b):
        for t in range(s):
            keys = [kv[bi, u] for u in range(max(0, t - window + 1), t + 1)
                    if seg is None or seg[bi, u] == seg[bi, t]]
            if comp is not None:
                if topk is None:
                    keys += [comp[bi, e] for e in range(comp.shape[1]) if vis[bi, t, e]]
                else:
                    keys += [comp[bi, e] for e in topk[bi, t] if e >= 0]
            keys = np.stack(keys)
            for hi in range(h):
                z = keys @ q[bi, t, hi] * scale
                mx = max(z.max(), sink[hi])
                p = np.exp(z - mx) / (np.exp(z - mx).sum() + np.exp(sink[hi] - mx))
                out[bi, t, hi] = p @ keys
    return out


def make_inputs(seed, b=2, s=19, h=3, d=8, ratio=4, k=3, with_seg=False):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, s, h, d)).astype(np.float32)
    kv = rng.normal(size=(b, s, d)).astype(np.float32)
    n = s // ratio
    comp = rng.normal(size=(b, n, d)).astype(np.float32)
    valid = np.ones((b, n), bool)
    sink = rng.normal(size=(h,)).astype(np.float32)
    seg = None
    if with_seg:
        seg = np.zeros((b, s), np.int32); seg[:, 8:] = 1; seg[1, 14:] = 2
        valid = np.asarray(jax.numpy.asarray(seg[:, : n * ratio].reshape(b, n, ratio)).min(-1)
                           == seg[:, : n * ratio].reshape(b, n, ratio).max(-1))
    vis = np.asarray(sequence_entry_visible(s, ratio, jnp.asarray(valid), None if seg is None else jnp.asarray(seg)))
    topk = np.full((b, s, k), -1, np.int32)
    for bi in range(b):
        for t in range(s):
            cand = np.flatnonzero(vis[bi, t])
            pick = rng.permutation(cand)[:k]
            topk[bi, t, : len(pick)] = pick
    topk[0, -1, :] = topk[0, -1, 0]   # a duplicated listing counts twice
    return q, kv, sink, comp, valid, seg, topk


MODES = ["window", "all_visible", "topk"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_seg", [False, True])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_implementation_equals_per_query_loop(mode, with_seg, impl):
    q, kv, sink, comp, valid, seg, topk = make_inputs(0, with_seg=with_seg)
    comp_arg = None if mode == "window" else comp
    topk_arg = topk if mode == "topk" else None
    got = sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(sink), window=5, scale=0.3,
                           segment_ids=None if seg is None else jnp.asarray(seg),
                           compressed=None if comp_arg is None else jnp.asarray(comp_arg),
                           compressed_valid=jnp.asarray(valid), ratio=4,
                           topk_idx=None if topk_arg is None else jnp.asarray(topk_arg),
                           implementation=impl)
    want = naive_attention(q, kv, sink, comp_arg, valid, 4, topk_arg, 5, 0.3, seg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_xla_and_reference_agree_in_gradient(mode):
    q, kv, sink, comp, valid, seg, topk = make_inputs(1, with_seg=True)

    def loss(impl, q, kv, sink, comp):
        out, lse = sparse_attention(q, kv, sink, window=5, scale=0.3, segment_ids=jnp.asarray(seg),
                                    compressed=None if mode == "window" else comp,
                                    compressed_valid=jnp.asarray(valid), ratio=4,
                                    topk_idx=jnp.asarray(topk) if mode == "topk" else None,
                                    implementation=impl, return_lse=True)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.sin(lse))

    args = tuple(map(jnp.asarray, (q, kv, sink, comp)))
    g_ref = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3))(*args)
    g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(g_ref, g_xla):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_sink_takes_probability_mass_without_value():
    q, kv, sink, *_ = make_inputs(2)
    big = np.full_like(sink, 30.0)   # sink dominates: outputs shrink towards zero
    out = sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(big), window=5, scale=0.3)
    assert float(jnp.abs(out).max()) < 1e-6


def test_bad_shapes_raise_clear_errors():
    q, kv, sink, comp, valid, seg, topk = make_inputs(3)
    with pytest.raises(ValueError, match="one shared head"):
        sparse_attention(jnp.asarray(q), jnp.asarray(kv[:, :, None]), jnp.asarray(sink), window=4, scale=1.0)
    with pytest.raises(ValueError, match="implementation="):
        sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(sink), window=4, scale=1.0,
                         implementation="cuda")
    with pytest.raises(ValueError, match="topk_idx has shape"):
        sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(sink), window=4, scale=1.0,
                         compressed=jnp.asarray(comp), compressed_valid=jnp.asarray(valid), ratio=4,
                         topk_idx=jnp.asarray(topk[:, :-1]))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_sequence_shorter_than_one_window_attends_the_window_only(impl):
    q, kv, sink, *_ = make_inputs(4, s=3)
    empty = jnp.zeros((2, 0, 8))
    got = sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(sink), window=5, scale=0.3,
                           compressed=empty, compressed_valid=jnp.zeros((2, 0), bool), ratio=4,
                           topk_idx=jnp.zeros((2, 3, 0), jnp.int32), implementation=impl)
    want = sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(sink), window=5, scale=0.3,
                            implementation=impl)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_xla_top_k_part_goes_in_query_chunks_in_bf16_and_matches_fp32_reference(monkeypatch):
    """bf16 inputs: the top-k rows are gathered one chunk of queries at a time and multiplied in
    bf16 (products accumulate in fp32); nothing of size [B, S, K, D] exists; the output and the
    gradients (chunked scan, fp32) match the reference."""
    from sparse_lm.ops import attention
    monkeypatch.setattr(attention, "TOPK_QUERY_CHUNK", 8)
    q, kv, sink, comp, valid, seg, topk = make_inputs(5, s=30, k=4, with_seg=True)
    args = dict(window=4, scale=0.3, compressed_valid=jnp.asarray(valid), ratio=4,
                topk_idx=jnp.asarray(topk), segment_ids=jnp.asarray(seg))
    ref = sparse_attention(jnp.asarray(q), jnp.asarray(kv), jnp.asarray(sink),
                           compressed=jnp.asarray(comp), implementation="reference", **args)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, kv, comp)]
    fn = jax.jit(lambda q, kv, c: sparse_attention(q, kv, jnp.asarray(sink), compressed=c,
                                                   implementation="xla", **args))
    got = fn(*bf)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=5e-2, rtol=5e-2)
    hlo = fn.lower(*bf).as_text()
    b, s, _, d = q.shape
    assert f"tensor<{b}x8x4x{d}xbf16>" in hlo                 # 4 steps of 8 (30 padded to 32)
    assert f"x{s}x4x{d}x" not in hlo and f"x32x4x{d}x" not in hlo

    def loss(impl, q, kv, c, sk):
        out = sparse_attention(q, kv, sk, compressed=c, implementation=impl, **args)
        return jnp.sum(out * jnp.cos(out))
    f32 = [jnp.asarray(x) for x in (q, kv, comp, sink)]
    g_ref = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3))(*f32)
    g_xla = jax.jit(jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3)))(*f32)
    for a, b_ in zip(g_ref, g_xla):
        np.testing.assert_allclose(a, b_, atol=2e-5, rtol=2e-4)
