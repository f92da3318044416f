"""Indexer statistics on constructed scores and masses with known answers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.analysis import indexer_stats as ix
from sparse_lm.ops.masks import sequence_entry_visible
from sparse_lm.ops.indexer import (indexer_head_scores, indexer_objective, indexer_scores,
                                   select_topk)


def _one_query(scores, mass, visible=None):
    s = np.asarray(scores, float)[None, None]
    m = np.asarray(mass, float)[None, None]
    v = np.ones_like(s, bool) if visible is None else np.asarray(visible)[None, None]
    return s, m, v


def test_recall_by_hand():
    """mass [.5, .3, .2] ranked by score [0, 1, 2] -> picks entry 2, then 0, then 1."""
    s, m, v = _one_query([1.0, 0.0, 2.0], [0.5, 0.3, 0.2])
    np.testing.assert_allclose(ix.recall_at_k(s, m, v, [0, 1, 2, 3]), [0.0, 0.2, 0.7, 1.0])
    np.testing.assert_allclose(ix.oracle_recall_at_k(m, v, [1, 2, 3]), [0.5, 0.8, 1.0])


def test_recall_is_one_when_k_covers_every_visible_entry():
    rng = np.random.default_rng(0)
    b, s, n = 2, 24, 6
    visible = np.asarray(sequence_entry_visible(s, 4, jnp.ones((b, n), bool)))
    scores = rng.normal(size=(b, s, n))
    mass = rng.uniform(size=(b, s, n))
    r = ix.recall_at_k(scores, mass, visible, [n, n + 3])
    np.testing.assert_allclose(r, 1.0)
    # and it never decreases with k, and never beats the oracle
    ks = list(range(n + 1))
    r = ix.recall_at_k(scores, mass, visible, ks)
    o = ix.oracle_recall_at_k(mass, visible, ks)
    assert np.all(np.diff(r) >= -1e-12) and np.all(r <= o + 1e-12)


def test_invisible_entries_never_count():
    """An invisible entry with the top score and lots of (spurious) mass is ignored."""
    s, m, v = _one_query([9.0, 1.0, 0.0], [10.0, 1.0, 3.0], [False, True, True])
    np.testing.assert_allclose(ix.recall_at_k(s, m, v, [1, 2]), [0.25, 1.0])


def test_rows_without_mass_are_excluded():
    scores = np.array([[[1.0, 0.0], [1.0, 0.0]]])
    mass = np.array([[[0.0, 0.0], [0.0, 1.0]]])          # query 0 has no mass anywhere
    vis = np.ones_like(scores, bool)
    np.testing.assert_allclose(ix.recall_at_k(scores, mass, vis, [1]), [0.0])


def test_selection_recall_matches_the_model_objective():
    """The recall of an explicit top-k equals `ops.indexer.indexer_objective`'s recall and
    recall_at_k at the same k."""
    rng = np.random.default_rng(1)
    b, s, n, k = 2, 32, 8, 3
    visible = sequence_entry_visible(s, 4, jnp.ones((b, n), bool))
    scores = jnp.where(visible, jnp.asarray(rng.normal(size=(b, s, n)), jnp.float32), -jnp.inf)
    mass = jnp.where(visible, jnp.asarray(rng.uniform(size=(b, s, n)), jnp.float32), 0.0)
    sel = select_topk(scores, k)
    _, recall_model = indexer_objective(scores, mass, visible, sel)
    assert ix.selection_recall(sel, mass, visible) == pytest.approx(float(recall_model), abs=1e-6)
    assert ix.recall_at_k(scores, mass, visible, [k])[0] == pytest.approx(float(recall_model), abs=1e-6)


def test_head_scores_sum_to_the_indexer_score():
    rng = np.random.default_rng(2)
    b, s, n, hi, di = 1, 16, 4, 3, 5
    q = rng.normal(size=(b, s, hi, di)).astype(np.float32)
    w = rng.normal(size=(b, s, hi)).astype(np.float32)
    keys = rng.normal(size=(b, n, di)).astype(np.float32)
    vis = sequence_entry_visible(s, 4, jnp.ones((b, n), bool))
    hs = indexer_head_scores(q, w, keys, vis)
    total = jnp.where(vis, hs.sum(2), -jnp.inf)
    np.testing.assert_allclose(total, indexer_scores(jnp.asarray(q), jnp.asarray(w),
                                                     jnp.asarray(keys), vis), rtol=1e-5)
    assert float(jnp.abs(jnp.where(vis[:, :, None], 0.0, hs)).max()) == 0.0


def test_counts_and_selection_matrix():
    topk = np.array([[[0, 2, -1], [-1, -1, -1]]])
    np.testing.assert_array_equal(ix.selected_per_query(topk), [[2, 0]])
    m = ix.selection_matrix(topk, 4)
    np.testing.assert_array_equal(m[0, 0], [True, False, True, False])
    assert not m[0, 1].any()
    vis = sequence_entry_visible(12, 4, jnp.ones((1, 3), bool))
    np.testing.assert_array_equal(ix.visible_per_query(vis)[0], np.arange(1, 13) // 4)


def test_selection_distances():
    """ratio 4, query 11 picks entries 0 and 1 (last tokens 3 and 7): distances 8 and 4."""
    topk = np.full((1, 12, 2), -1)
    topk[0, 11] = [0, 1]
    topk[0, 3] = [0, -1]                                   # the block ending at the query: 0
    d = ix.selection_distances(topk, 4)
    assert sorted(d.tolist()) == [0, 4, 8]
    h = ix.distance_histogram(d, [0, 1, 5, 9])
    np.testing.assert_allclose(h, [1 / 3, 1 / 3, 1 / 3])
    # S=8: entry 0 (last token 3) is visible to queries 3..7, entry 1 (last token 7) to query 7
    vis = sequence_entry_visible(8, 4, jnp.ones((1, 2), bool))
    assert sorted(ix.visible_distances(vis, 4).tolist()) == [0, 0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="ratio"):
        ix.selection_distances(topk, 0)


def test_head_agreement():
    """Identical heads agree fully; heads preferring different entries (k=1) do not at all."""
    b, s, n = 1, 16, 4
    vis = np.asarray(sequence_entry_visible(s, 4, jnp.ones((b, n), bool)))
    base = np.random.default_rng(3).uniform(size=(b, s, n))
    same = np.stack([base, base * 2.0], axis=2)              # same ranking
    np.testing.assert_allclose(ix.head_agreement(same, vis, 1), 1.0)
    e0 = np.broadcast_to(np.array([1.0, 0, 0, 0]), (b, s, n))
    e1 = np.broadcast_to(np.array([0, 1.0, 0, 0]), (b, s, n))
    a = ix.head_agreement(np.stack([e0, e1], 2), vis, 1)
    np.testing.assert_allclose(a, [[1.0, 0.0], [0.0, 1.0]])
    # head 0 dominates the sum, so it agrees with the combined choice and head 1 does not
    hv = ix.head_vs_combined(np.stack([3 * e0, e1], 2), vis, 1)
    np.testing.assert_allclose(hv, [1.0, 0.0])
    # with k >= every visible count, no query counts
    assert np.isnan(ix.head_agreement(same, vis, n)).all()
