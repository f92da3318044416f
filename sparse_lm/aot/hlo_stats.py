"""What a compiled (per-device, SPMD-partitioned) HLO module computes and communicates.

`compiled.cost_analysis()` counts every loop body once, so a 19-iteration layer scan is counted
as one layer. This module reads the compiled HLO text and:

  * finds every `while` loop's trip count (XLA's `known_trip_count` when printed, else the loop
    condition `i < constant` with i starting at 0) and the number of times each computation
    runs (product of the trip counts of the loops around it);
  * counts matmul FLOPs (`dot`, and `convolution`, which is how TPU HLO spells most dots, and
    the cost estimate kernels such as TPU ragged_dot declare on their custom call) per
    computation, split by the op_name metadata into forward (`jvp(`), backward
    (`transpose(jvp(`) and the rest (optimizer, loss);
  * lists the collectives (all-gather, all-reduce, reduce-scatter, all-to-all,
    ragged-all-to-all, collective-permute; async `-start` forms counted once) with their bytes,
    replica groups and execution counts. Instructions that share a `channel_id` are one
    collective, counted once at the least-repeated place it appears: the TPU compiler splits
    a collective it overlaps with a loop into pieces (`async_collective_fusion`s inside the loop
    body, each printed with the whole output shape), and counting every piece as a whole
    collective once per iteration made a 1.6 MB all-gather look like 2.8 GB;
  * sums the bytes that non-fused instructions read and write (an HBM-traffic estimate).

Shapes: instruction names are unique in a module, so operand shapes come from a name table.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
               "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1,
               "f8e4m3b11fnuz": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "c64": 8, "c128": 16,
               "token": 0}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")

_ARRAY = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def array_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array type in a shape string, e.g. '(f32[2,3]{1,0}, s32[])' -> [(f32,(2,3)), (s32,())]."""
    return [(m.group(1), tuple(int(x) for x in m.group(2).split(",") if x))
            for m in _ARRAY.finditer(text)]


_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]+)"')
KERNEL_TARGETS = {"tpu_custom_call": "mosaic", "__gpu$xla.gpu.triton": "triton"}


def kernel_calls(text: str) -> dict[str, int]:
    """Pallas kernel calls in an HLO text by backend ({"mosaic": n, "triton": n}; absent = 0):
    the custom calls a TPU (Mosaic) or GPU (Triton) kernel lowers to."""
    counts: dict[str, int] = {}
    for m in _CUSTOM_TARGET.finditer(text):
        kind = KERNEL_TARGETS.get(m.group(1))
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def shapes_with_dims(text: str, dims: tuple[int, ...], max_gap: int = 1) -> list[str]:
    """Distinct array types in an HLO text whose dimensions hold `dims` in order, at most
    `max_gap` other dimensions between two of them (e.g. dims (S, N) with max_gap 1 finds
    [B, S, N] scores and [B, S, H, N] per-head scores), as 'f32[1,1024,256]' strings."""
    found = set()
    for dtype, shape in array_shapes(text):
        for start in (i for i, d in enumerate(shape) if d == dims[0]):
            at, ok = start, True
            for want in dims[1:]:
                nxt = [j for j in range(at + 1, min(len(shape), at + 2 + max_gap))
                       if shape[j] == want]
                if not nxt:
                    ok = False
                    break
                at = nxt[0]
            if ok:
                found.add(f"{dtype}[{','.join(map(str, shape))}]")
                break
    return sorted(found)


def shape_bytes(text: str) -> float:
    return sum(DTYPE_BYTES[d] * math.prod(s) for d, s in array_shapes(text))


@dataclasses.dataclass
class Instr:
    name: str
    shape: str          # the result type text (array or tuple)
    opcode: str
    args: str           # text after the opcode's '(' (operands and attributes)
    computation: str

    @property
    def op_name(self) -> str:
        m = _OPNAME.search(self.args)
        return m.group(1) if m else ""

    def operands(self) -> list[str]:
        depth, out, cur = 1, [], ""
        for ch in self.args:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0:
                    break
            cur += ch
        for part in cur.split(","):
            m = re.search(r"%([\w.\-]+)\s*$", part.strip())
            if m:
                out.append(m.group(1))
        return out

    def attr(self, key: str) -> str | None:
        m = re.search(r"\b" + re.escape(key) + r"=(\{[^}]*\}|[^,\s]+)", self.args)
        return m.group(1) if m else None


