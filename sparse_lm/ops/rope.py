"""Partial, interleaved rotary embeddings on the last `rope_dim` channels, with optional YaRN.

Pairs are adjacent channels (x[2i], x[2i+1]) of the rotary slice, rotated by position * inv_freq[i].
Angles are float32(position) * float32(inv_freq), cos/sin in fp32 (spec §14a.3).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Yarn:
    factor: float = 16.0
    original_max_position: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0


def yarn_ramp_bounds(rope_dim: int, theta: float, yarn: Yarn) -> tuple[float, float]:
    """(low, high) frequency indices of the YaRN ramp; (15, 25) for the release values."""
    def corr(n_rot):
        return rope_dim * math.log(yarn.original_max_position / (n_rot * 2 * math.pi)) / (
            2 * math.log(theta))
    low = max(math.floor(corr(yarn.beta_fast)), 0)
    high = min(math.ceil(corr(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    return float(low), float(high)


def inv_frequencies(rope_dim: int, theta: float, yarn: Yarn | None = None) -> np.ndarray:
    """[rope_dim // 2] float32 inverse frequencies theta^(-2i/r), YaRN-blended when given."""
    exponents = np.arange(0, rope_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rope_dim)
    # Bit-exact with transformers (tools/parity/NOTES.md §2): a correctly rounded float32 power
    # (float64 pow, then cast; NumPy's float32 pow can be an ulp off), then float32 reciprocals.
    power = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    inv = (np.float32(1.0) / power).astype(np.float32)
    if yarn is None:
        return inv
    low, high = yarn_ramp_bounds(rope_dim, theta, yarn)
    i = np.arange(rope_dim // 2, dtype=np.float32)
    ramp = np.clip((i - np.float32(low)) / np.float32(high - low), 0, 1).astype(np.float32)
    interp = (np.float32(1.0) / (np.float32(yarn.factor) * power)).astype(np.float32)
    keep = (np.float32(1) - ramp).astype(np.float32)   # same expression order as transformers
    return (interp * (np.float32(1) - keep) + inv * keep).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, inverse: bool = False) -> jax.Array:
    """Rotate the last 2*len(inv_freq) channels of x.

    x [B, S, ..., D] (any number of middle axes, e.g. heads); positions [B, S] int.
    inverse=True applies the conjugate rotation (angle -p*theta), used to de-rotate outputs.
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    r = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, S, r/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    rot = x[..., -r:].astype(jnp.float32)
    pairs = rot.reshape(rot.shape[:-1] + (r // 2, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(rot.shape)
    return jnp.concatenate([x[..., :-r], out.astype(x.dtype)], axis=-1)
