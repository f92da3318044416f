"""The distillation objectives against NumPy on small logits (sparse_lm/distill/losses.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.distill import losses
from sparse_lm.distill.loop import completion_mask


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(logp, logq):
    return (np.exp(logp) * (logp - logq)).sum(-1)


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(2, 3, 11)).astype(np.float32) * 2,
            rng.normal(size=(2, 3, 11)).astype(np.float32) * 2)


def test_reverse_and_forward_kl_equal_numpy(logits):
    s, t = logits
    np.testing.assert_allclose(losses.reverse_kl(s, t), _kl(_log_softmax(s), _log_softmax(t)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.forward_kl(s, t), _kl(_log_softmax(t), _log_softmax(s)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 11])
def test_topk_reverse_kl_renormalises_both_over_the_students_top_k(logits, k):
    s, t = logits
    idx = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    s_k, t_k = np.take_along_axis(s, idx, -1), np.take_along_axis(t, idx, -1)
    expected = _kl(_log_softmax(s_k), _log_softmax(t_k))     # both renormalised over K
    got = losses.topk_reverse_kl(s, t, k)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if k == 1:
        np.testing.assert_allclose(got, 0.0, atol=1e-6)      # one token: both distributions agree
    if k == s.shape[-1]:
        np.testing.assert_allclose(got, losses.reverse_kl(s, t), rtol=1e-5, atol=1e-6)


def test_topk_selection_carries_no_gradient_and_the_rest_of_the_vocabulary_gets_none(logits):
    s, t = logits
    g = jax.grad(lambda x: jnp.sum(losses.topk_reverse_kl(x, t, 3)))(jnp.asarray(s))
    outside = np.ones(s.shape, bool)
    np.put_along_axis(outside, np.argsort(-s, axis=-1)[..., :3], False, -1)
    assert np.all(np.asarray(g)[outside] == 0) and np.any(np.asarray(g)[~outside] != 0)


def test_token_log_probs_and_masked_means_equal_numpy(logits):
    s, _ = logits
    tokens = np.asarray([[1, 5, 10], [0, 0, 7]])
    mask = np.asarray([[True, True, False], [True, False, False]])
    lp = np.take_along_axis(_log_softmax(s), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses.token_log_probs(s, tokens), lp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses.masked_mean(jnp.asarray(lp), mask), lp[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.row_means(jnp.asarray(lp), mask),
                               [lp[0, :2].mean(), lp[1, 0]], rtol=1e-5)


def test_completion_mask_keeps_tokens_up_to_and_including_the_first_stop():
    toks = np.asarray([[3, 9, 4, 9], [1, 2, 3, 4]])
    assert completion_mask(toks, 9).tolist() == [[True, True, False, False], [True] * 4]
    assert completion_mask(toks, -1).all()