def _split_shape_opcode(rest: str) -> tuple[str, str, str]:
    """'f32[2]{0} add(%a, %b), ...' -> (shape, opcode, args)."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == " " and depth == 0:
            shape, tail = rest[:i], rest[i + 1:].lstrip()
            m = re.match(r"([\w\-]+)\((.*)$", tail, re.S)
            if m:
                return shape, m.group(1), m.group(2)
            return shape, tail.split("(")[0], ""
    return rest, "", ""


@dataclasses.dataclass
class Module:
    computations: dict          # name -> [Instr]
    entry: str
    shapes: dict                # instruction name -> shape text

    @classmethod
    def parse(cls, text: str) -> "Module":
        comps: dict[str, list[Instr]] = {}
        shapes: dict[str, str] = {}
        entry = ""
        current = None
        for line in text.splitlines():
            if current is None:
                m = _COMP_HEADER.match(line)
                if m and not line.startswith(" "):
                    current = m.group(2)
                    comps[current] = []
                    if m.group(1):
                        entry = current
                continue
            if line.startswith("}"):
                current = None
                continue
            m = _INSTR.match(line)
            if not m:
                continue
            shape, opcode, args = _split_shape_opcode(m.group(3))
            ins = Instr(m.group(2), shape, opcode, args, current)
            comps[current].append(ins)
            shapes[ins.name] = shape
        if not entry and comps:
            entry = list(comps)[-1]
        return cls(comps, entry, shapes)

    # ------------------------------------------------------------------ loops and call counts
    def trip_count(self, w: Instr) -> int | None:
        m = re.search(r'known_trip_count[^0-9]*(\d+)', w.args)
        if m:
            return int(m.group(1))
        cond = w.attr("condition")
        body = self.computations.get((cond or "").lstrip("%"))
        if not body:
            return None
        consts = {i.name: i for i in body if i.opcode == "constant"}
        for i in body:
            if i.opcode == "compare" and "direction=LT" in i.args:
                for op in i.operands():
                    c = consts.get(op)
                    if c is not None:
                        v = re.match(r"\s*(-?\d+)\)", c.args)
                        if v:
                            return int(v.group(1))
        return None

    def callees(self, ins: Instr) -> list[tuple[str, int | None]]:
        """(computation, repeat factor) called by one instruction (None = unknown trip count)."""
        out = []
        if ins.opcode == "while":
            body = ins.attr("body")
            if body:
                out.append((body.lstrip("%"), self.trip_count(ins)))
            cond = ins.attr("condition")
            if cond:
                out.append((cond.lstrip("%"), 1))
            return out
        for key in ("calls", "to_apply"):
            v = ins.attr(key)
            if v:
                out.extend((c.strip().lstrip("%"), 1) for c in v.strip("{}").split(","))
        for key in ("branch_computations", "called_computations", "true_computation",
                    "false_computation"):
            v = ins.attr(key)
            if v:
                out.extend((c.strip().lstrip("%"), 1) for c in v.strip("{}").split(",") if c.strip())
        return [(c, f) for c, f in out if c in self.computations]

    def multiplicities(self) -> tuple[dict[str, float], list[str]]:
        """({computation: times it runs per step}, [while loops with unknown trip counts])."""
        mult: dict[str, float] = defaultdict(float)
        unknown = []
        edges = defaultdict(list)
        indeg = defaultdict(int)
        for cname, instrs in self.computations.items():
            for ins in instrs:
                for callee, f in self.callees(ins):
                    if f is None:
                        unknown.append(ins.name)
                        f = 1
                    edges[cname].append((callee, f))
                    indeg[callee] += 1
        mult[self.entry] = 1.0
        ready = [c for c in self.computations if indeg[c] == 0]
        while ready:
            c = ready.pop()
            for callee, f in edges[c]:
                mult[callee] += mult[c] * f
                indeg[callee] -= 1
                if indeg[callee] == 0:
                    ready.append(callee)
        return dict(mult), unknown

    def fused(self) -> set[str]:
        """Fusion bodies and scalar reducers (`to_apply`): their instructions do not touch HBM
        on their own."""
        out = set()
        for instrs in self.computations.values():
            for ins in instrs:
                keys = ("calls", "to_apply") if ins.opcode == "fusion" else ("to_apply",)
                for key in keys:
                    v = ins.attr(key)
                    if v:
                        out.add(v.lstrip("%"))
        return out

    # ------------------------------------------------------------------ FLOPs
    def dot_flops(self, ins: Instr) -> float:
        out = array_shapes(ins.shape)
        if not out:
            return 0.0
        n_out = math.prod(out[0][1])
        ops = ins.operands()
        if ins.opcode == "dot":
            lhs = array_shapes(self.shapes.get(ops[0], "")) if ops else []
            dims = ins.attr("lhs_contracting_dims")
            if not lhs or dims is None:
                return 0.0
            k = math.prod(lhs[0][1][int(d)] for d in dims.strip("{}").split(",") if d)
            return 2.0 * n_out * k
        if ins.opcode == "convolution":
            lhs = array_shapes(self.shapes.get(ops[0], "")) if ops else []
            rhs = array_shapes(self.shapes.get(ops[1], "")) if len(ops) > 1 else []
            labels = ins.attr("dim_labels")
            if not lhs or not rhs or not labels:
                return 0.0
            lhs_l, rest = labels.split("_", 1)
            rhs_l, out_l = rest.split("->")
            k_in = math.prod(sz for lab, sz in zip(rhs_l, rhs[0][1]) if lab == "i")
            taps = 1.0
            win = _window(ins.attr("window"))
            for j, lab in enumerate(ch for ch in rhs_l if ch.isdigit()):
                size_in = lhs[0][1][lhs_l.index(lab)]
                size_out = out[0][1][out_l.index(lab)]
                w = {key: v[j] for key, v in win.items()}
                taps *= _mean_valid_taps(size_in, size_out, **w)
            return 2.0 * n_out * k_in * taps
        return 0.0


def _window(text: str | None) -> dict:
    """'{size=16 stride=15 pad=0_0 lhs_dilate=16}' -> {"size": [16], "stride": [15], ...}."""
    out: dict[str, list] = {}
    if not text:
        return out
    for item in text.strip("{}").split():
        key, _, val = item.partition("=")
        parts = val.split("x")
        if key == "pad":
            out["pad_lo"] = [int(p.split("_")[0]) for p in parts]
        elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
            out[key] = [int(p) for p in parts]
    return out


def _mean_valid_taps(size_in: int, size_out: int, size: int = 1, stride: int = 1,
                     pad_lo: int = 0, lhs_dilate: int = 1, rhs_dilate: int = 1) -> float:
    """Average number of kernel taps of one spatial dimension that land on a real input
    element (not padding, not a hole of lhs dilation): XLA spells batched matmuls as
    convolutions whose window mostly hits holes."""
    o = np.arange(size_out, dtype=np.int64)[:, None]
    k = np.arange(size, dtype=np.int64)[None, :]
    if size_out * size > 4_000_000:        # big windows: sample output positions
        o = o[:: max(1, size_out * size // 4_000_000)]
    x = o * stride + k * rhs_dilate - pad_lo
    ok = (x >= 0) & (x <= (size_in - 1) * lhs_dilate) & (x % lhs_dilate == 0)
    return float(ok.sum(axis=1).mean())


def _custom_flops(ins: Instr) -> float:
    """FLOPs a custom call (Pallas / Mosaic kernel, e.g. TPU ragged_dot) declares in its
    backend config's cost_estimate; 0 when it declares none."""
    m = re.search(r'"cost_estimate":\{"flops":"?(\d+)', ins.args)
    return float(m.group(1)) if m else 0.0


