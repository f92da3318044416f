"""Attention-mass accounting (`ops.attention.attention_mass_split`, summarised by
`analysis.attention_mass`): known answers for uniform logits, and consistency with the lse of
the real attention for CSA, HCA and packed documents."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.analysis import attention_mass as am
from sparse_lm.ops.attention import attention_mass_split
from sparse_lm.ops.implementations import sparse_attention
from sparse_lm.ops.masks import sequence_entry_visible, sequence_window_visible


def test_uniform_logits_split_by_counting_keys():
    """q = 0 makes every logit 0: each attended key and the sink (logit 0) get 1/(n_w + n_c + 1)."""
    b, s, h, d, w, m, n = 1, 12, 2, 4, 3, 4, 3
    q = jnp.zeros((b, s, h, d))
    kv = jnp.asarray(np.random.default_rng(0).normal(size=(b, s, d)), jnp.float32)
    entries = jnp.ones((b, n, d))
    vis = sequence_entry_visible(s, m, jnp.ones((b, n), bool))
    t = np.arange(s)
    nw = np.minimum(t + 1, w)
    nc = (t + 1) // m
    lse = jnp.broadcast_to(jnp.log(jnp.asarray(nw + nc + 1.0))[None, :, None], (b, s, h))
    sp = attention_mass_split(q, kv, jnp.zeros(h), lse, window=w, scale=1.0, entries=entries, attended=vis)
    denom = nw + nc + 1.0
    np.testing.assert_allclose(sp["window"][0, :, 0], nw / denom, rtol=1e-6)
    np.testing.assert_allclose(sp["compressed"][0, :, 1], nc / denom, rtol=1e-6)
    np.testing.assert_allclose(sp["sink"][0, :, 0], 1 / denom, rtol=1e-6)


@pytest.mark.parametrize("case", ["csa_topk", "hca_dense", "window_only", "packed"])
def test_parts_sum_to_one_with_the_real_lse(case):
    rng = np.random.default_rng(1)
    b, s, h, d, w, m, k = 2, 40, 3, 8, 6, 4, 3
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    q, kv, sink = f(b, s, h, d), f(b, s, d), f(h)
    seg = None
    if case == "packed":
        seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 20], b, 0), jnp.int32)
    n = s // m
    entries = f(b, n, d)
    valid = jnp.ones((b, n), bool)
    vis = sequence_entry_visible(s, m, valid, seg)
    kw = dict(window=w, scale=d ** -0.5, segment_ids=seg)
    if case == "window_only":
        _, lse = sparse_attention(q, kv, sink, **kw, implementation="reference", return_lse=True)
        sp = attention_mass_split(q, kv, sink, lse, **kw)
        assert float(jnp.abs(sp["compressed"]).max()) == 0.0
    elif case == "csa_topk":
        scores = jnp.where(vis, f(b, s, n), -jnp.inf)
        sel = jnp.where(jnp.isfinite(jax.lax.top_k(scores, k)[0]), jax.lax.top_k(scores, k)[1], -1)
        _, lse = sparse_attention(q, kv, sink, **kw, compressed=entries, compressed_valid=valid,
                                  ratio=m, topk_idx=sel, implementation="reference", return_lse=True)
        counts = jnp.sum(jax.nn.one_hot(sel, n), -2)
        sp = attention_mass_split(q, kv, sink, lse, **kw, entries=entries, attended=counts)
    else:
        _, lse = sparse_attention(q, kv, sink, **kw, compressed=entries, compressed_valid=valid,
                                  ratio=m, implementation="reference", return_lse=True)
        sp = attention_mass_split(q, kv, sink, lse, **kw, entries=entries, attended=vis)
    total = sp["window"] + sp["compressed"] + sp["sink"]
    np.testing.assert_allclose(total, 1.0, atol=2e-6)
    assert float(jnp.min(jnp.stack([sp[p] for p in am.PARTS]))) >= 0.0


def test_a_large_sink_takes_the_mass():
    b, s, h, d = 1, 8, 2, 4
    q = jnp.ones((b, s, h, d))
    kv = jnp.ones((b, s, d)) * 0.1
    sink = jnp.array([20.0, -20.0])
    _, lse = sparse_attention(q, kv, sink, window=4, scale=1.0, implementation="reference",
                              return_lse=True)
    sp = attention_mass_split(q, kv, sink, lse, window=4, scale=1.0)
    assert float(sp["sink"][..., 0].min()) > 0.99 and float(sp["sink"][..., 1].max()) < 1e-6


def test_duplicate_listing_counts_twice():
    """An entry listed twice contributes twice its probability, as the attention counts it."""
    q = jnp.zeros((1, 4, 1, 2))
    kv = jnp.zeros((1, 4, 2))
    entries = jnp.zeros((1, 1, 2))
    att = jnp.asarray([[[2.0]] * 4])                       # [B, S, N] listing counts
    lse = jnp.log(jnp.full((1, 4, 1), 4.0))              # window 1 + entry x2 + sink = 4 e^0
    sp = attention_mass_split(q, kv, jnp.zeros(1), lse, window=1, scale=1.0, entries=entries, attended=att)
    np.testing.assert_allclose(sp["compressed"], 0.5)
    np.testing.assert_allclose(sp["window"], 0.25)


def test_window_mask_respects_documents_and_errors():
    m = np.asarray(sequence_window_visible(6, 2, jnp.asarray([[1, 1, 1, 2, 2, 2]])))
    assert m[0, 3, 3] and not m[0, 3, 2] and m[0, 2, 1] and not m[0, 2, 0]
    with pytest.raises(ValueError, match="window=0"):
        sequence_window_visible(4, 0)
    with pytest.raises(ValueError, match="attended"):
        attention_mass_split(jnp.zeros((1, 4, 1, 2)), jnp.zeros((1, 4, 2)), jnp.zeros(1),
                      jnp.zeros((1, 4, 1)), window=2, scale=1.0, entries=jnp.zeros((1, 1, 2)))


def test_means_and_position_bins():
    split = {"window": np.array([[[1.0], [0.5], [0.0], [0.0]]]),
             "compressed": np.array([[[0.0], [0.5], [1.0], [0.5]]]),
             "sink": np.array([[[0.0], [0.0], [0.0], [0.5]]])}
    m = am.mean_split(split, query_mask=np.array([[True, True, False, False]]))
    assert m == {"window": 0.75, "compressed": 0.25, "sink": 0.0}
    byp = am.split_by_position(split, [0, 2, 4, 8])
    np.testing.assert_allclose(byp["compressed"][:2], [0.25, 0.75])
    assert np.isnan(byp["sink"][2])
