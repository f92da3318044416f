"""RoPE: interleaved rotation of the last r channels; YaRN bounds; de-rotation."""
import numpy as np
import jax.numpy as jnp

from sparse_lm.ops.rope import Yarn, apply_rope, inv_frequencies, yarn_ramp_bounds


def test_yarn_ramp_bounds_for_release_values_are_15_and_25():
    assert yarn_ramp_bounds(64, 160000.0, Yarn()) == (15.0, 25.0)


def test_yarn_keeps_fast_frequencies_and_divides_slow_ones_by_factor():
    plain = inv_frequencies(64, 160000.0)
    yarn = inv_frequencies(64, 160000.0, Yarn())
    np.testing.assert_array_equal(yarn[:16], plain[:16])           # ramp 0 below low=15
    np.testing.assert_allclose(yarn[25:], plain[25:] / 16, rtol=1e-6)  # ramp 1 from high=25
    assert np.all(yarn[16:25] < plain[16:25]) and np.all(yarn[16:25] > plain[16:25] / 16)


def test_rope_equals_complex_multiplication_of_adjacent_pairs_on_last_dims():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 12)).astype(np.float32)
    pos = rng.integers(0, 1000, size=(2, 5))
    inv = inv_frequencies(8, 10000.0)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
    np.testing.assert_array_equal(got[..., :4], x[..., :4])  # non-rotary channels untouched
    z = x[..., 4::2] + 1j * x[..., 5::2]
    ang = pos[:, :, None, None].astype(np.float32) * inv
    zr = z * np.exp(1j * ang.astype(np.float64))
    np.testing.assert_allclose(got[..., 4::2], zr.real, atol=2e-4)
    np.testing.assert_allclose(got[..., 5::2], zr.imag, atol=2e-4)


def test_inverse_rope_undoes_rope_and_scores_depend_on_relative_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 16)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(1, 1, 16)).astype(np.float32))
    inv = inv_frequencies(16, 10000.0)
    p = lambda v: jnp.full((1, 1), v)
    back = apply_rope(apply_rope(q, p(37), inv), p(37), inv, inverse=True)
    np.testing.assert_allclose(back, q, atol=1e-5)
    s1 = jnp.sum(apply_rope(q, p(50), inv) * apply_rope(k, p(20), inv))
    s2 = jnp.sum(apply_rope(q, p(130), inv) * apply_rope(k, p(100), inv))
    np.testing.assert_allclose(s1, s2, rtol=1e-4)