def phase_of(op_name: str) -> str:
    """forward (`jvp(`), backward (`transpose(jvp(`), unattributed (ops the compiler made
    without a jit(...) provenance, e.g. the weight-gradient half of TPU ragged_dot) or other
    (outside differentiation: optimizer update, router-bias update)."""
    if "transpose(jvp" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    if op_name and not op_name.startswith("jit("):
        return "unattributed"
    return "other"


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: float           # per device per execution (output; input for reduce-scatter)
    group_size: int
    groups: list | None     # device-id groups (None if unparsed)
    count: float            # executions per step
    op_name: str


def replica_groups(ins: Instr, n_devices: int, mesh_shape: dict | None = None) -> list | None:
    """Device-id groups of a collective from any of XLA's three printed forms."""
    a = ins.args
    m = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)\}", a)
    if m:
        return [[int(x) for x in g.split(",") if x.strip()]
                for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", a)
    if m:
        g, n = int(m.group(1)), int(m.group(2))
        dims = [int(x) for x in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(x) for x in m.group(4).split(",")])
        return ids.reshape(g, n).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", a)
    if m:
        axes = [(k.strip().strip("'"), int(v)) for k, v in
                (p.split("=") for p in m.group(1).split(",") if "=" in p)]
        names = [n for n, _ in axes]
        varying = [x.strip().strip("'") for x in m.group(2).split(",") if x.strip()]
        sizes = [s for _, s in axes]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        keep = [i for i, n in enumerate(names) if n not in varying]
        vary = [names.index(v) for v in varying if v in names]
        ids = ids.transpose(keep + vary).reshape(-1, math.prod(sizes[i] for i in vary) if vary else 1)
        return ids.tolist()
    m = re.search(r"source_target_pairs=\{(.*?)\}\}", a)
    if m:
        return [[int(x) for x in p.split(",")] for p in re.findall(r"\{(\d+,\d+)", m.group(0))]
    return None


