"""Reading and writing sharded safetensors checkpoints, tensor by tensor, with NumPy only.

`SafetensorsDir` is the physical view: the files of a directory (through
`model.safetensors.index.json` when present), their headers (dtype, shape) read and validated by
safetensors' own reader without touching the data (its refusals of a truncated or random file
become one `CheckpointError` naming the file), and single tensors (or a range of their leading axis) read on demand through
`safetensors.safe_open(..., framework="np")`. FP8 dtypes, which NumPy (and therefore that API)
cannot represent, are read from the file's byte range and viewed as `ml_dtypes` types.

`LogicalCheckpoint` is the view the mapping uses: transformers tensor names, with FP8/FP4 weights
dequantised through their scale companions and the official checkpoints' per-expert tensors fused
into transformers' `gate_up_proj` / `down_proj`.

`ShardedWriter` writes tensors into shards of bounded size plus the index.
"""
from __future__ import annotations

import dataclasses
import json
import os
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sparse_lm.convert import quant
from sparse_lm.convert.mapping import ExpertPart, MappingError, SchemeError, detect_scheme

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_RAW_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
               "F8_E5M2": ml_dtypes.float8_e5m2}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F8_E5M2": 1, "U64": 8, "U32": 4,
             "U16": 2}


class CheckpointError(ValueError):
    """The checkpoint files are incomplete or inconsistent; the message names file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str            # safetensors dtype string, e.g. "F32", "BF16", "F8_E4M3", "I8"
    shape: tuple[int, ...]
    begin: int            # absolute byte offset of the data in the file
    end: int


def _open_error(path: str, e: Exception) -> CheckpointError:
    """safetensors' own refusal of a file, as a CheckpointError that names the file and says
    what is wrong in words (its messages are terse: 'header too large', ...)."""
    why = str(e).split(": ", 1)[-1]
    size = os.path.getsize(path)
    if "too small" in why:
        return CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header "
                               f"length: {size} bytes)")
    if "too large" in why:
        return CheckpointError(f"{path} is not a safetensors file or is truncated: its first 8 "
                               f"bytes announce a header longer than the file ({size} bytes)")
    if "not fully covered" in why or "incomplete" in why:
        return CheckpointError(f"{path} is truncated (truncated shard): its header lists tensor "
                               f"data beyond the file's {size} bytes ({why})")
    return CheckpointError(f"{path} is not a safetensors file: safetensors cannot read its header "
                           f"({why})")


def read_header(path: str) -> tuple[dict, dict]:
    """(tensors {name: {dtype, shape, data_offsets}}, metadata) of one safetensors file, read by
    `safetensors.safe_open`, which validates the header (JSON, dtypes, offsets that cover the
    data exactly, within the file). data_offsets are absolute byte offsets in the file: the data
    fill the end of the file without gaps, in `offset_keys()` order (safetensors checks it)."""
    try:
        with safe_open(path, framework="np") as f:
            order = f.offset_keys()
            entries = {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape()))
                       for n in order}
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise _open_error(path, e) from None
    sizes = {}
    for name, (dtype, shape) in entries.items():
        if dtype not in _ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; "
                                  f"supported: {sorted(_ITEMSIZE)}")
        sizes[name] = _ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
    begin = os.path.getsize(path) - sum(sizes.values())
    tensors = {}
    for name in order:
        dtype, shape = entries[name]
        tensors[name] = {"dtype": dtype, "shape": list(shape),
                         "data_offsets": [begin, begin + sizes[name]]}
        begin += sizes[name]
    return tensors, meta


class SafetensorsDir:
    """The physical tensors of a Hugging Face checkpoint directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = os.fspath(hf_dir)
        index = os.path.join(self.dir, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
            for fname in files:
                if not os.path.exists(os.path.join(self.dir, fname)):
                    held = sorted(n for n, f in weight_map.items() if f == fname)
                    raise CheckpointError(
                        f"missing shard {fname!r} listed in {INDEX_NAME}: it holds {len(held)} "
                        f"tensor(s), e.g. {held[:3]}")
        else:
            files = sorted(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files and no {INDEX_NAME} in {self.dir}")
            weight_map = None
        self.tensors: dict[str, TensorInfo] = {}
        for fname in files:
            path = os.path.join(self.dir, fname)
            header, _ = read_header(path)
            for name, t in header.items():     # read_header refused truncated files
                begin, end = t["data_offsets"]
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both "
                                          f"{self.tensors[name].file} and {fname}")
                if weight_map is not None and weight_map.get(name) != fname:
                    continue   # the index decides which file holds a tensor
                self.tensors[name] = TensorInfo(fname, t["dtype"], tuple(t["shape"]), begin, end)
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in self.tensors:
                    raise CheckpointError(f"tensor {name!r} is listed in {INDEX_NAME} for "
                                          f"{fname!r} but that file does not contain it")

    def names(self) -> set[str]:
        return set(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint {self.dir}")
        return self.tensors[name]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """The tensor (or rows [start:stop] of its leading axis) as a NumPy array."""
        t = self.info(name)
        path = os.path.join(self.dir, t.file)
        if t.dtype in _RAW_DTYPES:
            n0 = t.shape[0] if t.shape else 1
            start, stop, _ = (rows or slice(None)).indices(n0)
            row_bytes = (t.end - t.begin) // max(n0, 1)
            count = (stop - start) * row_bytes
            with open(path, "rb") as f:
                f.seek(t.begin + start * row_bytes)
                buf = np.frombuffer(f.read(count), np.uint8)
            shape = ((stop - start),) + t.shape[1:] if t.shape else ()
            return buf.view(_RAW_DTYPES[t.dtype]).reshape(shape)
        with safe_open(path, framework="np") as f:
            if rows is None:
                return f.get_tensor(name)
            return f.get_slice(name)[rows]


class InventoryFiles:
    """A checkpoint known only by its tensor inventory (name -> safetensors dtype and shape), e.g.
    a release's `model.safetensors.index.json` plus headers: the same names()/info() as
    `SafetensorsDir`, so `LogicalCheckpoint` and validation run on it without any data."""

    def __init__(self, inventory: dict[str, tuple[str, tuple[int, ...]]], label: str = "inventory"):
        self.dir = label
        self.tensors = {}
        for name, (dtype, shape) in inventory.items():
            if dtype not in _ITEMSIZE:
                raise CheckpointError(f"{label}: tensor {name!r} has unknown dtype {dtype!r}")
            self.tensors[name] = TensorInfo("<inventory>", dtype, tuple(int(x) for x in shape), 0, 0)

    def names(self) -> set[str]:
        return set(self.tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is not in {self.dir}")
        return self.tensors[name]

    def read(self, name: str, rows=None):
        raise CheckpointError(f"{self.dir} holds tensor names and shapes only, no data ({name!r})")


@dataclasses.dataclass
class _Logical:
    """How one logical (transformers-named) tensor is made from physical tensors."""
    shape: tuple[int, ...]
    source_dtype: np.dtype          # dtype of the values before any cast (bf16 after dequant)
    physical: list[str]             # every physical tensor consumed (incl. scales)
    weight: str | None = None       # plain or quantised tensor
    scale: str | None = None        # its scale companion
    experts: list[dict] | None = None   # fused: per expert {part: (weight, scale)}
    parts: tuple[str, ...] = ()


def _np_dtype(st_dtype: str):
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
             "BOOL": np.bool_, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16}
    if st_dtype in table:
        return np.dtype(table[st_dtype])
    if st_dtype in _RAW_DTYPES:
        return np.dtype(_RAW_DTYPES[st_dtype])
    raise CheckpointError(f"unsupported safetensors dtype {st_dtype}")


class LogicalCheckpoint:
    """Transformers-named view of a checkpoint in any naming scheme, dequantising on read.

    The scheme (`mapping.SCHEMES`: "transformers", "transformers-resaved", "transformers-saved"
    or "official") is detected from the tensor names (`mapping.detect_scheme`; mixed or unknown
    names are a `CheckpointError` listing the first unmatched tensors of each scheme tried).
    Names of no scheme at all are kept in `unmapped` (validation reports them). `files` is a
    `SafetensorsDir` or anything with the same names()/info()/read() (e.g. `InventoryFiles`).
    """

    def __init__(self, files, *, fp8_block=quant.FP8_BLOCK, fp4_block=quant.FP4_BLOCK):
        self.files = files
        self.fp8_block, self.fp4_block = tuple(fp8_block), int(fp4_block)
        names = files.names()
        # Scale companions: X.scale or X.weight_scale_inv next to X.weight.
        self.scale_of: dict[str, str] = {}
        for n in names:
            for suffix in (".scale", ".weight_scale_inv"):
                if n.endswith(suffix) and n[: -len(suffix)] + ".weight" in names:
                    self.scale_of[n[: -len(suffix)] + ".weight"] = n
        scales = set(self.scale_of.values())
        if not names - scales:
            raise CheckpointError(f"no tensors in {files.dir}")
        try:
            found = detect_scheme(names - scales)
        except SchemeError as e:
            raise CheckpointError(f"{files.dir}: {e}") from None
        self.naming = found.scheme
        self.scheme = found.scheme.name
        self.logical: dict[str, _Logical] = {}
        self.unmapped: list[str] = list(found.unmatched)
        unmatched = set(found.unmatched)
        fused: dict[str, dict[int, dict[str, str]]] = {}
        for n in sorted(names - scales - unmatched):
            target = self.naming.to_logical(n)
            if isinstance(target, ExpertPart):
                fused.setdefault(target.logical, {}).setdefault(target.expert, {})[target.part] = n
            else:
                if target in self.logical:
                    raise CheckpointError(f"tensors {self.logical[target].weight!r} and {n!r} "
                                          f"are both {target!r}")
                self.logical[target] = self._plain(n)
        for logical, experts in fused.items():
            self.logical[logical] = self._fused(logical, experts)

    # ------------------------------------------------------------------ construction helpers
    def _value_shape(self, weight: str) -> tuple[int, ...]:
        t = self.files.info(weight)
        scale = self.scale_of.get(weight)
        if scale is None:
            return t.shape
        if t.dtype in ("I8", "U8"):      # packed FP4: two values per byte
            if len(t.shape) != 2:
                raise CheckpointError(f"{weight}: packed FP4 weight must be 2-D, got {t.shape}")
            shape = (t.shape[0], 2 * t.shape[1])
            want = (shape[0], -(-shape[1] // self.fp4_block))
        elif t.dtype == "F8_E4M3":
            if len(t.shape) != 2:
                raise CheckpointError(f"{weight}: FP8 weight must be 2-D, got {t.shape}")
            shape = t.shape
            want = tuple(-(-s // b) for s, b in zip(shape, self.fp8_block))
        else:
            raise CheckpointError(f"{weight} has a scale companion {scale!r} but dtype {t.dtype} "
                                  "is neither F8_E4M3 (FP8) nor I8 (packed FP4)")
        got = self.files.info(scale).shape
        if tuple(got) != want:
            raise CheckpointError(f"{scale}: scale grid has shape {tuple(got)}, expected {want} "
                                  f"for {weight} of value shape {shape}")
        return shape

    def _source_dtype(self, weight: str) -> np.dtype:
        if weight in self.scale_of:
            return np.dtype(ml_dtypes.bfloat16)
        return _np_dtype(self.files.info(weight).dtype)

    def _plain(self, n: str) -> _Logical:
        phys = [n] + ([self.scale_of[n]] if n in self.scale_of else [])
        return _Logical(self._value_shape(n), self._source_dtype(n), phys, weight=n,
                        scale=self.scale_of.get(n))

    def _fused(self, logical: str, experts: dict[int, dict[str, str]]) -> _Logical:
        parts = ("w2",) if logical.endswith("down_proj") else ("w1", "w3")
        count = max(experts) + 1
        rows, phys, shapes, dts = [], [], set(), set()
        for e in range(count):
            have = experts.get(e, {})
            missing = [p for p in parts if p not in have]
            if missing:
                layer = logical.split(".mlp.")[0]
                pre = (self.naming.layer_prefix + layer[len("model.layers."):]
                       if layer.startswith("model.layers.") else layer)
                raise CheckpointError(f"missing tensor {pre}.ffn.experts.{e}.{missing[0]}.weight "
                                      f"(experts 0..{count - 1} are present for {logical})")
            row = {}
            for p in parts:
                w = have[p]
                row[p] = (w, self.scale_of.get(w))
                phys += [w] + ([self.scale_of[w]] if w in self.scale_of else [])
                shapes.add((p, self._value_shape(w)))
                dts.add(self._source_dtype(w))
            rows.append(row)
        per_part = {}
        for p, s in shapes:
            if p in per_part and per_part[p] != s:
                raise CheckpointError(f"expert tensors {p} of {logical} have different shapes "
                                      f"{per_part[p]} and {s}")
            per_part[p] = s
        if parts == ("w2",):
            d, i = per_part["w2"]
            shape = (count, d, i)
        else:
            if per_part["w1"] != per_part["w3"]:
                raise CheckpointError(f"{logical}: w1 {per_part['w1']} and w3 {per_part['w3']} "
                                      "shapes differ")
            i, d = per_part["w1"]
            shape = (count, 2 * i, d)
        return _Logical(shape, np.result_type(*dts), phys, experts=rows, parts=parts)

    # ------------------------------------------------------------------ queries
    def names(self) -> set[str]:
        return set(self.logical)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.logical[name].shape

    def source_dtype(self, name: str) -> np.dtype:
        return self.logical[name].source_dtype

    def physical_names(self, name: str) -> list[str]:
        return self.logical[name].physical

    def _read_value(self, weight: str, scale: str | None, rows: slice | None = None):
        arr = self.files.read(weight, rows)
        if scale is None:
            return arr
        if rows is not None:
            raise MappingError(f"{weight}: row slices of quantised tensors are not supported")
        return quant.dequant(arr, self.files.read(scale), fp8_block=self.fp8_block,
                             fp4_block=self.fp4_block, name=weight)

    def read(self, name: str, experts: slice | None = None) -> np.ndarray:
        """The logical tensor (experts: only that range of its leading expert axis)."""
        if name not in self.logical:
            raise CheckpointError(f"missing tensor {name!r}")
        lg = self.logical[name]
        if lg.experts is None:
            if lg.scale is not None and experts is not None:
                full = self._read_value(lg.weight, lg.scale)
                return full[experts]
            return self._read_value(lg.weight, lg.scale, experts)
        sel = range(len(lg.experts))[experts or slice(None)]
        out = []
        for e in sel:
            vals = [self._read_value(*lg.experts[e][p]) for p in lg.parts]
            out.append(np.concatenate(vals, axis=0) if len(vals) > 1 else vals[0])
        if not out:
            return np.zeros((0,) + lg.shape[1:], lg.source_dtype)
        return np.stack(out)


class ShardedWriter:
    """Collects tensors into shards of at most `max_shard_bytes` (one tensor may exceed it) and
    writes `model.safetensors` or `model-0000k-of-0000n.safetensors` + the index at `close()`."""

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30,
                 metadata: dict[str, str] | None = None):
        self.dir = out_dir
        self.max = max_shard_bytes
        self.meta = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []   # (temporary file, names)
        self.total_bytes = 0

    def add(self, name: str, array: np.ndarray):
        if name in self.pending or any(name in names for _, names in self.written):
            raise MappingError(f"tensor {name!r} written twice")
        array = np.ascontiguousarray(array)
        if self.pending and self.pending_bytes + array.nbytes > self.max:
            self._flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def _flush(self):
        if not self.pending:
            return
        path = os.path.join(self.dir, f"shard-{len(self.written):05d}.tmp")
        save_file(self.pending, path, metadata=self.meta)
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self._flush()
        n = len(self.written)
        if n == 1:
            os.replace(self.written[0][0], os.path.join(self.dir, SINGLE_NAME))
            return [SINGLE_NAME]
        weight_map, files = {}, []
        for k, (path, names) in enumerate(self.written):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, os.path.join(self.dir, fname))
            files.append(fname)
            weight_map.update({nm: fname for nm in names})
        with open(os.path.join(self.dir, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes},
                       "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        return files

