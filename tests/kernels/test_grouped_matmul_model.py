"""Wiring of the grouped-matmul registry into the MoE (additive; default moe_impl unchanged):
`ops.moe.experts_grouped` equals `experts_dropless` (lax.ragged_dot) in value and gradient with
unused experts and a dominant expert, through every implementation (Pallas interpreted), and
the tiny config's MoE layer with moe_impl=None / "pallas_tpu" (the old "grouped" / "pallas")
gives the default layer's output.
About 40 s."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.config import ConfigError
from sparse_lm.ops import moe
from tests.conftest import tiny_config


def _inputs(seed=0, t=24, d=16, inter=8, e=6, k=2):
    rng = np.random.default_rng(seed)
    u = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    idx = rng.integers(0, e - 2, size=(t, k))       # experts e-2, e-1 get nothing
    idx[: t // 2, 0] = 1                            # expert 1 takes most rows
    idx[: t // 2, 1] = 0
    weights = jnp.asarray(rng.random((t, k)), jnp.float32)
    params = [jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), jnp.float32)
              for shape in ((e, d, inter), (e, d, inter), (e, inter, d))]
    return u, jnp.asarray(idx, jnp.int32), weights, params


@pytest.mark.parametrize("impl", [None, "pallas_tpu", "pallas_gpu"])   # None = ragged_dot on CPU
def test_experts_grouped_equals_dropless(impl):
    u, idx, weights, params = _inputs()

    def run(fn):
        def loss(u, *p):
            return jnp.sum(jnp.sin(fn(u, idx, weights, *p, 10.0)))
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(u, *params)

    with jax.default_matmul_precision("highest"):
        want = run(moe.experts_dropless)
        got = run(lambda *a: moe.experts_grouped(*a, implementation=impl))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("moe_impl", [None, "pallas_tpu"])
def test_moe_layer_with_registry_matches_default(moe_impl):
    """The MoE module (score routing, shared expert) with moe_impl from the registry gives the
    default module's output: same parameters (same seed), same tokens."""
    from flax import nnx
    from sparse_lm.model.moe import MoE
    u = jax.random.normal(jax.random.key(1), (1, 12, 64), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(1, 12)), jnp.int32)
    base = MoE(tiny_config(), "score", rngs=nnx.Rngs(0))(u, ids)[0]
    got = MoE(tiny_config(moe_impl=moe_impl), "score", rngs=nnx.Rngs(0))(u, ids)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=1e-5, atol=1e-5)


def test_config_accepts_registry_names_only():
    assert set(moe.EXPERT_IMPLEMENTATIONS) >= {None, "pallas_tpu", "pallas_gpu", "tokamax"}
    with pytest.raises(ConfigError, match="moe_impl"):
        tiny_config(moe_impl="dense_loop")
