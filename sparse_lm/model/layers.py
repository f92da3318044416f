"""Parameter helpers and small modules shared by the model.

Every parameter carries logical axis names (`out_sharding` metadata) that the sharding rules map
to mesh axes. Eager sharding is off: placement happens in the jitted steps, not at creation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_lm.ops.norms import rms_norm


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias: updated outside the optimizer (never by gradients)."""


class HashTable(nnx.Variable):
    """Frozen token-id -> experts table of hash-routed layers (a buffer, not a parameter)."""


def param(rngs: nnx.Rngs, shape: Sequence[int], names: Sequence[str | None],
          init: Callable | float = 0.02, dtype=jnp.float32) -> nnx.Param:
    """A parameter with logical axis names. `init` is a std (normal) or an initializer."""
    assert len(names) == len(shape), (names, shape)
    if callable(init):
        value = init(rngs.params(), tuple(shape), dtype)
    else:
        value = jax.random.normal(rngs.params(), tuple(shape), dtype) * init
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def constant(shape: Sequence[int], names: Sequence[str | None], value: float,
             dtype=jnp.float32) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(shape), value, dtype), out_sharding=tuple(names),
                     eager_sharding=False)


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, name: str = "norm"):
        self.weight = constant((dim,), (name,), 1.0)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
