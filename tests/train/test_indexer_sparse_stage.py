"""The indexer objective of the sparse stage (spec §6, V3.2): the KL is restricted to the selected
entries and computed from them alone (`ops.indexer.indexer_scores_selected`,
`selected_attention_mass`, `indexer_objective_selected`), and the recall metric is measured on
sampled queries against the DENSE attention mass (`sparse_stage_recall`, lse corrected from the
sparse softmax). Checked against the dense forms restricted to the same set; a few seconds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.ops.implementations import sparse_attention
from sparse_lm.ops.masks import sequence_entry_visible
from sparse_lm.ops.indexer import (compressed_attention_mass, indexer_objective,
                                   indexer_objective_selected, indexer_scores,
                                   indexer_scores_selected, sampled_rows, select_topk,
                                   selected_attention_mass, sparse_stage_recall)

M, K, SCALE = 4, 3, 0.25


def _inputs(s, packed, seed=0, b=2, hi=3, di=8, h=2, d=16):
    rng = np.random.default_rng(seed)
    n = s // M
    f = lambda *sh: jnp.asarray(rng.normal(size=sh), jnp.float32)  # noqa: E731
    q, w, keys, qa, ent = f(b, s, hi, di), f(b, s, hi), f(b, n, di), f(b, s, h, d), f(b, n, d)
    kv, sink = f(b, s, d), f(h)
    if packed:
        seg = jnp.asarray(np.broadcast_to(np.repeat([0, 1, 2], [11, s - 25, 14]), (b, s)),
                          jnp.int32)
        win = np.asarray(seg)[:, : n * M].reshape(b, n, M)
        valid = jnp.asarray(np.all(win == win[:, :, :1], -1))
    else:
        seg, valid = None, jnp.ones((b, n), bool)
    vis = sequence_entry_visible(s, M, valid, seg)
    sel = select_topk(indexer_scores(q, w, keys, vis), K)
    return dict(q=q, w=w, keys=keys, qa=qa, ent=ent, kv=kv, sink=sink, seg=seg, valid=valid,
                vis=vis, sel=sel)


def _picked(sel, n):
    return jnp.any(sel[..., None] == jnp.arange(n), axis=-2)


@pytest.mark.parametrize("packed", [False, True])
def test_selected_kl_equals_dense_kl_restricted_to_the_selected_set(packed):
    x = _inputs(45, packed)
    sel, n = x["sel"], x["keys"].shape[1]
    lse = jnp.asarray(np.random.default_rng(1).normal(size=x["qa"].shape[:3]), jnp.float32) + 3.0
    only = _picked(sel, n) & x["vis"]                     # the selected set as a visibility mask

    def dense(q, w, keys):
        mass = compressed_attention_mass(x["qa"], x["ent"], lse, only, SCALE)
        return indexer_objective(indexer_scores(q, w, keys, only), mass, only, sel)[0]

    def selected(q, w, keys):
        mass = selected_attention_mass(x["qa"], x["ent"], lse, sel, SCALE)
        return indexer_objective_selected(indexer_scores_selected(q, w, keys, sel), mass, sel)

    args = (x["q"], x["w"], x["keys"])
    want, got = dense(*args), selected(*args)
    assert float(want) > 1e-3                              # a real, non-zero objective
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    gw = jax.grad(dense, argnums=(0, 1, 2))(*args)
    gg = jax.grad(selected, argnums=(0, 1, 2))(*args)
    for a, b in zip(gg, gw):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
        assert float(jnp.max(jnp.abs(b))) > 0


def test_selected_scores_are_the_full_scores_at_the_picks():
    x = _inputs(45, True)
    full = indexer_scores(x["q"], x["w"], x["keys"], x["vis"])
    got = indexer_scores_selected(x["q"], x["w"], x["keys"], x["sel"])
    want = jnp.take_along_axis(full, jnp.maximum(x["sel"], 0), axis=-1)
    unused = x["sel"] < 0
    assert bool(jnp.any(unused)) and bool(jnp.any(~unused))
    np.testing.assert_allclose(np.asarray(jnp.where(unused, 0.0, got)),
                               np.asarray(jnp.where(unused, 0.0, want)), rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(jnp.isneginf(jnp.where(unused, got, -jnp.inf))))


@pytest.mark.parametrize("packed,samples", [(False, 512), (True, 512), (False, 9)])
def test_sparse_stage_recall_is_the_dense_attention_recall(packed, samples):
    """Recall from the sparse softmax's lse equals the recall computed from a dense attention pass
    (lse over window + sink + every visible entry), on all queries or on the sampled ones."""
    s = 45
    x = _inputs(s, packed, seed=2)
    common = dict(window=8, scale=SCALE, segment_ids=x["seg"], compressed=x["ent"],
                  compressed_valid=x["valid"], ratio=M, implementation="reference",
                  return_lse=True)
    _, lse_sparse = sparse_attention(x["qa"], x["kv"], x["sink"], topk_idx=x["sel"], **common)
    _, lse_dense = sparse_attention(x["qa"], x["kv"], x["sink"], topk_idx=None, **common)
    assert float(jnp.max(jnp.abs(lse_dense - lse_sparse))) > 1e-2   # the correction matters
    rows = sampled_rows(s, samples)
    assert len(rows) == min(s, samples) and int(rows[-1]) == s - 1
    mass = compressed_attention_mass(x["qa"], x["ent"], lse_dense, x["vis"], SCALE)
    _, want = indexer_objective(jnp.zeros_like(mass)[:, rows], mass[:, rows], x["vis"][:, rows],
                                x["sel"][:, rows])
    got = sparse_stage_recall(x["qa"], x["ent"], lse_sparse, x["valid"], x["sel"], ratio=M,
                              scale=SCALE, segment_ids=x["seg"], samples=samples)
    assert 0.0 < float(want) < 1.0
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
