"""The training loss never holds [B, S, V] logits: `linear_cross_entropy` (chunked head + CE under
a rematerialized scan) equals the CE of the full logits in value and gradient, and the train step
built on it equals a step whose loss reads the model's logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.model import build_model
from sparse_lm.train import losses, steps
from tests.conftest import tiny_config


def _data(b=2, s=13, d=8, v=29, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    t = jnp.asarray(rng.integers(0, v, size=(b, s)), jnp.int32)
    m = jnp.asarray(rng.random((b, s)) > 0.3)
    return h, w, t, m


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_equals_full_logits_cross_entropy_in_value_and_gradient(chunk):
    h, w, t, m = _data()

    def full(h, w):
        return losses.cross_entropy(h @ w, t, m)[0]

    def chunked(h, w):
        return losses.linear_cross_entropy(h, w, t, m, chunk=chunk)[0]

    v_ref, g_ref = jax.value_and_grad(full, argnums=(0, 1))(h, w)
    v, g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(v, v_ref, rtol=1e-6)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(losses.linear_cross_entropy(h, w, t, m, chunk=chunk)[1]) == int(m.sum())


def test_never_materializes_the_full_logits():
    h, w, t, m = _data(b=1, s=64, d=8, v=1000)
    fn = jax.jit(jax.grad(lambda h, w: losses.linear_cross_entropy(h, w, t, m, chunk=16)[0],
                          argnums=(0, 1)))
    text = fn.lower(h, w).compile().as_text()
    assert "f32[1,64,1000]" not in text and "f32[64,1000]" not in text
    assert "f32[1,16,1000]" in text             # one chunk of 16 positions at a time


def test_train_step_loss_from_head_inputs_equals_loss_from_logits():
    cfg = tiny_config(num_layers=3, layer_prefix=("swa",), layer_tail=(), num_hash_layers=1)
    graphdef, params, buffers = nnx.split(build_model(cfg, seed=0), nnx.Param, ...)
    rng = np.random.default_rng(1)
    batch = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 17)), jnp.int32),
             "segment_ids": jnp.asarray(np.repeat([[1] * 9 + [2] * 8], 2, 0), jnp.int32)}

    def loss(p, logits):
        model = nnx.merge(graphdef, p, buffers)
        out = model(batch["tokens"][:, :-1], segment_ids=batch["segment_ids"][:, :-1],
                    return_aux=True, logits=logits)
        return losses.total_loss(out, batch, mtp_weight=0.3, balance_alpha=1e-3,
                                 indexer_weight=1.0)[0]
    v_ref, g_ref = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params)
    v, g = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    ev = steps.eval_step(params, buffers, batch, graphdef=graphdef, sparse=True)
    assert set(ev) >= {"ce_sum", "tokens", "mtp_ce_sum", "mtp_tokens"}


def test_logits_false_without_aux_is_an_error():
    cfg = tiny_config(num_layers=3, layer_prefix=("swa",), layer_tail=(), num_hash_layers=1)
    model = build_model(cfg, seed=0)
    with pytest.raises(ValueError, match="return_aux"):
        model(jnp.zeros((1, 8), jnp.int32), logits=False)
