"""map_sequence_chunks: the chunked (strided, scanned, rematerialized) evaluation of a
per-position function equals evaluating it on the whole sequence, in value and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.ops.chunking import map_sequence_chunks


def _fn(x, idx):
    """Per position: a gather inside the position's own features, masked by its index."""
    picked = jnp.take_along_axis(x, jnp.maximum(idx, 0), axis=-1)            # [B, w, 2]
    return {"a": jnp.sin(x).sum(-1) * (idx[..., 0] >= 0), "b": picked * x[..., :2]}


@pytest.mark.parametrize("chunk", [1, 3, 7, 11, 100])
@pytest.mark.parametrize("remat", [True, False])
def test_equals_the_unchunked_function_in_value_and_gradient(chunk, remat):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 11, 5)), jnp.float32)
    idx = jnp.asarray(rng.integers(-1, 5, size=(2, 11, 2)), jnp.int32)
    want = _fn(x, idx)
    got = map_sequence_chunks(_fn, (x, idx), chunk=chunk, pad_values=(0, -1), remat=remat)
    for k in want:
        assert got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)

    def loss(f, x):
        out = f(x)
        return jnp.sum(out["a"] ** 2) + jnp.sum(jnp.cos(out["b"]))
    g_want = jax.grad(lambda x: loss(lambda x: _fn(x, idx), x))(x)
    g_got = jax.jit(jax.grad(lambda x: loss(lambda x: map_sequence_chunks(
        _fn, (x, idx), chunk=chunk, pad_values=(0, -1), remat=remat), x)))(x)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)
