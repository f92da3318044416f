"""Activation sharding constraints by logical names, active only inside `use_rules(mesh, rules)`.

The model calls `constrain(x, ("activation_batch", "activation_length", "activation_embed"))`
at a few points (block input/output, attention q/kv, MoE input). Outside a `use_rules` context
(single-device runs, decoding, tests of the model core) it returns x unchanged, so the model
code does not depend on sharding.

`use_rules` is entered while a step is traced (`steps.shard_step` wraps the traced function in
it), so the constraints end up in the compiled program whatever context the caller is in.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_lm.sharding.mesh import axis_sizes
from sparse_lm.sharding.rules import Rules, spec_for


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: Rules
    moe_dispatch: str = ""            # dispatcher override of the active preset ("" = model's)
    preset: str = ""                  # the preset's name, for error messages

    @property
    def sizes(self) -> dict[str, int]:
        return axis_sizes(self.mesh)


_ACTIVE: contextvars.ContextVar[ShardingContext | None] = contextvars.ContextVar(
    "sparse_lm_sharding", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules, moe_dispatch: str = "", preset: str = ""):
    """Make `mesh` + `rules` the active sharding context (constraints, EP dispatchers, kernels
    under `shard_map`); `preset` names it in error messages."""
    token = _ACTIVE.set(ShardingContext(mesh, tuple(rules), moe_dispatch, preset))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)


def active() -> ShardingContext | None:
    return _ACTIVE.get()


def spec(names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec | None:
    """The PartitionSpec the active rules give `names` (None without an active context)."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return None
    return spec_for(names, shape, ctx.sizes, ctx.rules)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint(x, rules(names))` inside `use_rules`, else x unchanged.

    names: one logical name (or None) per dimension of x.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} logical names {tuple(names)} for an array of "
                         f"rank {x.ndim} (shape {x.shape})")
    p = spec_for(names, x.shape, ctx.sizes, ctx.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, p))


def map_over_devices(fn, x: jax.Array) -> jax.Array:
    """fn(x) for fn independent per index of x's leading axis, with that axis split over every
    device of the active mesh and every other axis whole; fn(x) without active rules.

    For Muon's Newton-Schulz on a stack of matrices [N, m, n]: each device orthogonalizes whole
    matrices of its own, instead of every device iterating on slices of all N (an all-reduce of
    [m, m] per matrix per step, and the m x m products repeated on each device of a group).
    N is padded with zeros up to a multiple of the device count (fn must map zeros to finite
    values); the result returns to x's layout.
    """
    ctx = _ACTIVE.get()
    if ctx is None:
        return fn(x)
    axes = tuple(a for a, n in ctx.sizes.items() if n > 1)
    devices = math.prod(ctx.sizes[a] for a in axes)
    if devices == 1:
        return fn(x)
    lead = x.shape[0]
    pad = -lead % devices
    spread = NamedSharding(ctx.mesh, PartitionSpec(axes, *([None] * (x.ndim - 1))))
    xp = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x
    y = fn(jax.lax.with_sharding_constraint(xp, spread))
    y = jax.lax.with_sharding_constraint(y, spread)
    return y[:lead] if pad else y


def stacked_slice_names(state, stacked: str = "layers") -> list[tuple | None]:
    """For an nnx.State of stacked parameters (leading axis named `stacked`): per leaf (in
    `jax.tree.leaves` order) the logical names of one slice (the stacked axis dropped), or None
    for a leaf that is not stacked along its first axis."""
    logical = jax.tree.leaves(nnx.get_partition_spec(state),
                              is_leaf=lambda x: isinstance(x, PartitionSpec))
    out: list[tuple | None] = []
    for lspec, x in zip(logical, jax.tree.leaves(state)):
        names = tuple(lspec) + (None,) * (len(x.shape) - len(lspec))
        out.append(names[1:] if names and names[0] == stacked else None)
    if len(logical) != len(out) or len(out) != len(jax.tree.leaves(state)):
        raise ValueError("stacked_slice_names: sharding metadata does not cover every leaf")
    return out


def constrain_slice(layer_state, names: list[tuple | None]):
    """Constrain every leaf of one scanned slice to the sharding of its logical names (from
    `stacked_slice_names`); no-op without active rules.

    Inside a `lax.scan` body over stacked parameters this pins each layer's weights, and by
    transposition their gradients, to the per-layer layout: without it GSPMD may gather the
    stacked weights before the loop or keep the backward scan's stacked gradient carry
    replicated.
    """
    if _ACTIVE.get() is None:
        return layer_state
    leaves, treedef = jax.tree.flatten(layer_state)
    if len(leaves) != len(names):
        raise ValueError(f"constrain_slice: {len(leaves)} leaves but {len(names)} name tuples")
    leaves = [x if n is None else constrain(x, n) for x, n in zip(leaves, names)]
    return jax.tree.unflatten(treedef, leaves)
