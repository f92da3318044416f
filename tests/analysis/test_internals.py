"""The layer-by-layer collector reproduces the model's own forward and statistics (tiny config:
SWA, CSA, HCA layers, hash and score routing, MTP), and its summaries have known answers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.analysis import indexer_stats, internals
from sparse_lm.model import build_model
from tests.conftest import tiny_config

B, S = 2, 48


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(num_layers=4)                       # [swa, csa (hash), hca, csa] + MTP
    assert {s.kind for s in cfg.layers} == {"swa", "csa", "hca"}
    assert {s.routing for s in cfg.layers} == {"hash", "score"}
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    # Non-zero router biases so that score routing differs from plain top-k of the affinities.
    for blk in model.layer_blocks():
        if blk.moe.routing == "score":
            blk.moe.bias[...] = jnp.asarray(rng.normal(size=blk.moe.bias[...].shape) * 0.05,
                                            jnp.float32)
    tokens = rng.integers(0, cfg.vocab_size, (B, S))
    seg = np.ones((B, S), np.int32)
    seg[1, 24:] = 2                                        # two packed documents in row 1
    return cfg, model, tokens, seg


def _model_forward(model, tokens, seg, sparse):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, t, s: nnx.merge(graphdef, st)(t, segment_ids=s, sparse=sparse,
                                                          return_aux=True))
    return f(state, jnp.asarray(tokens, jnp.int32), jnp.asarray(seg))


@pytest.fixture(scope="module")
def model_out(setup):
    _, model, tokens, seg = setup
    return {sparse: _model_forward(model, tokens, seg, sparse) for sparse in (True, False)}


def test_collect_reproduces_the_model(setup, model_out):
    """Same logits and expert counts as `model(...)`; the parts of every softmax sum to 1; each
    CSA query selects min(k, visible) entries."""
    cfg, model, tokens, seg = setup
    out = model_out[True]
    got = internals.collect(model, tokens, seg)
    np.testing.assert_allclose(got.logits, np.asarray(out.logits), atol=2e-5)
    assert [l.name for l in got.layers] == internals.layer_names(cfg)
    np.testing.assert_array_equal(internals.routing_counts(got), np.asarray(out.expert_counts))
    for l in got.layers:
        total = l["window_mass"] + l["compressed_mass"] + l["sink_mass"]
        np.testing.assert_allclose(total, 1.0, atol=3e-5)
        assert (l.kind == "csa") == ("topk" in l.arrays)
        assert (l.kind == "swa") == ("dense_mass" not in l.arrays)
    for l in got.of_kind("csa"):
        np.testing.assert_array_equal(
            indexer_stats.selected_per_query(l["topk"]),
            np.minimum(indexer_stats.visible_per_query(l["visible"]), cfg.index_topk))
    # The model's recall statistic in the dense stage (its lse is then the dense one) is
    # recall_at_k of the collected scores and dense mass at the model's k. Only the first CSA
    # layer sees the same input in the sparse and the dense forward.
    first = got.of_kind("csa")[0]
    assert all(s.kind == "swa" for s in cfg.layers[:first.index])
    r = indexer_stats.recall_at_k(first["scores"], first["dense_mass"], first["visible"],
                                  [cfg.index_topk])
    assert r[0] == pytest.approx(float(model_out[False].indexer_recall[first.index]), abs=1e-5)


def test_bits_vs_topk(setup, model_out):
    """k = the model's k gives the sparse model's loss; k >= every visible entry gives the dense
    (warm-up) model's loss; k = 0 is window-only and differs."""
    cfg, model, tokens, seg = setup
    n = S // cfg.compress_ratio_csa
    bits = internals.bits_vs_topk(model, tokens, seg, [0, cfg.index_topk, n])
    ref = {s: internals.next_token_bits(np.asarray(model_out[s].logits), tokens, seg)
           for s in (True, False)}
    assert bits[cfg.index_topk] == pytest.approx(ref[True], abs=1e-5)
    assert bits[n] == pytest.approx(ref[False], abs=1e-5)
    assert abs(bits[0] - ref[False]) > 1e-4
    with pytest.raises(ValueError, match="ks="):
        internals.bits_vs_topk(model, tokens, seg, [])
    with pytest.raises(ValueError, match="topk=0"):
        internals.collect(model, tokens, seg, topk=0)


def test_router_biases_and_names(setup):
    cfg, model, _, _ = setup
    biases = internals.router_biases(model)
    score_layers = [f"layer{s.index}_{s.kind}" for s in cfg.layers if s.routing == "score"]
    assert list(biases) == score_layers + ["mtp"]
    assert all(b.shape == (cfg.n_routed_experts,) for b in biases.values())
    assert any(np.abs(b).sum() > 0 for b in biases.values())


def test_next_token_bits():
    """Uniform logits cost log2(V) bits per token; a certain right answer costs 0; pairs
    across documents are skipped."""
    v = 16
    toks = np.array([[1, 2, 3, 4]])
    assert internals.next_token_bits(np.zeros((1, 4, v)), toks) == pytest.approx(math.log2(v))
    sure = np.full((1, 4, v), -1e9)
    sure[0, np.arange(3), toks[0, 1:]] = 0.0
    assert internals.next_token_bits(sure, toks) == pytest.approx(0.0, abs=1e-9)
    sure[0, 1] = 0.0                                        # position 1 now uniform ...
    seg = np.array([[1, 1, 2, 2]])                          # ... but 1 -> 2 crosses documents
    assert internals.next_token_bits(sure, toks, seg) == pytest.approx(0.0, abs=1e-9)