@dataclasses.dataclass
class HloSummary:
    flops: dict              # {"forward", "backward", "other"}: matmul FLOPs per step (loops counted)
    flops_once: dict         # the same with every loop body counted once (what cost_analysis does)
    bytes: float             # HBM-traffic estimate of non-fused instructions per step
    bytes_once: float
    collectives: list        # [Collective]
    unknown_loops: list

    @property
    def matmul_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def matmul_flops_once(self) -> float:
        return sum(self.flops_once.values())

    def collective_table(self) -> dict[str, dict]:
        """{kind: {"count", "bytes"}} per step (bytes = sum over executions, per device)."""
        out: dict[str, dict] = {}
        for c in self.collectives:
            d = out.setdefault(c.kind, {"count": 0.0, "bytes": 0.0})
            d["count"] += c.count
            d["bytes"] += c.bytes * c.count
        return out


def summarize(text: str, n_devices: int) -> HloSummary:
    mod = Module.parse(text)
    mult, unknown = mod.multiplicities()
    fused = mod.fused()
    flops = defaultdict(float)
    once = defaultdict(float)
    nbytes = nbytes_once = 0.0
    colls = []
    by_channel: dict[tuple[str, str], Collective] = {}
    skip = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while",
            "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier"}
    for cname, instrs in mod.computations.items():
        m = mult.get(cname, 0.0)
        if m == 0:
            continue
        for ins in instrs:
            if ins.opcode in ("dot", "convolution", "custom-call"):
                f = mod.dot_flops(ins) if ins.opcode != "custom-call" else _custom_flops(ins)
                ph = phase_of(ins.op_name)
                flops[ph] += f * m
                once[ph] += f
            kind = ins.opcode[:-6] if ins.opcode.endswith("-start") else ins.opcode
            if kind in COLLECTIVES and not ins.opcode.endswith("-done"):
                shapes = array_shapes(ins.shape)
                if ins.opcode.endswith("-start") and kind in ("all-gather", "collective-permute") \
                        and ins.shape.startswith("("):
                    shapes = shapes[len(shapes) // 2:]      # (operands..., outputs...)
                b = sum(DTYPE_BYTES[d] * math.prod(s) for d, s in shapes)
                groups = replica_groups(ins, n_devices)
                gsize = len(groups[0]) if groups else n_devices
                if kind == "reduce-scatter":
                    b *= gsize
                channel = re.search(r"channel_id=(\d+)", ins.args)
                if channel is None:
                    colls.append(Collective(kind, b, gsize, groups, m, ins.op_name))
                else:           # one collective, however many pieces carry its channel
                    key = (kind, channel.group(1))
                    prev = by_channel.get(key)
                    if prev is None or m < prev.count:
                        by_channel[key] = Collective(kind, b, gsize, groups, m, ins.op_name)
            if cname not in fused and ins.opcode not in skip:
                b = shape_bytes(ins.shape) + sum(shape_bytes(mod.shapes.get(o, ""))
                                                 for o in ins.operands())
                nbytes += b * m
                nbytes_once += b
    colls.extend(by_channel.values())
    return HloSummary(dict(flops), dict(once), nbytes, nbytes_once, colls, unknown)
