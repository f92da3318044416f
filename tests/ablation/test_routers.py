"""MoE routers of the ablation (issue 23): capacity and top2_softmax against NumPy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm import presets
from sparse_lm.config import ConfigError, ModelConfig
from sparse_lm.model.moe import MoE
from sparse_lm.ops import moe


def _skewed_ids(seed, t=40, e=6, k=2):
    """[T, k] distinct experts per token, expert 0 strongly overloaded."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, e)) + np.array([3.0] + [0.0] * (e - 1))
    return np.argsort(-logits, axis=1)[:, :k].astype(np.int32)


def _numpy_capacity(idx, e, lo, hi):
    counts = np.bincount(idx.reshape(-1), minlength=e).astype(np.float64)
    mean = idx.size / e
    factor = np.clip(1.0 + counts.std() / mean, lo, hi)
    return int(math.ceil(factor * mean - 1e-4)), counts


def _numpy_keep(idx, cap, e):
    seen = np.zeros(e, int)
    keep = np.zeros(idx.shape, bool)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            x = idx[t, j]
            keep[t, j] = seen[x] < cap
            seen[x] += 1
    return keep


@pytest.mark.parametrize("lo,hi", [(1.0, 1.25), (1.0, 4.0), (1.5, 1.5)])
def test_capacity_is_the_formula_never_exceeded_and_drops_counted_exactly(lo, hi):
    e = 6
    idx = _skewed_ids(0, e=e)
    cap, counts = _numpy_capacity(idx, e, lo, hi)
    got = int(moe.batch_capacity(moe.expert_counts(jnp.asarray(idx), e), (lo, hi)))
    assert got == cap
    kept = np.asarray(moe.capacity_keep(jnp.asarray(idx), jnp.int32(got), e))
    np.testing.assert_array_equal(kept, _numpy_keep(idx, cap, e))   # earlier tokens win
    load = np.asarray(moe.expert_counts(jnp.asarray(idx), e, jnp.asarray(kept)))
    assert load.max() <= cap
    dropped = idx.size - load.sum()
    assert dropped == np.maximum(counts - cap, 0).sum()
    assert (dropped > 0) == (counts.max() > cap)


def test_utilisation_variance_loss_matches_numpy_and_is_zero_when_balanced():
    rng = np.random.default_rng(1)
    s = rng.random((30, 5)).astype(np.float32)
    p = (s / s.sum(1, keepdims=True)).mean(0)
    want = np.var(p) / np.mean(p) ** 2
    np.testing.assert_allclose(moe.utilisation_variance_loss(jnp.asarray(s)), want, rtol=1e-5)
    assert float(moe.utilisation_variance_loss(jnp.ones((7, 5)))) < 1e-10


def test_top2_softmax_weights_sum_to_one_and_switch_loss_matches_the_formula():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(25, 6)).astype(np.float32)
    probs, idx, w = moe.top2_softmax_route(jnp.asarray(logits))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, p, rtol=1e-5)
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(np.argsort(-p, 1)[:, :2], 1))
    np.testing.assert_allclose(np.asarray(w).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w, np.take_along_axis(p, np.asarray(idx), 1)
                               / np.take_along_axis(p, np.asarray(idx), 1).sum(1, keepdims=True),
                               rtol=1e-5)
    f = np.bincount(np.asarray(idx).reshape(-1), minlength=6) / idx.size
    want = 6 * np.sum(f * p.mean(0))
    np.testing.assert_allclose(moe.switch_balance_loss(probs, idx), want, rtol=1e-5)


def _tiny(**kw):
    return ModelConfig.from_dict(presets.tiny()).replace(moe_impl="xla", **kw)


def test_capacity_router_in_the_moe_layer_drops_and_counts_and_trains_its_gate():
    cfg = _tiny(moe_router="capacity", router_capacity_range=(1.0, 1.1))
    layer = MoE(cfg, "score", rngs=nnx.Rngs(0))
    # a gate that sends most tokens to expert 0: the capacity must drop some
    layer.gate[...] = layer.gate[...].at[:, 0].add(0.5)
    u = jax.random.normal(jax.random.key(0), (2, 16, cfg.hidden_size))
    ids = jnp.zeros((2, 16), jnp.int32)

    @nnx.jit
    def run(layer, u):
        _, stats, rec = layer(u, ids, record=True)
        grad = nnx.grad(lambda m: m(u, ids)[1]["balance_loss"])(layer)
        return stats, rec, jnp.abs(grad.gate[...]).max()
    stats, rec, grad = run(layer, u)
    kept = np.asarray(rec["kept"]).reshape(-1, cfg.num_experts_per_tok)
    assert np.asarray(stats["expert_counts"]).max() <= int(rec["capacity"])
    assert 32 * cfg.num_experts_per_tok - float(stats["expert_counts"].sum()) == (~kept).sum() > 0
    np.testing.assert_array_equal(np.asarray(rec["weights"])[~np.asarray(rec["kept"])], 0.0)
    assert float(grad) > 0                       # the variance loss trains the gate


@pytest.mark.parametrize("field,value,needle", [
    ("moe_router", "switch", "allowed values: ('v4', 'capacity', 'top2_softmax')"),
    ("router_capacity_range", (2.0, 1.0), "f_min <= f_max"),
])
def test_bad_router_fields_name_the_field_and_the_choices(field, value, needle):
    with pytest.raises(ConfigError, match=rf"model\.{field}=.*{__import__('re').escape(needle)}"):
        _tiny(**{field: value})


def test_top2_softmax_needs_two_experts_per_token():
    with pytest.raises(ConfigError, match=r"model\.num_experts_per_tok=3.*must be 2"):
        _tiny(moe_router="top2_softmax", num_experts_per_tok=3)
