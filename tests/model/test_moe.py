"""DeepSeekMoE: dropless dispatch equals the dense reference; routing rules of spec §8."""
import numpy as np
import jax
import jax.numpy as jnp

from sparse_lm.ops import moe


def _weights(seed, e=6, d=8, i=5):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=sh).astype(np.float32) * 0.5)
            for sh in ((e, d, i), (e, d, i), (e, i, d))]


def test_dropless_grouped_matmul_equals_dense_reference_forward_and_gradient():
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(11, 8)).astype(np.float32))
    idx = jnp.asarray(np.array([[0, 1]] * 6 + [[5, 0]] * 5, np.int32))  # experts 2..4 get nothing
    wts = jnp.asarray(rng.random(size=(11, 2)).astype(np.float32))
    params = _weights(1)
    f = lambda impl: lambda u, *p: jnp.sum(jnp.tanh(impl(u, idx, wts, *p, 10.0)))
    np.testing.assert_allclose(moe.experts_dropless(u, idx, wts, *params, 10.0),
                               moe.experts_dense_reference(u, idx, wts, *params, 10.0), atol=1e-5)
    g1 = jax.grad(f(moe.experts_dropless), argnums=(0, 1, 2, 3))(u, *params)
    g2 = jax.grad(f(moe.experts_dense_reference), argnums=(0, 1, 2, 3))(u, *params)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bias_changes_selection_but_not_weights():
    s = jnp.asarray([[0.9, 0.8, 0.1, 0.05]])
    idx0 = moe.select_by_score(s, jnp.zeros(4), 2)
    idx1 = moe.select_by_score(s, jnp.asarray([0.0, -1.0, 0.0, 0.0]), 2)
    assert sorted(idx0[0].tolist()) == [0, 1] and sorted(idx1[0].tolist()) == [0, 2]
    w1 = moe.combine_weights(s, idx1, 1.5)
    chosen = np.asarray(s[0, idx1[0]])          # unbiased affinities of the chosen experts
    np.testing.assert_allclose(w1[0], chosen / chosen.sum() * 1.5, rtol=1e-6)
    np.testing.assert_allclose(w1.sum(), 1.5, rtol=1e-6)


def test_affinity_is_sqrt_softplus_and_swiglu_clamp_is_asymmetric():
    u, g = jnp.ones((1, 2)), jnp.asarray([[1.0, -2.0], [0.5, 0.0]])
    np.testing.assert_allclose(moe.affinities(u, g), np.sqrt(np.log1p(np.exp([[1.5, -2.0]]))), rtol=1e-6)
    out = moe.swiglu(jnp.asarray([-50.0, 50.0]), jnp.asarray([-50.0, 50.0]), 10.0)
    silu = lambda x: x / (1 + np.exp(-x))
    np.testing.assert_allclose(out, [silu(-50.0) * -10.0, silu(10.0) * 10.0], rtol=1e-5)


def test_hash_routing_depends_on_token_id_only_and_table_is_balanced():
    table = moe.balanced_hash_table(vocab=100, num_experts=8, k=3, seed=0)
    assert all(len(set(r)) == 3 for r in table.tolist())
    load = np.bincount(table.ravel(), minlength=8)
    assert load.max() - load.min() <= 1
    ids = jnp.asarray([5, 7, 5])
    np.testing.assert_array_equal(moe.select_by_hash(ids, jnp.asarray(table)), table[[5, 7, 5]])


def test_sequence_balance_loss_matches_formula():
    rng = np.random.default_rng(3)
    s = rng.random(size=(2, 5, 4)).astype(np.float32)
    idx = np.stack([np.argsort(-s[b], axis=-1)[:, :2] for b in range(2)])
    got = moe.sequence_balance_loss(jnp.asarray(s), jnp.asarray(idx), 2)
    want = []
    for b in range(2):
        f = np.array([(idx[b] == i).any(-1).sum() for i in range(4)]) * 4 / (2 * 5)
        p = (s[b] / s[b].sum(-1, keepdims=True)).mean(0)
        want.append((f * p).sum())
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


def test_few_assignments_take_the_gathered_path_equal_to_the_dense_reference():
    """T*k <= E (a decode step): `experts_dropless` multiplies by the gathered matrices of the
    chosen experts; same forward and gradient as the dense reference, repeated experts too."""
    rng = np.random.default_rng(4)
    u = jnp.asarray(rng.normal(size=(3, 8)).astype(np.float32))
    idx = jnp.asarray(np.array([[0, 5], [5, 2], [3, 5]], np.int32))      # 6 assignments, E = 6
    wts = jnp.asarray(rng.random(size=(3, 2)).astype(np.float32))
    params = _weights(2)
    np.testing.assert_allclose(moe.experts_gathered(u, idx, wts, *params, 10.0),
                               moe.experts_dense_reference(u, idx, wts, *params, 10.0), atol=1e-5)
    f = lambda impl: lambda u, *p: jnp.sum(jnp.tanh(impl(u, idx, wts, *p, 10.0)))
    g1 = jax.grad(f(moe.experts_dropless), argnums=(0, 1, 2, 3))(u, *params)
    g2 = jax.grad(f(moe.experts_dense_reference), argnums=(0, 1, 2, 3))(u, *params)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_decode_sized_call_does_not_copy_the_expert_weights():
    """One token, k = 2 of E = 8 experts: the compiled call holds no copy or transpose as large
    as one expert weight tensor (lax.ragged_dot on XLA:CPU transposed all three every call)."""
    e, d, i = 8, 64, 48
    params = _weights(3, e=e, d=d, i=i)
    u = jnp.ones((1, d), jnp.float32)
    idx = jnp.asarray([[1, 6]], jnp.int32)
    wts = jnp.full((1, 2), 0.5, jnp.float32)
    text = jax.jit(lambda *a: moe.experts_dropless(*a, 10.0)).lower(
        u, idx, wts, *params).compile().as_text()
    big = e * d * i
    for line in text.splitlines():
        head = line.split("=", 1)[-1].strip()
        if head.split("{")[0].startswith("f32[") and (" copy(" in line or " transpose(" in line):
            dims = [int(x) for x in head[4:head.index("]")].split(",") if x]
            assert int(np.prod(dims)) < big, line.strip()[:200]
