"""mHC: the exact 20-iteration Sinkhorn, column sums, collapse/expand algebra."""
import numpy as np
import jax
import jax.numpy as jnp

from sparse_lm.ops import mhc


def numpy_sinkhorn(r, iters, eps):
    e = np.exp(r - r.max(-1, keepdims=True))
    m = e / e.sum(-1, keepdims=True) + eps
    m = m / (m.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdims=True) + eps)
        m = m / (m.sum(-2, keepdims=True) + eps)
    return m


def test_sinkhorn_equals_numpy_procedure_and_columns_sum_to_one():
    r = np.random.default_rng(0).normal(size=(6, 4, 4)).astype(np.float32) * 3
    got = np.asarray(mhc.sinkhorn(jnp.asarray(r), 20, 1e-6))
    np.testing.assert_allclose(got, numpy_sinkhorn(r.astype(np.float64), 20, 1e-6), atol=1e-6)
    np.testing.assert_allclose(got.sum(-2), 1.0, atol=1e-5)
    assert np.abs(got.sum(-1) - 1).max() > 0  # rows are only approximately 1 by design


def test_hc_weights_layout_pre_post_comb():
    n, d = 4, 8
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, n, d)).astype(np.float32)
    fn = rng.normal(size=(n * d, 24)).astype(np.float32) * 0.1
    base = rng.normal(size=(24,)).astype(np.float32)
    scale = np.array([0.5, 0.7, 0.9], np.float32)
    pre, post, comb = mhc.hc_weights(jnp.asarray(x), fn, base, scale, n=n, norm_eps=1e-6,
                                     hc_eps=1e-6, sinkhorn_iters=20)
    v = x.reshape(3, -1)
    mix = (v @ fn) / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-6)
    sig = lambda z: 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(pre, sig(0.5 * mix[:, :4] + base[:4]) + 1e-6, rtol=1e-5)
    np.testing.assert_allclose(post, 2 * sig(0.7 * mix[:, 4:8] + base[4:8]), rtol=1e-5)
    res = (0.9 * mix[:, 8:] + base[8:]).reshape(3, 4, 4)
    np.testing.assert_allclose(comb, numpy_sinkhorn(res, 20, 1e-6), atol=1e-5)


def test_expand_mixes_over_input_streams_with_comb_transposed():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4, 5)).astype(np.float32)
    f = rng.normal(size=(2, 5)).astype(np.float32)
    post = rng.random(size=(2, 4)).astype(np.float32)
    comb = rng.random(size=(2, 4, 4)).astype(np.float32)
    got = mhc.hc_expand(jnp.asarray(f), jnp.asarray(x), jnp.asarray(post), jnp.asarray(comb))
    want = post[:, :, None] * f[:, None, :] + np.einsum("bjk,bjd->bkd", comb, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    pre = rng.random(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(mhc.hc_collapse(jnp.asarray(x), jnp.asarray(pre)),
                               np.einsum("bj,bjd->bd", pre, x), rtol=1e-5)
