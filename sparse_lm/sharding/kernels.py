"""Pallas kernels inside sharded steps: each kernel call under `jax.shard_map` over the active
mesh, its operands split by the logical rules of the active preset.

Mosaic (TPU) and Triton (GPU) calls cannot be partitioned by XLA: inside `jit` with shardings
they must sit in a `shard_map`, where each device runs the kernel on its own block. The model's
attention and indexer call `kernel_call(fn, operands, outputs, what=...)` with every operand's
logical names; outside `use_rules` (one device) it is `fn(*operands)`.

Layout (from the preset's rules, per array as `rules.spec_for` resolves it):
  attention  q [B, S, H, D] batch over the batch axes, heads over `tensor`; kv [B, S, D] and
             the compressed entries [B, N, D] whole per batch shard (one shared KV head, MQA);
             sink [H] with q's heads; top-k lists [B, S, K] with q's rows.
  indexer    every operand by batch only: its top-k needs the score summed over all indexer
             heads, so the heads are never split.
Per-shard shapes then meet the kernels' tile rules; when they do not, the error names the
preset, the operand's split and the kernel's rule.

Context parallelism (queries split along the sequence: `cp`, `ep_as_cp`) is not supported by
the kernels, which number query rows from 0 and need the whole key range of their rows:
`kernel_call` raises `ShardingError` for it, and `choose` gives the `xla` path instead when no
kernel was asked for.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec

from kernels_pallas.registry import log_once
from sparse_lm.sharding import constraints
from sparse_lm.sharding.mesh import ShardingError

Names = tuple  # one logical name (or None) per dimension


def length_axes(spec: PartitionSpec, names: Names) -> tuple[str, ...]:
    """The mesh axes `spec` splits the query-length dim (`activation_length`) of `names` over."""
    i = list(names).index("activation_length")
    axis = tuple(spec)[i] if i < len(spec) else None
    return () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))


def _describe(spec: PartitionSpec, sizes) -> str:
    axes = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
    return f"{spec} over " + (", ".join(f"{a}={sizes[a]}" for a in axes) or "no axis")


def choose(op, implementation: str | None, row_names: Names, row_shape, what: str):
    """(whether to run `op` through `kernel_call`, the implementation to ask for). A kernel
    (explicit, or the target platform's preference for None) runs under `shard_map` when
    sharding rules are active; where they split the queries along the sequence, the
    preference becomes "xla" (logged once) and an explicit kernel is left to `kernel_call`'s
    error. row_names / row_shape: the logical names and shape of the query rows [B, S]."""
    name = op.canonical(implementation) or op.default_implementation()
    if not name.startswith("pallas"):
        return False, implementation
    if implementation is None and constraints.active() is not None and length_axes(
            constraints.spec(row_names, row_shape), row_names):
        log_once(logging.WARNING, (what, "sequence split"),
                 "%s: the preset splits queries along the sequence, where the kernels cannot "
                 "run; using the 'xla' form (model.attention_impl='xla' silences this)", what)
        return False, "xla"
    return True, implementation


def kernel_call(fn: Callable, operands: Sequence[tuple], outputs: Sequence[tuple], *,
                what: str):
    """fn(*arrays) for operands [(label, array or None, names)], under `shard_map` when sharding
    rules are active. outputs [(shape, dtype, names)] describe fn's results (global shapes). A None
    operand is passed to fn as None. Returns fn's results (a tuple if several)."""
    ctx = constraints.active()
    arrays = [x for _, x, _ in operands]
    if ctx is None:
        return fn(*arrays)
    labels = [label for label, _, _ in operands]
    present = [(i, x, names) for i, (_, x, names) in enumerate(operands) if x is not None]
    in_specs = tuple(constraints.spec(names, x.shape) for _, x, names in present)
    out_specs = tuple(constraints.spec(names, shape) for shape, _, names in outputs)
    for (_, x, names), spec in zip(present, in_specs):
        if "activation_length" in names and length_axes(spec, names):
            raise ShardingError(
                f"{what}: preset {ctx.preset or '(active rules)'} splits the queries along the "
                f"sequence ({_describe(spec, ctx.sizes)}); the kernels take whole query rows "
                f"from position 0 (no query offset under context parallelism): use "
                f"model.attention_impl='xla' with this preset")
    sizes = ctx.sizes

    def body(*local):
        args = list(arrays)
        for (i, _, _), x in zip(present, local):
            args[i] = x
        try:
            out = fn(*args)
        except ValueError as e:
            split = "; ".join(f"{labels[i]} {tuple(x.shape)} split "
                              f"{_describe(s, sizes)} -> {tuple(lx.shape)}"
                              for (i, x, names), s, lx in zip(present, in_specs, local))
            raise ShardingError(f"{what} under preset {ctx.preset or '(active rules)'}: the "
                                f"per-device shapes do not meet the kernel's rules ({e}); "
                                f"operands {split}") from None
        return out if isinstance(out, tuple) else (out,)
    result = jax.shard_map(body, mesh=ctx.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)(*(x for _, x, _ in present))
    return result if len(outputs) > 1 else result[0]
