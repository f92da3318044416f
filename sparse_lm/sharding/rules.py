"""Logical axis rules: logical dimension names -> mesh axes, resolved per array.

Every parameter carries logical names in its `out_sharding` metadata (`embed`, `heads`, `exp`,
...; see `PARAM_NAMES`), and activation constraints use `activation_*` names
(`ACTIVATION_NAMES`). A preset's rules map each name to a tuple of mesh axes (or to nothing).

Resolution of one array (`spec_for`): a rule's axes are preferences; pass 1 gives each
dimension its first preference, pass 2 its second, and so on, so a tensor-parallel dimension
keeps `tensor` even when an earlier dimension lists it as a fallback. A mesh axis is used at most
once per array, size-1 axes shard nothing and are skipped, and an axis that does not divide the
dimension is skipped (recorded as a note, so a preset that stops sharding something shows up in
`experiments.compare_sharding` and in the replicated-bytes check).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

from jax.sharding import PartitionSpec

from sparse_lm.sharding.mesh import AXES, ShardingError

PARAM_NAMES = ("vocab", "embed", "embed_out", "q_lora", "heads", "kv", "o_groups", "o_lora",
               "index_heads", "exp", "mlp", "hc_embed", "layers")
"""Logical names on the model's parameters and buffers (None = never sharded)."""

ACTIVATION_NAMES = ("activation_batch", "activation_length", "activation_kv_length",
                    "activation_embed", "activation_heads", "activation_kv", "activation_hc",
                    "activation_mlp", "activation_exp", "activation_vocab", "activation_tokens")
"""Logical names of activation dimensions used by `constraints.constrain`:
batch [B], length [S] (queries), kv_length (the keys/values a query attends: all-gathered under
context parallelism), embed [d], heads [H], kv (head dim) [D], hc (mHC streams) [n],
mlp [I], exp [E], vocab [V], tokens (flattened B*S rows of the MoE)."""

KNOWN_NAMES = frozenset(PARAM_NAMES + ACTIVATION_NAMES)

Rules = tuple  # tuple[tuple[str, tuple[str, ...]], ...]


def normalize_rules(rules: Iterable) -> Rules:
    """Validate and canonicalise rules given as pairs (name, axis | axes | None) or a mapping."""
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    seen = set()
    for pair in items:
        try:
            name, axes = pair
        except (TypeError, ValueError):
            raise ShardingError(f"a logical rule must be a pair (logical name, mesh axes), got {pair!r}")
        if name not in KNOWN_NAMES:
            raise ShardingError(f"logical rule for unknown name {name!r}; known logical names: "
                                f"{sorted(KNOWN_NAMES)}")
        if name in seen:
            raise ShardingError(f"logical name {name!r} has two rules; give each name one rule")
        seen.add(name)
        if axes is None or axes == "":
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        for a in axes:
            if a not in AXES:
                raise ShardingError(f"logical rule {name!r} -> {axes}: unknown mesh axis {a!r}; "
                                    f"mesh axes: {list(AXES)}")
        if len(set(axes)) != len(axes):
            raise ShardingError(f"logical rule {name!r} -> {axes} repeats a mesh axis")
        out.append((name, axes))
    return tuple(out)


def spec_for(names: Sequence[str | None], shape: Sequence[int] | None,
             mesh_sizes: Mapping[str, int], rules: Rules,
             notes: list | None = None) -> PartitionSpec:
    """PartitionSpec over mesh axes for one array with logical dimension `names`.

    A rule's axes are preferences in order: pass 1 gives every dimension its first axis, pass 2
    its second, ... (so `mlp -> (tensor, fsdp)` keeps tensor even when an earlier dimension also
    lists tensor as a fallback). An axis is used once per array; size-1 axes are skipped; an axis
    that would not divide the dimension is skipped (and noted). shape None skips divisibility.
    Unknown names are errors (a typo would otherwise replicate silently); names without a rule
    are replicated.
    """
    table = dict(rules)
    for name in names:
        if name is not None and name not in KNOWN_NAMES:
            raise ShardingError(f"unknown logical axis name {name!r}; known names: {sorted(KNOWN_NAMES)}")
    prefs = [list(table.get(n, ())) if n is not None else [] for n in names]
    used: set[str] = set()
    got: list[list[str]] = [[] for _ in names]
    for p in range(max((len(x) for x in prefs), default=0)):
        for i, pr in enumerate(prefs):
            if p >= len(pr):
                continue
            ax = pr[p]
            if ax in used or mesh_sizes.get(ax, 1) <= 1:
                continue
            if shape is not None:
                dim = int(shape[i])
                if dim % (math.prod(mesh_sizes[a] for a in got[i]) * mesh_sizes[ax]):
                    if notes is not None:
                        notes.append(f"dim {i} ({names[i]}={dim}) not divisible by "
                                     f"{'x'.join(f'{a}={mesh_sizes[a]}' for a in got[i] + [ax])}: "
                                     f"not sharded over {ax}")
                    continue
            got[i].append(ax)
            used.add(ax)
    out = [None if not g else g[0] if len(g) == 1 else tuple(g) for g in got]
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def rules_table(rules: Rules, mesh_sizes: Mapping[str, int] | None = None) -> dict[str, list[str]]:
    """{logical name: [mesh axes]} for metadata; with mesh sizes, size-1 axes are dropped."""
    out = {}
    for name, axes in rules:
        if mesh_sizes is not None:
            axes = tuple(a for a in axes if mesh_sizes.get(a, 1) > 1)
        out[name] = list(axes)
    return out
