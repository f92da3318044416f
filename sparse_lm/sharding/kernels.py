"""Pallas kernels inside sharded steps: each kernel call under `jax.shard_map` over the active
mesh, its operands split by the logical rules of the active preset.

Mosaic (TPU) and Triton (GPU) calls cannot be partitioned by XLA: inside `jit` with shardings
they must sit in a `shard_map`, where each device runs the kernel on its own block. The model's
attention and indexer call `kernel_call(fn, operands, outputs, what=...)` with every operand's
logical names; outside `use_rules` (one device) it is `fn(*operands)`.

Layout (from the preset's rules, per array as `rules.spec_for` resolves it):
  attention  q [B, S, H, D] batch over the batch axes, heads over `tensor`; kv [B, S, D] with
             q's rows (one shared KV head, MQA: whole over `tensor`); the compressed entries
             [B, N, D] whole per batch shard; sink [H] with q's heads; top-k lists [B, S, K]
             with q's rows.
  indexer    every operand by batch (and queries by the sequence split), never by the indexer
             heads: its top-k needs the score summed over all of them.
Per-shard shapes then meet the kernels' tile rules; when they do not, the error names the
preset, the operand's split and the kernel's rule.

Context parallelism (queries split along the sequence: `cp`, `ep_as_cp`): the caller gives
`kernel_call` a `sequence_fn(shard, *local)`, run in the body instead of `fn`, with a
`SequenceShard` that knows the shard's first position (`offset`, traced) and fetches the rows
of the previous shards (`previous_rows`, by `ppermute`). `sequence_shard_attention` is that
body for the attention: the window part runs on [halo | local] rows, the halo being the
previous shards' last `halo_length(W)` KV rows; the compressed entries stay whole (S/m rows,
gathered along the sequence as the compressor's output already is). CSA's top-k (global entry
indices) reads them through the token-sparse kernel's list; HCA and the dense stage run the
block-sparse kernel over every entry with the shard's position as `query_offset` (its causal
entry mask at global positions, its static block map planned over every shard's offset), so
no [B, T, N] list exists. The indexer takes the offset itself
(`indexer_topk(query_offset=...)`). Nothing gathers the full KV.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from sparse_lm.sharding import constraints
from sparse_lm.sharding.mesh import ShardingError

Names = tuple  # one logical name (or None) per dimension

# Segment id of halo rows before position 0 (shard 0's halo): no real row has it, and it differs
# from the kernels' own padding ids (-1; the indexer's int32 min and min + 1).
HALO_SEGMENT = int(np.iinfo(np.int32).min) + 2


def length_axes(spec: PartitionSpec, names: Names) -> tuple[str, ...]:
    """The mesh axes `spec` splits the query-length dim (`activation_length`) of `names` over."""
    i = list(names).index("activation_length")
    axis = tuple(spec)[i] if i < len(spec) else None
    return () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))


def _describe(spec: PartitionSpec, sizes) -> str:
    axes = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
    return f"{spec} over " + (", ".join(f"{a}={sizes[a]}" for a in axes) or "no axis")


def choose(op, implementation: str | None) -> bool:
    """Whether `op` runs as a Pallas kernel (asked for, or the target platform's preference for
    None), hence through `kernel_call`."""
    return (op.canonical(implementation) or op.default_implementation()).startswith("pallas")


@dataclasses.dataclass(frozen=True)
class SequenceShard:
    """Inside a `shard_map` body whose query rows are split along the sequence over `axes`
    (`count` shards in mesh order): this shard holds the `rows` query rows from position
    `offset()` = axis_index * rows."""
    axes: tuple[str, ...]
    count: int
    rows: int

    @property
    def _axis(self):
        return self.axes[0] if len(self.axes) == 1 else self.axes

    def index(self) -> jax.Array:
        return jax.lax.axis_index(self._axis)

    def offset(self) -> jax.Array:
        """The global position of the shard's first row (int32, traced)."""
        return (self.index() * self.rows).astype(jnp.int32)

    def previous_rows(self, x: jax.Array, length: int) -> jax.Array:
        """x [B, rows, ...] (this shard's rows) -> [B, length, ...]: the `length` rows just
        before this shard's first row, from the previous ceil(length / rows) shards (one
        `ppermute` per shard, each sending only the rows needed; the gradient goes back by
        the reverse permute). Rows before position 0 are zeros."""
        parts = []
        for hop in range(1, -(-length // self.rows) + 1):
            take = min(self.rows, length - (hop - 1) * self.rows)
            piece = x[:, self.rows - take:]
            if hop >= self.count:
                parts.append(jnp.zeros_like(piece))
            else:
                parts.append(jax.lax.ppermute(piece, self._axis,
                                              [(i, i + hop) for i in range(self.count - hop)]))
        return jnp.concatenate(parts[::-1], axis=1)


def halo_length(window: int) -> int:
    """KV rows a shard needs from before its first row: the window's W - 1, rounded up to 8
    rows (the kernels' query block / sublane tile)."""
    return -(-(window - 1) // 8) * 8


def sequence_shard_attention(shard: SequenceShard, attend: Callable, q, kv, sink, segment_ids,
                             entries, valid, picks, entry_segments, *, window: int, ratio: int):
    """The attention of one sequence shard's query rows, by `attend` (the unsplit call:
    (q, kv, sink, segment_ids, entries, valid, topk, *, query_offset=None, offset_range=None,
    compressed_segments=None) -> (out, lse), `sparse_attention` with a kernel) on [halo | local]
    rows.

    q [B, T, H, D], kv [B, T, D], segment_ids [B, T] or None: the shard's rows (T =
    shard.rows); entries [B, N, D], valid [B, N], entry_segments [B, N] (or None without
    segment ids): whole; picks [B, T, K] global entry indices (CSA's top-k, through the
    token-sparse kernel) or None (HCA, the dense stage: the block-sparse kernel over every
    entry, its causal entry mask at global positions). -> out [B, T, H, D], lse [B, T, H].

    The window part depends only on relative positions and documents, so the previous shards'
    last `halo_length(W)` KV rows in front of the local ones give every local row its window;
    halo rows before position 0 take `HALO_SEGMENT`. The halo's own query rows are computed and
    dropped. Without picks the kernel takes the global position of its row 0 (offset - halo,
    traced) as `query_offset`, with the static range over the shards as `offset_range` for its
    block map; no [B, T, N] list is built."""
    b, t, h, d = q.shape
    pos = shard.offset() + jnp.arange(t, dtype=jnp.int32)
    seg = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    listed = picks
    halo = halo_length(window)
    extra = {}
    if entries is not None and entries.shape[1] > 0 and picks is None:
        extra = dict(query_offset=pos[0] - halo,
                     offset_range=(-halo, (shard.count - 1) * shard.rows - halo),
                     compressed_segments=(jnp.zeros(entries.shape[:2], jnp.int32)
                                          if entry_segments is None else entry_segments))
    if halo:
        first = pos[0] - halo + jnp.arange(halo, dtype=jnp.int32)     # the halo's positions
        halo_seg = jnp.where(first >= 0, shard.previous_rows(seg, halo) if segment_ids is not None
                             else 0, HALO_SEGMENT)
        kv = jnp.concatenate([shard.previous_rows(kv, halo), kv], axis=1)
        seg = jnp.concatenate([jnp.broadcast_to(halo_seg, (b, halo)), seg], axis=1)
        q = jnp.concatenate([jnp.zeros((b, halo, h, d), q.dtype), q], axis=1)
        if listed is not None:
            listed = jnp.concatenate(
                [jnp.full((b, halo, listed.shape[-1]), -1, jnp.int32), listed], axis=1)
    out, lse = attend(q, kv, sink, seg, entries, valid, listed, **extra)
    return out[:, halo:], lse[:, halo:]


def kernel_call(fn: Callable, operands: Sequence[tuple], outputs: Sequence[tuple], *,
                what: str, sequence_fn: Callable | None = None):
    """fn(*arrays) for operands [(label, array or None, names)], under `shard_map` when sharding
    rules are active. outputs [(shape, dtype, names)] describe fn's results (global shapes). A None
    operand is passed to fn as None. Where the rules split the query rows (`activation_length`)
    along the sequence, the body runs sequence_fn(SequenceShard, *arrays) instead (an error
    naming the preset and the split when there is none). Returns fn's results (a tuple if
    several)."""
    ctx = constraints.active()
    arrays = [x for _, x, _ in operands]
    if ctx is None:
        return fn(*arrays)
    labels = [label for label, _, _ in operands]
    present = [(i, x, names) for i, (_, x, names) in enumerate(operands) if x is not None]
    in_specs = tuple(constraints.spec(names, x.shape) for _, x, names in present)
    out_specs = tuple(constraints.spec(names, shape) for shape, _, names in outputs)
    sizes = ctx.sizes
    preset = ctx.preset or "(active rules)"
    shard = None
    for (_, x, names), spec in zip(present, in_specs):
        axes = length_axes(spec, names) if "activation_length" in names else ()
        count = math.prod(sizes[a] for a in axes)
        if count == 1:
            continue
        if sequence_fn is None:
            raise ShardingError(
                f"{what}: preset {preset} splits the queries along the sequence "
                f"({_describe(spec, sizes)}) and this kernel has no sequence-split form: use "
                f"model.attention_impl='xla' with this preset")
        length = x.shape[list(names).index("activation_length")]
        shard = SequenceShard(tuple(axes), count, length // count)

    def body(*local):
        args = list(arrays)
        for (i, _, _), x in zip(present, local):
            args[i] = x
        try:
            out = fn(*args) if shard is None else sequence_fn(shard, *args)
        except ValueError as e:
            split = "; ".join(f"{labels[i]} {tuple(x.shape)} split "
                              f"{_describe(s, sizes)} -> {tuple(lx.shape)}"
                              for (i, x, names), s, lx in zip(present, in_specs, local))
            raise ShardingError(f"{what} under preset {preset}: the per-device shapes do not "
                                f"meet the kernel's rules ({e}); operands {split}") from None
        return out if isinstance(out, tuple) else (out,)
    result = jax.shard_map(body, mesh=ctx.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)(*(x for _, x, _ in present))
    return result if len(outputs) > 1 else result[0]
