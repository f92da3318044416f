"""`experts_blocked` (the CPU-fast expert matmuls the demo uses) equals the dense reference.

~3 s on 2 cores.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.ops import moe
from tests.conftest import tiny_config


@pytest.mark.parametrize("block", [4, 128])
def test_blocked_experts_equal_dense_reference_value_and_gradient(block):
    rng = np.random.default_rng(0)
    t, d, i, e = 23, 8, 5, 6
    u = jnp.asarray(rng.normal(size=(t, d)).astype(np.float32))
    # Experts 2..4 get nothing, expert 0 gets more rows than one block of 4.
    idx = jnp.asarray(np.array([[0, 1]] * 12 + [[5, 0]] * 11, np.int32))
    wts = jnp.asarray(rng.random(size=(t, 2)).astype(np.float32))
    params = [jnp.asarray(rng.normal(size=sh).astype(np.float32) * 0.5)
              for sh in ((e, d, i), (e, d, i), (e, i, d))]
    blocked = lambda *a: moe.experts_blocked(*a, block=block)
    np.testing.assert_allclose(blocked(u, idx, wts, *params, 10.0),
                               moe.experts_dense_reference(u, idx, wts, *params, 10.0), atol=1e-5)
    f = lambda impl: lambda u, w, *p: jnp.sum(jnp.tanh(impl(u, idx, w, *p, 10.0)))
    g1 = jax.grad(f(blocked), argnums=(0, 1, 2, 3, 4))(u, wts, *params)
    g2 = jax.grad(f(moe.experts_dense_reference), argnums=(0, 1, 2, 3, 4))(u, wts, *params)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_moe_module_gives_same_output_with_either_moe_impl():
    from flax import nnx
    from sparse_lm.model.moe import MoE
    u = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 64)), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 256, size=(2, 16)), jnp.int32)
    a = MoE(tiny_config(moe_impl="reference"), "score", rngs=nnx.Rngs(0))(u, ids)[0]
    b = MoE(tiny_config(moe_impl="xla"), "score", rngs=nnx.Rngs(0))(u, ids)[0]
    np.testing.assert_allclose(a, b, atol=2e-5)
