"""Routing statistics on hand-built routing tables with answers computable by hand."""
import math

import numpy as np
import pytest

from sparse_lm.analysis import routing


@pytest.mark.parametrize("e", [2, 8, 16])
def test_everything_on_one_expert(e):
    """A router sending every token to one expert: CV sqrt(E-1), E-1 dead, entropy 0, max E."""
    experts = np.full((100, 1), 3 % e)
    c = routing.expert_counts(experts, e)
    assert c.sum() == 100 and c[3 % e] == 100
    assert routing.load_cv(c) == pytest.approx(math.sqrt(e - 1))
    assert routing.dead_experts(c) == e - 1
    assert routing.load_entropy(c) == pytest.approx(0.0)
    assert routing.max_load(c) == pytest.approx(e)


def test_uniform_routing():
    """Round-robin routing: CV 0, no dead expert, entropy 1, max load 1."""
    e, k = 8, 2
    experts = (np.arange(64)[:, None] * k + np.arange(k)[None, :]) % e
    c = routing.expert_counts(experts, e)
    assert np.all(c == 64 * k / e)
    assert routing.load_cv(c) == pytest.approx(0.0)
    assert routing.dead_experts(c) == 0
    assert routing.load_entropy(c) == pytest.approx(1.0)
    assert routing.max_load(c) == pytest.approx(1.0)


def test_small_table_by_hand():
    """counts [2, 0, 1, 1]: mean 1, std sqrt(1/2), one dead, entropy 1.5 ln2 / ln4 = 0.75."""
    experts = np.array([[0], [0], [2], [3]])
    c = routing.expert_counts(experts, 4)
    np.testing.assert_array_equal(c, [2, 0, 1, 1])
    assert routing.load_cv(c) == pytest.approx(math.sqrt(0.5))
    assert routing.dead_experts(c) == 1
    assert routing.load_entropy(c) == pytest.approx(0.75)
    assert routing.max_load(c) == pytest.approx(2.0)


def test_statistics_broadcast_over_layers():
    """[L, E] counts give one value per layer, equal to the per-row computation."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, (3, 6))
    for f in (routing.load_cv, routing.dead_experts, routing.load_entropy, routing.max_load):
        np.testing.assert_allclose(f(counts), [f(r) for r in counts])


def test_mask_drops_tokens_and_bad_ids_are_refused():
    experts = np.array([[[0, 1], [2, 3]]])               # [B=1, S=2, k=2]
    c = routing.expert_counts(experts, 4, mask=np.array([[True, False]]))
    np.testing.assert_array_equal(c, [1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        routing.expert_counts(np.array([[4]]), 4)


def test_routing_entropy_extremes():
    """Equal affinities: entropy 1; all affinity on one expert: 0; two of four equal: 1/2."""
    assert routing.routing_entropy(np.ones((5, 8))) == pytest.approx(1.0)
    assert routing.routing_entropy(np.eye(8)[[1, 4, 4]]) == pytest.approx(0.0)
    assert routing.routing_entropy(np.array([[1.0, 1.0, 0.0, 0.0]])) == pytest.approx(0.5)


def test_load_table_rows():
    counts = np.array([[4, 0, 0, 0], [1, 1, 1, 1]])
    df = routing.load_table(counts, ["a", "b"], routing=["hash", "score"],
                            affinities=[np.eye(4), np.ones((3, 4))])
    assert list(df["layer"]) == ["a", "b"]
    np.testing.assert_allclose(df["load_cv"], [math.sqrt(3), 0.0])
    np.testing.assert_array_equal(df["dead"], [3, 0])
    np.testing.assert_allclose(df["routing_entropy"], [0.0, 1.0])
    with pytest.raises(ValueError, match="counts must be"):
        routing.load_table(counts, ["only one name"])


def test_counterfactual_loads():
    """Without bias the top-1 expert is always expert 0; a bias of +1 on expert 2 moves every
    token whose affinity gap is below 1 there."""
    aff = np.array([[0.9, 0.1, 0.5], [0.9, 0.0, 0.0], [3.0, 0.0, 0.0]])
    bias = np.array([0.0, 0.0, 1.0])
    with_b, without = routing.counterfactual_loads(aff, bias, k=1)
    np.testing.assert_array_equal(without, [3, 0, 0])
    np.testing.assert_array_equal(with_b, [1, 0, 2])
    same, same2 = routing.counterfactual_loads(aff, np.zeros(3), k=2)
    np.testing.assert_array_equal(same, same2)
    with pytest.raises(ValueError, match="k=4"):
        routing.counterfactual_loads(aff, bias, k=4)


def test_token_expert_map_orders_by_weight():
    toks = np.array([ord("a"), 10, 32])
    experts = np.array([[1, 5], [2, 0], [7, 3]])
    weights = np.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
    df = routing.token_expert_map(toks, experts, weights)
    assert list(df["char"]) == ["a", "\\n", "␣"]
    np.testing.assert_array_equal(df["expert_0"], [5, 2, 7])   # ties keep the listed order
    np.testing.assert_array_equal(df["expert_1"], [1, 0, 3])


def test_expert_token_profile_and_class_matrix():
    toks = np.array([ord("x"), ord("x"), ord("1"), 10])
    experts = np.array([[0], [0], [1], [1]])
    prof = routing.expert_token_profile(toks, experts, 3)
    assert list(prof["assignments"]) == [2, 2, 0]
    assert prof["top_tokens"][0] == "x (100%)"
    m = routing.class_expert_matrix(toks, experts, 3)
    assert m.loc["letter", "e0"] == 1.0 and m.loc["digit", "e1"] == 1.0
    assert m.loc["newline", "e1"] == 1.0 and list(m["tokens"]) == [2, 1, 1]


def test_bias_table_and_correlation():
    df = routing.bias_table([0, 10], {"layer1_csa": np.array([[0.0, 0.0], [0.1, -0.1]])})
    assert len(df) == 4
    assert df.query("step == 10 and expert == 1")["bias"].item() == pytest.approx(-0.1)
    # Overloaded experts should end with low biases: negative correlation.
    assert routing.bias_load_correlation([0.1, 0.0, -0.1], [1, 2, 3]) == pytest.approx(-1.0)
    assert math.isnan(routing.bias_load_correlation([0.0, 0.0], [1, 2]))
    with pytest.raises(ValueError, match="rows for 3 steps"):
        routing.bias_table([0, 1, 2], {"x": np.zeros((2, 2))})


def test_load_over_training_reads_log_records():
    recs = [{"step": 5, "moe/layer1_csa/load_cv": 0.5, "moe/layer1_csa/dead": 1.0},
            {"step": 10, "moe/layer1_csa/load_cv": 0.25}]
    df = routing.load_over_training(recs, ["layer1_csa", "layer9_hca"])
    cv = df[df.stat == "load_cv"]
    assert list(cv["step"]) == [5, 10] and list(cv["value"]) == [0.5, 0.25]
    assert set(df["layer"]) == {"layer1_csa"}
