"""Parameter, buffer and optimizer-state shardings from the model's logical axis metadata.

`nnx.get_partition_spec(state)` turns each variable's `out_sharding` metadata into a
PartitionSpec of *logical* names; `state_specs` maps those through a preset's rules (per array,
with its shape: see `rules.spec_for`) to PartitionSpecs over mesh axes. Optimizer-state leaves
that mirror a parameter (momentum, Adam moments) take that parameter's sharding (matched by
path suffix and shape); scalar leaves (step counts) are replicated; any other leaf is an error,
so a new optimizer state can never be replicated by accident.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparse_lm.sharding.mesh import ShardingError, axis_sizes
from sparse_lm.sharding.rules import Rules, spec_for


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def logical_specs(state) -> Any:
    """nnx.State -> same-structure tree of PartitionSpecs of logical names."""
    return nnx.get_partition_spec(state)


def path_str(path) -> str:
    """'cycles/blocks/0/attn/wq_a' (no trailing 'value')."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    while out and out[-1] == "value":
        out.pop()
    return "/".join(out)


def leaf_names(lspec, shape) -> tuple:
    """One logical name (or None) per dimension of a leaf. A slice of a stacked parameter (one
    layer of the scanned cycle, `DeepseekV4.layer_blocks`) keeps the stacked variable's metadata:
    its leading "layers" name is dropped."""
    names = tuple(lspec)
    if len(names) == len(shape) + 1 and names[0] == "layers":
        names = names[1:]
    if len(names) > len(shape):
        raise ShardingError(f"logical names {names} for an array of shape {tuple(shape)}")
    return names + (None,) * (len(shape) - len(names))


def state_specs(state, mesh_sizes: Mapping[str, int], rules: Rules,
                notes: dict | None = None) -> Any:
    """nnx.State (arrays or ShapeDtypeStructs) -> tree of mesh PartitionSpecs.

    notes: optional dict filled with {path: [divisibility notes]}.
    """
    logical = logical_specs(state)
    flat_l = jax.tree_util.tree_leaves_with_path(logical, is_leaf=_is_spec)
    flat_x = jax.tree.leaves(state)
    if len(flat_l) != len(flat_x):
        raise ShardingError("the state's logical sharding metadata does not cover every leaf")
    specs = []
    for (path, lspec), x in zip(flat_l, flat_x):
        names = leaf_names(lspec, x.shape)
        n: list = []
        specs.append(spec_for(names, x.shape, mesh_sizes, rules, n))
        if n and notes is not None:
            notes[path_str(path)] = n
    treedef = jax.tree.structure(logical, is_leaf=_is_spec)
    return jax.tree.unflatten(treedef, specs)


def to_named(specs, mesh: Mesh) -> Any:
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=_is_spec)


def match_param_shardings(tree, params, param_shardings, replicated: NamedSharding) -> Any:
    """Shardings for a tree whose leaves mirror parameters (optimizer state).

    A leaf takes the sharding of the parameter whose path is the longest suffix of the leaf's
    path with the same shape; scalars are replicated; anything else raises.
    """
    by_path = {}
    for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                             jax.tree.leaves(param_shardings, is_leaf=lambda s: isinstance(s, NamedSharding))):
        by_path[tuple(path_str(path).split("/"))] = (tuple(x.shape), sh)

    def pick(path, x):
        parts = tuple(path_str(path).split("/"))
        for i in range(len(parts)):
            hit = by_path.get(parts[i:])
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        if x.ndim == 0 or math.prod(x.shape) == 1:
            return replicated
        raise ShardingError(f"optimizer state leaf {path_str(path)} (shape {x.shape}) matches "
                            f"no parameter: give it a sharding rule in sparse_lm/sharding/partition.py")
    return jax.tree_util.tree_map_with_path(pick, tree)


def shard_bytes(shape, dtype, spec: PartitionSpec, mesh_sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of an array with this spec."""
    local = list(shape)
    for i, entry in enumerate(spec):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else entry
        local[i] = -(-local[i] // math.prod(mesh_sizes[a] for a in axes))
    return math.prod(local) * np.dtype(dtype).itemsize


def replication_report(state, mesh_sizes: Mapping[str, int], rules: Rules) -> dict:
    """How well a preset shards a parameter state.

    Returns total_bytes, per_device_bytes, ideal_per_device_bytes (total / product of the mesh
    axes the rules use for these arrays), and replicated_bytes / replicated_fraction: bytes of
    arrays the rules *want* sharded (some logical name maps to an axis of size > 1) that end up
    fully replicated (divisibility, axis already used); `replicated` lists them.
    """
    logical = jax.tree_util.tree_leaves_with_path(logical_specs(state), is_leaf=_is_spec)
    flat_x = jax.tree.leaves(state)
    table = dict(rules)
    total = per_dev = repl = 0
    used_axes: set[str] = set()
    listed = []
    for (path, lspec), x in zip(logical, flat_x):
        names = leaf_names(lspec, x.shape)
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        wanted = {a for n in names if n is not None for a in table.get(n, ()) if mesh_sizes.get(a, 1) > 1}
        used_axes |= wanted
        spec = spec_for(names, x.shape, mesh_sizes, rules)
        total += nbytes
        per_dev += shard_bytes(x.shape, x.dtype, spec, mesh_sizes)
        if wanted and all(e is None for e in spec):
            repl += nbytes
            listed.append((path_str(path), tuple(x.shape), nbytes))
    ideal = total / math.prod(mesh_sizes[a] for a in used_axes) if used_axes else total
    return {"total_bytes": total, "per_device_bytes": per_dev, "ideal_per_device_bytes": ideal,
            "replicated_bytes": repl, "replicated_fraction": repl / total if total else 0.0,
            "replicated": sorted(listed, key=lambda r: -r[2])}


def spec_dump(state, mesh_sizes: Mapping[str, int], rules: Rules) -> dict[str, str]:
    """{path pattern: 'shape -> spec'} with layer indices folded ('head_layers/*/attn/wq_a'),
    for golden files: one line per distinct parameter kind."""
    specs = state_specs(state, mesh_sizes, rules)
    out = {}
    for (path, x), spec in zip(jax.tree_util.tree_leaves_with_path(state),
                               jax.tree.leaves(specs, is_leaf=_is_spec)):
        key = re.sub(r"/\d+(?=/|$)", "/*", path_str(path))
        line = f"{list(x.shape)} -> {spec}"
        prev = out.get(key)
        if prev is not None and prev != line:
            key = path_str(path)
        out[key] = line
    return dict(sorted(out.items()))
