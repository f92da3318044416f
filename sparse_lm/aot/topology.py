"""Cloud TPU slice names -> `get_topology_desc` topologies, chip facts, and a collective cost model.

Cloud TPU names are not topology strings: `v5p-128` is 64 chips (v4 and v5p names count
TensorCores, two per chip) in a 4x4x4 torus; `v6e-256` / `v5e-8` count chips (16x16, 2x4).
`name x N` (e.g. `v5p-128x2`) is N slices joined over the data-center network (DCN).
A raw topology string (`v5e:2x2`) is accepted too.

Chip figures are the rule-of-thumb numbers of the public "How to Scale Your Model" (scaling
book) tables: bf16 peak FLOP/s, HBM capacity and bandwidth, one-way ICI bandwidth per link, and
a DCN egress of ~6.25 GB/s per chip. They are for estimates, not measurements.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np

from sparse_lm.sharding.mesh import ShardingError


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    hbm_bytes: float           # per chip
    peak_flops: float          # bf16 FLOP/s per chip
    hbm_bw: float              # bytes/s per chip
    ici_link_bw: float         # one-way bytes/s per ICI link
    torus_dims: int            # 2 (v5e, v6e) or 3 (v4, v5p)
    name_counts_cores: bool    # the number in the Cloud name counts TensorCores (2 per chip)


GiB = float(1 << 30)
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 2.75e14, 1.2e12, 4.5e10, 3, True),
    "v5e": Chip("v5e", 16 * GiB, 1.97e14, 8.1e11, 4.5e10, 2, False),
    "v5p": Chip("v5p", 95 * GiB, 4.59e14, 2.765e12, 9.0e10, 3, True),
    "v6e": Chip("v6e", 32 * GiB, 9.18e14, 1.64e12, 9.0e10, 2, False),
}
DCN_BW_PER_CHIP = 6.25e9

_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


def _table() -> dict[str, tuple[str, str, int]]:
    """{Cloud name: (generation, topology string, chips)}."""
    out = {}
    for gen, chip in CHIPS.items():
        shapes = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
        for chips, shape in shapes.items():
            n = chips * 2 if chip.name_counts_cores else chips
            out[f"{gen}-{n}"] = (gen, f"{gen}:{shape}", chips)
    return out


TOPOLOGIES = _table()


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    name: str                  # what the user wrote
    generation: str
    topology: str              # get_topology_desc name of one slice
    chips: int                 # per slice
    slices: int = 1

    @property
    def chip(self) -> Chip:
        return CHIPS[self.generation]


def valid_names() -> list[str]:
    def key(n):
        g, c = n.split("-")
        return (g, int(c))
    return sorted(TOPOLOGIES, key=key)


def resolve_topology(name: str) -> TopologySpec:
    """'v5p-128', 'v6e-256x2' (2 slices) or 'v5e:2x2' -> TopologySpec; unknown names raise with
    the list of valid ones."""
    s = name.strip()
    m = re.fullmatch(r"(v\d+\w?)-(\d+)(?:x(\d+))?", s)
    if m:
        base = f"{m.group(1)}-{m.group(2)}"
        if base in TOPOLOGIES:
            gen, topo, chips = TOPOLOGIES[base]
            return TopologySpec(s, gen, topo, chips, int(m.group(3) or 1))
    m = re.fullmatch(r"(v\d+\w?):(\d+(?:x\d+)+)", s)
    if m and m.group(1) in CHIPS:
        chips = math.prod(int(x) for x in m.group(2).split("x"))
        return TopologySpec(s, m.group(1), s, chips)
    raise ShardingError(f"unknown TPU topology {name!r}; valid names: {', '.join(valid_names())} "
                        f"(append xN for N slices, e.g. v5p-128x2), or a topology string "
                        f"<generation>:<AxB[xC]> with generation in {sorted(CHIPS)}")


def topology_devices(spec: TopologySpec) -> list:
    """Abstract TPU devices of the topology (libtpu compiles for them on a CPU host)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # after the variable above: this import may load libtpu, which reads it
    from jax.experimental import topologies
    kw = {"num_slices": spec.slices} if spec.slices > 1 else {}
    return list(topologies.get_topology_desc(spec.topology, "tpu", **kw).devices)


# ----------------------------------------------------------------------------- collective cost
def _group_dims(group: list[int], devices: list) -> tuple[int, bool]:
    """(number of torus dimensions a replica group spans, whether it spans slices)."""
    devs = [devices[i] for i in group if i < len(devices)]
    if not devs:
        return 1, False
    slices = {getattr(d, "slice_index", 0) or 0 for d in devs}
    coords = [tuple(getattr(d, "coords", (0,))) for d in devs]
    arr = np.asarray(coords)
    dims = int(sum(len(np.unique(arr[:, j])) > 1 for j in range(arr.shape[1]))) if arr.ndim == 2 else 1
    if dims == 0 and len({getattr(d, "id", i) for i, d in enumerate(devs)}) > 1:
        dims = 1                    # cores of one chip
    return max(dims, 1), len(slices) > 1


def collective_seconds(kind: str, nbytes: float, group: list[int] | None, group_size: int,
                       devices: list, chip: Chip) -> tuple[float, str]:
    """Time of one collective (per device), with the scaling-book rules of thumb:

    all-gather (output V) and reduce-scatter (input V): V (n-1)/n / (W D);
    all-reduce: twice that; all-to-all (buffer V): V (n-1)/n max(1, n/4) / (W D) (a shard
    travels n/4 hops on average on a bidirectional ring); collective-permute: V / W_link.
    W = bidirectional ICI bandwidth per link (2 x one-way), D = torus dimensions the group
    spans. Across slices the DCN egress per chip replaces W D.
    """
    n = max(group_size, 1)
    if n == 1 and kind != "collective-permute":
        return 0.0, "ici"
    dims, dcn = _group_dims(group, devices) if group else (1, False)
    if kind == "collective-permute":
        factor = 1.0
    elif kind in ("all-gather", "reduce-scatter"):
        factor = (n - 1) / n
    elif kind == "all-reduce":
        factor = 2 * (n - 1) / n
    else:                                   # all-to-all, ragged-all-to-all
        factor = (n - 1) / n * max(1.0, n / 4)
    if dcn:
        return nbytes * factor / DCN_BW_PER_CHIP, "dcn"
    bw = chip.ici_link_bw if kind == "collective-permute" else 2 * chip.ici_link_bw * dims
    return nbytes * factor / bw, "ici"
