"""Manifold-constrained hyper-connections (spec §3): 4 residual streams mixed per sublayer.

All math in fp32. Layout of the 24 mixing logits: pre 0..n-1, post n..2n-1, comb 2n.. stored
row-major as [input stream j, output stream k].
"""
import jax
import jax.numpy as jnp


def hc_logits(x: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """x [..., n, d] streams, fn [n*d, m] -> mix [..., m] = RMS-normalised vec(x) @ fn (fp32)."""
    v = x.reshape(x.shape[:-2] + (-1,)).astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + eps)
    return (v @ fn.astype(jnp.float32)) * inv_rms


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """[..., n, n] logits -> doubly-(almost-)stochastic matrix; the last step normalises columns.

    Row softmax (+eps), column normalisation, then `iters - 1` (row, column) rounds: exactly
    `iters` column normalisations, so columns sum to 1 up to eps and rows only approximately.
    """
    m = jax.nn.softmax(logits, axis=-1) + eps
    m = m / (m.sum(axis=-2, keepdims=True) + eps)

    def round_(m, _):  # a loop, not unrolled: unrolled, the backward pass compiles ~10x slower
        m = m / (m.sum(axis=-1, keepdims=True) + eps)
        return m / (m.sum(axis=-2, keepdims=True) + eps), None
    return jax.lax.scan(round_, m, None, length=iters - 1)[0]


def hc_weights(x, fn, base, scale, *, n: int, norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    """Mixing weights for one sublayer site.

    x [..., n, d]; fn [n*d, (2+n)*n]; base [(2+n)*n]; scale [3] = (alpha_pre, alpha_post, alpha_res).
    Returns pre [..., n], post [..., n], comb [..., n, n] (comb[j, k]: input j -> output k).
    """
    mix = hc_logits(x, fn, norm_eps)
    base = base.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(scale[0] * mix[..., :n] + base[:n]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(scale[1] * mix[..., n:2 * n] + base[n:2 * n])
    res = scale[2] * mix[..., 2 * n:] + base[2 * n:]
    comb = sinkhorn(res.reshape(res.shape[:-1] + (n, n)), sinkhorn_iters, hc_eps)
    return pre, post, comb


def hc_collapse(x: jax.Array, pre: jax.Array) -> jax.Array:
    """x [..., n, d], pre [..., n] -> [..., d] = sum_j pre_j x_j (fp32 math, x's dtype out)."""
    y = jnp.einsum("...n,...nd->...d", pre, x.astype(jnp.float32))
    return y.astype(x.dtype)


def hc_expand(f: jax.Array, x: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """New streams X'_k = post_k f + sum_j comb[j, k] X_j.  f [..., d], x [..., n, d] -> [..., n, d]."""
    out = (post[..., :, None] * f.astype(jnp.float32)[..., None, :]
           + jnp.einsum("...jk,...jd->...kd", comb, x.astype(jnp.float32)))
    return out.astype(x.dtype)


def hc_head_weights(x, fn, base, scale, *, norm_eps: float, hc_eps: float) -> jax.Array:
    """Final collapse weights: x [..., n, d], fn [n*d, n], base [n], scale [1] -> pre [..., n]."""
    mix = hc_logits(x, fn, norm_eps)
    return jax.nn.sigmoid(scale.astype(jnp.float32)[0] * mix + base.astype(jnp.float32)) + hc_eps
