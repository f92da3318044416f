"""Lightning indexer: brute-force scores, only visible entries selected, -1 padding."""
import numpy as np
import jax.numpy as jnp

from sparse_lm.ops.masks import sequence_entry_visible
from sparse_lm.ops.indexer import indexer_objective, indexer_scores, select_topk


def test_scores_equal_weighted_relu_sum_over_heads():
    rng = np.random.default_rng(0)
    q, w, k = rng.normal(size=(1, 6, 3, 4)), rng.normal(size=(1, 6, 3)), rng.normal(size=(1, 5, 4))
    vis = np.ones((1, 6, 5), bool); vis[0, 0, 2:] = False
    got = np.asarray(indexer_scores(jnp.asarray(q), jnp.asarray(w), jnp.asarray(k), jnp.asarray(vis)))
    for t in range(6):
        for s in range(5):
            want = sum(w[0, t, h] * max(q[0, t, h] @ k[0, s], 0) for h in range(3))
            if vis[0, t, s]:
                np.testing.assert_allclose(got[0, t, s], want, rtol=1e-5, atol=1e-6)
            else:
                assert got[0, t, s] == -np.inf


def test_topk_selects_only_visible_entries_and_pads_with_minus_one():
    rng = np.random.default_rng(1)
    s, m = 24, 4
    vis = sequence_entry_visible(s, m, jnp.ones((2, s // m), bool))
    scores = jnp.where(vis, jnp.asarray(rng.normal(size=(2, s, s // m)), jnp.float32), -jnp.inf)
    idx = np.asarray(select_topk(scores, 3))
    assert idx.shape == (2, s, 3)
    for b in range(2):
        for t in range(s):
            n_vis = (t + 1) // m
            picked = idx[b, t]
            assert (picked[: min(3, n_vis)] >= 0).all() and (picked[min(3, n_vis):] == -1).all()
            assert all(p < n_vis for p in picked if p >= 0)
            if n_vis:  # exactly the best visible ones
                best = set(np.argsort(-np.asarray(scores[b, t, :n_vis]), kind="stable")[:3].tolist())
                assert set(p for p in picked if p >= 0) == best
    assert (idx[:, :3] == -1).all()      # entry 0 is visible only from token 3 on; never clamped to 0


def test_topk_width_is_number_of_entries_when_k_exceeds_it():
    scores = jnp.zeros((1, 8, 2))
    assert select_topk(scores, 5).shape == (1, 8, 2)
    assert select_topk(jnp.zeros((1, 3, 0)), 5).shape == (1, 3, 0)


def test_indexer_objective_zero_kl_and_full_recall_when_scores_match_target():
    mass = jnp.asarray([[[0.5, 0.3, 0.2, 0.0]]])
    vis = jnp.asarray([[[True, True, True, False]]])
    scores = jnp.where(vis, jnp.log(jnp.maximum(mass, 1e-9)), -jnp.inf)
    kl, recall = indexer_objective(scores, mass, vis, jnp.asarray([[[0, 1, 2]]]))
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    np.testing.assert_allclose(recall, 1.0, atol=1e-6)
    _, recall1 = indexer_objective(scores, mass, vis, jnp.asarray([[[1, -1, -1]]]))
    np.testing.assert_allclose(recall1, 0.3, atol=1e-6)
