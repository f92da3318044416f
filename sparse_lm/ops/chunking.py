"""Sequence chunking: apply a per-position function to [B, S, ...] arrays a chunk of positions at
a time, so that its large per-position temporaries (gathered top-k rows, vocabulary logits) exist
for one chunk only, forward and backward."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def map_sequence_chunks(fn: Callable, xs: Sequence[jax.Array], *, chunk: int,
                        pad_values: Sequence, remat: bool = True):
    """fn(*chunks) on position chunks of xs; returns fn's outputs for all S positions.

    xs: arrays [B, S, ...] (same B, S); fn maps arrays [B, w, ...] to a pytree of [B, w, ...]
    arrays, each position independent of the others. Positions go through a `lax.scan` in
    ceil(S / chunk) steps; step i takes positions i, i + steps, i + 2 steps, ... (strided), so a
    sequence split over devices stays split inside every step. S is padded to a multiple of the
    step count with `pad_values` (one per x). remat=True rematerializes each step in the
    backward pass (only the inputs are saved).
    """
    b, s = xs[0].shape[:2]
    steps = max(1, -(-s // chunk))
    width = -(-s // steps)
    pad = steps * width - s
    if pad:
        xs = [jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=v)
              for x, v in zip(xs, pad_values)]

    def strided(x):        # [B, width * steps, ...] -> [steps, B, width, ...]
        return jnp.moveaxis(x.reshape((b, width, steps) + x.shape[2:]), 2, 0)

    def unstrided(x):      # the inverse, cut back to S positions
        x = jnp.moveaxis(x, 0, 2)
        return x.reshape((b, width * steps) + x.shape[3:])[:, :s]

    def step(carry, chunk_xs):
        return carry, fn(*chunk_xs)
    if remat:
        step = jax.checkpoint(step, prevent_cse=False)
    _, out = jax.lax.scan(step, None, [strided(x) for x in xs])
    return jax.tree.map(unstrided, out)
