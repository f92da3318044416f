"""Device meshes with the axes `data, fsdp, tensor, expert, context`, from sizes in a config.

Sizes come in two groups: `ici` (inside one slice / host group, fast links) and `dcn` (across
slices, the data-center network). One size per group may be -1 = "whatever fills the devices".
The mesh axis size is ici * dcn. On a single slice every dcn size resolves to 1.

Meshes are built with `AxisType.Auto` axes (GSPMD with logical sharding rules). `jax.make_mesh`
defaults to Explicit axes, under which `shard_map` and sharding constraints behave differently,
so we never use its default.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor", "expert", "context")
"""Mesh axis names, in mesh order (outermost first: data parallel is the cheapest to put on DCN)."""


class ShardingError(ValueError):
    """A sharding preset, mesh or topology is invalid; the message names the valid choices."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_axis_sizes(sizes: Mapping[str, int], n_devices: int, *, what: str = "mesh") -> dict:
    """Fill in a -1 and check that the sizes multiply to `n_devices`.

    sizes: {axis: int} over (a subset of) AXES; missing axes are 1. Returns {axis: size} for all
    AXES, in AXES order. Errors name the axis and the values that would work.
    """
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise ShardingError(f"{what}: unknown mesh axis name(s) {unknown}; valid axes: {list(AXES)}")
    if n_devices < 1:
        raise ShardingError(f"{what}: no devices to build a mesh on")
    out = {}
    fill = []
    for a in AXES:
        v = sizes.get(a, 1)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ShardingError(f"{what}.{a}={v!r} is invalid: an axis size is an integer >= 1, "
                                f"or -1 for 'fill the remaining devices'")
        v = int(v)
        if v == -1:
            fill.append(a)
        elif v < 1:
            raise ShardingError(f"{what}.{a}={v} is invalid: an axis size is an integer >= 1, or -1 "
                                f"for 'fill the remaining devices'; divisors of the {n_devices} "
                                f"devices: {divisors(n_devices)}")
        out[a] = v
    if len(fill) > 1:
        raise ShardingError(f"{what}: axes {fill} are all -1; at most one axis may be -1 (fill), "
                            f"give the others explicit sizes from {divisors(n_devices)}")
    fixed = math.prod(v for a, v in out.items() if a not in fill)
    if fill:
        if n_devices % fixed:
            given = {a: v for a, v in out.items() if v != 1 and a not in fill}
            raise ShardingError(
                f"{what}: the fixed axis sizes {given} (product {fixed}) do not divide the "
                f"{n_devices} devices; each product of fixed sizes must be one of the divisors "
                f"{divisors(n_devices)}")
        out[fill[0]] = n_devices // fixed
    elif fixed != n_devices:
        given = {a: v for a, v in out.items() if v != 1}
        raise ShardingError(
            f"{what}: the axis sizes {given} multiply to {fixed}, but there are {n_devices} "
            f"devices; make them multiply to {n_devices} (or set one axis to -1 to fill); "
            f"valid sizes per axis are the divisors {divisors(n_devices)}")
    return out


def num_slices(devices: Sequence) -> int:
    """Number of distinct `slice_index` values (1 for devices that have none, e.g. CPU)."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def mesh_shape(ici: Mapping[str, int], dcn: Mapping[str, int], n_devices: int,
               slices: int = 1) -> tuple[dict, dict]:
    """(ici sizes, dcn sizes) resolved for `n_devices` split into `slices` equal slices."""
    if slices < 1 or n_devices % slices:
        raise ShardingError(f"{n_devices} devices cannot be split into {slices} equal slices")
    return (resolve_axis_sizes(ici, n_devices // slices, what="ici mesh"),
            resolve_axis_sizes(dcn, slices, what="dcn mesh"))


def make_mesh(ici: Mapping[str, int], dcn: Mapping[str, int] | None = None,
              devices: Sequence | None = None, *, slices: int | None = None) -> Mesh:
    """A `Mesh` over AXES with Auto axis types.

    devices: default `jax.devices()`. slices: how many slices the devices form; default: the
    number of distinct `device.slice_index` values (TPU multi-slice), else 1. With `slices` > 1
    on devices without a slice index (CPU tests), consecutive groups of devices act as slices.
    Axis size = ici size * dcn size; the dcn part is the outer (slow) factor of each axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    found = num_slices(devices)
    slices = found if slices is None else slices
    ici_s, dcn_s = mesh_shape(ici, dcn or {}, n, slices)
    ici_shape = [ici_s[a] for a in AXES]
    dcn_shape = [dcn_s[a] for a in AXES]
    shape = [i * d for i, d in zip(ici_shape, dcn_shape)]
    is_tpu = devices[0].platform == "tpu"
    if slices > 1:
        if found == slices:
            arr = _hybrid(ici_shape, dcn_shape, devices, is_tpu)
        else:
            groups = [devices[i * (n // slices):(i + 1) * (n // slices)] for i in range(slices)]
            arr = _stack_slices([np.asarray(g).reshape(ici_shape) for g in groups], dcn_shape)
    elif is_tpu:
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _stack_slices(slice_arrays: list, dcn_shape: list) -> np.ndarray:
    """Per-slice device arrays [ici...] laid out on the dcn grid -> one array [ici*dcn ...]."""
    grid = np.empty(dcn_shape, dtype=object)
    for i, idx in enumerate(np.ndindex(*dcn_shape)):
        grid[idx] = slice_arrays[i]
    ici_shape = slice_arrays[0].shape
    out = np.empty([i * d for i, d in zip(ici_shape, dcn_shape)], dtype=object)
    for idx in np.ndindex(*dcn_shape):
        sl = tuple(slice(k * s, (k + 1) * s) for k, s in zip(idx, ici_shape))
        out[sl] = grid[idx]
    return out


def _hybrid(ici_shape, dcn_shape, devices, is_tpu):
    by_slice: dict[int, list] = {}
    for d in devices:
        by_slice.setdefault(getattr(d, "slice_index", 0) or 0, []).append(d)
    arrays = []
    for k in sorted(by_slice):
        devs = by_slice[k]
        if is_tpu:
            arrays.append(mesh_utils.create_device_mesh(ici_shape, devs,
                                                        allow_split_physical_axes=True))
        else:
            arrays.append(np.asarray(devs).reshape(ici_shape))
    return _stack_slices(arrays, dcn_shape)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def describe(mesh: Mesh) -> str:
    """'data=1 fsdp=8 tensor=1 expert=1 context=1' (only the axes, in mesh order)."""
    return " ".join(f"{a}={s}" for a, s in axis_sizes(mesh).items())
