"""Conversion engine: HF checkpoint -> our NNX state (optionally sharded), our state -> HF files,
and our own orbax checkpoint format.

Load path (`load_state`): headers only are read first and every problem (missing shard, missing or
unknown tensor, wrong shape, bad scale grid, config we cannot represent) is reported before any
data is touched. Then leaves are built one group at a time. With a target sharding each leaf is
created by `jax.make_array_from_callback`, whose callback reads only the layers (cycle repeats)
and experts of the requested shard, so a process never holds more than one layer-slice of one
tensor group that its devices need.

Checkpoint format (`save_checkpoint` / `restore_checkpoint`):
    CKPT/model/              orbax (StandardCheckpointer) of `nnx.to_pure_dict(nnx.state(model))`:
                             parameters, router biases (RouterBias) and hash tables (HashTable)
    CKPT/model_config.json   {"format": ..., "model_config": ModelConfig.to_dict(), "source": ...}
written under a temporary sibling directory and renamed into place at the end.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from sparse_lm.config import ConfigError, ModelConfig
from sparse_lm.convert import quant
from sparse_lm.convert.hf_config import (ARCHITECTURAL_FIELDS, config_differences, from_hf_config,
                                         read_hf_config, to_hf_config)
from sparse_lm.convert.mapping import (ExpertsGateUp, ExpertsDown, Group, HashIds, MappingError,
                                       build_groups, logical_to_official, official_expert_names)
from sparse_lm.convert.safetensors_io import (CheckpointError, InventoryFiles, LogicalCheckpoint,
                                              SafetensorsDir, ShardedWriter)
from sparse_lm.model.transformer import build_model

log = logging.getLogger(__name__)

FORMAT = "sparse_lm.convert/1"
# Errors caused by the input (config, files, tensors, paths); the CLIs print their message only.
# ConfigError, CheckpointError, MappingError and QuantError are ValueErrors.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError)
MODEL_ITEM = "model"
CONFIG_FILE = "model_config.json"


# ----------------------------------------------------------------------------------- utilities
def _np_dtype(dtype) -> np.dtype | None:
    if dtype is None:
        return None
    try:
        dt = np.dtype(jnp.dtype(dtype))
    except TypeError as e:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed values float32, bfloat16 or None "
                         "(keep each tensor's checkpoint dtype)") from e
    if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        raise ValueError(f"dtype={dtype!r} is invalid: allowed values float32, bfloat16 or None")
    return dt


def _dtype_name(dt: np.dtype) -> str:
    return "bfloat16" if dt == np.dtype(ml_dtypes.bfloat16) else "float32"


def _set(tree: dict, path: Sequence, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path: Sequence):
    for k in path:
        tree = tree[k] if k in tree else tree[str(k)]   # orbax metadata keys are strings
    return tree


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract state, {flat path: Variable}) without allocating parameters."""
    model = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, state = nnx.split(model)
    return graphdef, state, dict(nnx.to_flat_state(state))


def _describe(names: list[str], what: str) -> str:
    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
    return f"{what} {', '.join(repr(n) for n in names[:5])}{more}"


# --------------------------------------------------------------------------------- shardings
def shardings_from_rules(flat_vars: Mapping[tuple, Any], mesh: jax.sharding.Mesh,
                         rules: Mapping[str, Any] | Sequence[tuple[str, Any]] | None):
    """{path: NamedSharding}: each parameter's logical axis names (`out_sharding` metadata) are
    mapped to mesh axes by `rules` (logical name -> mesh axis, tuple of axes, or None). Names
    without a rule are replicated; a mesh axis already used by an earlier dimension of the same
    parameter is not used again (that dimension is replicated, as with flax's logical rules);
    a dimension not divisible by its mesh axes is an error."""
    rules = dict(rules or {})
    for logical, axes in rules.items():
        for a in (axes if isinstance(axes, (tuple, list)) else (axes,)):
            if a is not None and a not in mesh.shape:
                raise ValueError(f"sharding rule {logical!r} -> {a!r}: mesh has axes "
                                 f"{tuple(mesh.shape)}")
    out = {}
    for path, var in flat_vars.items():
        names = getattr(var, "out_sharding", None) or (None,) * len(var.shape)
        spec, used = [], set()
        for dim, name in zip(var.shape, names):
            axes = rules.get(name) if name is not None else None
            axes_set = set(axes if isinstance(axes, (tuple, list)) else (axes,)) - {None}
            if used & axes_set:
                axes = None
            if axes is not None:
                used |= axes_set
                size = int(np.prod([mesh.shape[a] for a in
                                    (axes if isinstance(axes, (tuple, list)) else (axes,))]))
                if dim % size:
                    raise ValueError(f"parameter {'.'.join(map(str, path))} dimension {name!r} of "
                                     f"size {dim} is not divisible by mesh axes {axes} ({size})")
            spec.append(tuple(axes) if isinstance(axes, list) else axes)
        out[path] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
    return out


# ------------------------------------------------------------------------------- config + plan
def resolve_config(hf_dir: str, ckpt: LogicalCheckpoint, config: ModelConfig | None = None,
                   hf_json: dict | None = None) -> ModelConfig:
    """The model config of a checkpoint: from config.json, from `config`, or both (must agree).

    MTP: transformers checkpoints carry no `mtp.*` tensors although config.json says
    num_nextn_predict_layers=1; the model is then built with mtp_depth=0 (likewise whenever
    there is no `mtp.0.*` tensor).
    """
    if hf_json is None and os.path.exists(os.path.join(hf_dir, "config.json")):
        hf_json = read_hf_config(hf_dir)
    if hf_json is None and config is None:
        raise ConfigError(f"{hf_dir} has no config.json; pass the model config (--config)")
    from_json = from_hf_config(hf_json) if hf_json is not None else None
    if config is not None and from_json is not None:
        fields = [f for f in ARCHITECTURAL_FIELDS if f != "mtp_depth"]
        diffs = config_differences(config, from_json, fields)
        if diffs:
            raise ConfigError("the given model config disagrees with config.json in "
                              f"{hf_dir}: " + "; ".join(diffs) + " (given vs config.json)")
    cfg = config if config is not None else from_json
    # The model's MTP block is mtp.0 (depth 1); other mtp.* blocks are tensors it does not use.
    has_mtp = any(n.startswith("mtp.0.") for n in ckpt.names())
    if cfg.mtp_depth and not has_mtp:
        log.info("no mtp.* tensors in %s: building the model without MTP (mtp_depth=0)", hf_dir)
        cfg = cfg.replace(mtp_depth=0)
    return cfg


def _expected_hf_shapes(groups: list[Group], flat_vars) -> dict[str, tuple]:
    expected = {}
    for g in groups:
        ours = [tuple(flat_vars[p].shape)[1:] if g.stacked else tuple(flat_vars[p].shape)
                for p in g.ours]
        shapes = g.transform.hf_shapes(ours)
        for names in g.hf:
            for n, s in zip(names, shapes):
                expected[n] = tuple(s)
    return expected


def validate(ckpt: LogicalCheckpoint, groups: list[Group], flat_vars, *,
             skip_unused: bool = False) -> list[str]:
    """Every tensor present with its expected shape, and no tensor left over (headers only).

    Tensors that belong to no parameter of the model (e.g. MTP or drafter blocks the model does
    not build) are an error, unless `skip_unused`: then they are logged and returned (sorted
    physical names), and the load ignores them. Nothing is ever dropped silently.
    """
    expected = _expected_hf_shapes(groups, flat_vars)
    missing = sorted(set(expected) - ckpt.names())
    if missing:
        raise CheckpointError(_describe(missing, "missing tensor(s)") +
                              f" (logical names; the checkpoint has {ckpt.scheme} names) in "
                              f"{ckpt.files.dir}")
    for n, s in expected.items():
        got = ckpt.shape(n)
        if tuple(got) != s:
            phys = ckpt.physical_names(n)
            where = "" if phys == [n] else f" (stored as {phys[:4]})"
            raise CheckpointError(f"tensor {n!r}{where} has shape {tuple(got)}, expected {s}")
    unknown = sorted(ckpt.unmapped)
    for n in sorted(ckpt.names() - set(expected)):
        unknown += ckpt.physical_names(n)
    unknown = sorted(unknown)
    if unknown and not skip_unused:
        raise CheckpointError(_describe(unknown, "unknown tensor(s)") +
                              f" in {ckpt.files.dir}: they belong to no parameter of this model "
                              "(to load without them, pass skip_unused=True / --skip-unused; "
                              "they are then listed and skipped)")
    if unknown:
        log.warning("%s: skipping %d tensor(s) this model does not use: %s", ckpt.files.dir,
                    len(unknown), _describe(unknown, "")[1:])
    return unknown


@dataclasses.dataclass
class CheckReport:
    """What validating a checkpoint found (headers or inventory only, no tensor data)."""
    scheme: str                 # naming scheme detected (mapping.SCHEMES)
    config: ModelConfig         # the model it loads as (mtp_depth as the tensors decide)
    tensors: int                # physical tensors in the checkpoint (scales included)
    skipped: list[str]          # physical tensors not used (only with skip_unused=True)


def _check(ckpt: LogicalCheckpoint, hf_dir: str, config, hf_json, skip_unused) -> CheckReport:
    cfg = resolve_config(hf_dir, ckpt, config, hf_json)
    _, _, flat_vars = abstract_model(cfg)
    skipped = validate(ckpt, build_groups(cfg), flat_vars, skip_unused=skip_unused)
    return CheckReport(ckpt.scheme, cfg, len(ckpt.files.names()), skipped)


def _fp8_block(hf_json) -> tuple:
    q = (hf_json or {}).get("quantization_config") or {}
    block = q.get("weight_block_size", quant.FP8_BLOCK)
    if not (isinstance(block, (list, tuple)) and len(block) == 2):
        raise ConfigError(f"config.json field 'quantization_config.weight_block_size'={block!r} "
                          "cannot be represented: expected [rows, cols]")
    return tuple(block)


def check_hf(hf_dir: str, *, config: ModelConfig | None = None,
             skip_unused: bool = False) -> CheckReport:
    """Validate a HF checkpoint directory from its headers only (what `load_hf` checks first)."""
    hf_dir = os.fspath(hf_dir)
    files = SafetensorsDir(hf_dir)
    hf_json = (read_hf_config(hf_dir) if os.path.exists(os.path.join(hf_dir, "config.json"))
               else None)
    ckpt = LogicalCheckpoint(files, fp8_block=_fp8_block(hf_json))
    return _check(ckpt, hf_dir, config, hf_json, skip_unused)


def check_inventory(inventory: Mapping[str, tuple[str, Sequence[int]]], hf_config: dict, *,
                    skip_unused: bool = False, label: str = "inventory") -> CheckReport:
    """Validate a checkpoint known only by its tensor inventory ({name: (safetensors dtype,
    shape)}) and its config.json dict, exactly as `load_hf` validates files: naming scheme,
    every tensor present with its shape, scale grids, no unused tensor (unless skip_unused).
    No array is allocated, so release-sized inventories are cheap to check."""
    files = InventoryFiles(dict(inventory), label)
    ckpt = LogicalCheckpoint(files, fp8_block=_fp8_block(hf_config))
    return _check(ckpt, label, None, dict(hf_config), skip_unused)


# ---------------------------------------------------------------------------------- HF -> ours
class _GroupReader:
    """Builds any block of the leaves of one group, caching the converted layers it last read."""

    def __init__(self, ckpt: LogicalCheckpoint, group: Group):
        self.ckpt, self.g = ckpt, group
        self.cache: dict[tuple, list[np.ndarray]] = {}

    def _layer(self, r: int, experts: slice | None) -> list[np.ndarray]:
        key = (r, None if experts is None else (experts.start, experts.stop))
        if key not in self.cache:
            hf = [self.ckpt.read(n, experts=experts) for n in self.g.hf[r]]
            self.cache[key] = self.g.transform.to_ours(hf)
        return self.cache[key]

    def block(self, k: int, index: tuple, dtype: np.dtype) -> np.ndarray:
        g = self.g
        index = tuple(index)
        stack_sl, rest = (index[0], index[1:]) if g.stacked else (None, index)
        reps = range(len(g.hf))[stack_sl] if g.stacked else [0]
        esl = None
        if g.experts and rest:
            esl = rest[0]
            if esl.step not in (None, 1):
                raise MappingError(f"strided expert slices are not supported ({g.hf_names[0]})")
            rest = (slice(None),) + tuple(rest[1:])
        parts = [self._layer(r, esl)[k] for r in reps]
        arr = np.stack(parts) if g.stacked else parts[0]
        if g.stacked:
            rest = (slice(None),) + tuple(rest)
        return np.asarray(arr[tuple(rest)]).astype(dtype, copy=False)


def leaf_dtypes(ckpt: LogicalCheckpoint, g: Group, dtype: np.dtype | None) -> np.dtype:
    if isinstance(g.transform, HashIds):
        return np.dtype(np.int32)
    if dtype is None:
        srcs = [ckpt.source_dtype(n) for n in g.hf_names]
        dt = np.result_type(*srcs)
        if dt not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
            # e.g. float16 or float64 checkpoints: there is no exact "keep" for these in our
            # model's dtypes, so refuse rather than pick one silently.
            raise ValueError(f"tensor {g.hf_names[0]!r} is stored as {dt}; pass dtype=float32 "
                             "or bfloat16 explicitly")
        return dt
    return np.dtype(np.float32) if g.keep_fp32 else dtype


def _finite(arr: np.ndarray, g: Group, allow: bool) -> np.ndarray:
    """arr unchanged; a CheckpointError naming the tensor if it holds NaN/inf (unless allowed):
    a converted checkpoint must not carry a silently broken weight into training."""
    if allow or not _is_float(arr.dtype):
        return arr
    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr.astype(np.float32, copy=False))))
    if bad:
        raise CheckpointError(f"tensor {g.hf_names[0]!r} holds {bad} non-finite value(s) (NaN or "
                              "inf); refusing to convert it (allow_non_finite=True / "
                              "--allow-non-finite keeps them)")
    return arr


def load_state(hf_dir: str, *, config: ModelConfig | None = None, dtype=None,
               mesh: jax.sharding.Mesh | None = None, rules=None, progress: bool = True,
               skip_unused: bool = False, allow_non_finite: bool = False):
    """Read a HF checkpoint into our state.

    Returns (cfg, graphdef, pure_state) where pure_state is `nnx.to_pure_dict` layout with
    jax.Arrays (sharded by `mesh` + `rules` when given). dtype: float32, bfloat16, or None to keep
    each tensor's checkpoint dtype (FP8/FP4 dequantise to bfloat16). With an explicit bfloat16,
    the tensors transformers keeps in float32 (norms, mHC, sinks, position and router biases)
    stay float32. skip_unused: load a checkpoint that also holds tensors this model does not use
    (listed in a warning, see `validate`); otherwise they are an error. allow_non_finite: keep
    NaN/inf weights; otherwise a tensor holding one is an error naming it.
    """
    dt = _np_dtype(dtype)
    hf_dir = os.fspath(hf_dir)
    files = SafetensorsDir(hf_dir)
    has_json = os.path.exists(os.path.join(hf_dir, "config.json"))
    hf_json = read_hf_config(hf_dir) if has_json else None
    ckpt = LogicalCheckpoint(files, fp8_block=_fp8_block(hf_json))
    cfg = resolve_config(hf_dir, ckpt, config, hf_json)
    groups = build_groups(cfg)
    _, _, flat_vars = abstract_model(cfg)
    validate(ckpt, groups, flat_vars, skip_unused=skip_unused)
    dtypes = {p: leaf_dtypes(ckpt, g, dt) for g in groups for p in g.ours}
    matrix_dts = {dtypes[p] for g in groups
                  if not g.keep_fp32 and not isinstance(g.transform, HashIds) for p in g.ours}
    compute = dt if dt is not None else (np.dtype(ml_dtypes.bfloat16)
                                         if np.dtype(ml_dtypes.bfloat16) in matrix_dts
                                         else np.dtype(np.float32))
    cfg = cfg.replace(dtype=_dtype_name(compute), param_dtype=_dtype_name(compute))
    graphdef, abs_state, flat_vars = abstract_model(cfg)
    shardings = shardings_from_rules(flat_vars, mesh, rules) if mesh is not None else None
    pure: dict = {}
    total = sum(len(g.hf_names) for g in groups)
    with tqdm(total=total, unit="tensor", desc="HF -> sparse_lm",
              disable=not progress or jax.process_index() != 0) as bar:
        for g in groups:
            reader = _GroupReader(ckpt, g)
            for k, path in enumerate(g.ours):
                shape = tuple(flat_vars[path].shape)
                ldt = dtypes[path]
                if shardings is None:
                    arr = jax.device_put(_finite(reader.block(k, (slice(None),) * len(shape), ldt),
                                                 g, allow_non_finite))
                else:
                    arr = jax.make_array_from_callback(
                        shape, shardings[path],
                        lambda idx, k=k, ldt=ldt, g=g: _finite(reader.block(k, idx, ldt), g,
                                                               allow_non_finite))
                if arr.shape != shape:
                    raise MappingError(f"{'.'.join(map(str, path))}: built shape {arr.shape}, "
                                       f"model expects {shape}")
                _set(pure, path, arr)
            bar.update(len(g.hf_names))
    return cfg, graphdef, abs_state, pure


def assemble(graphdef, abs_state, pure: dict):
    """An NNX model from a graphdef, its abstract state and a pure dict of arrays."""
    nnx.replace_by_pure_dict(abs_state, pure)
    return nnx.merge(graphdef, abs_state)


def load_hf(hf_dir: str, dtype=None, mesh: jax.sharding.Mesh | None = None, *, rules=None,
            config: ModelConfig | None = None, progress: bool = True,
            skip_unused: bool = False, allow_non_finite: bool = False):
    """`model, config = load_hf(dir)`: the JAX counterpart of `from_pretrained`.

    hf_dir: a directory with config.json and *.safetensors in any naming scheme of
    `mapping.SCHEMES` (transformers' state-dict names, transformers' save_pretrained names, the
    official release names), plain, FP8 or FP4. dtype: float32, bfloat16 or None (keep the
    checkpoint's dtypes). mesh + rules: place each parameter on
    `NamedSharding(mesh, rules(logical axis names))`. skip_unused, allow_non_finite: see
    `load_state`.
    """
    cfg, graphdef, abs_state, pure = load_state(hf_dir, config=config, dtype=dtype, mesh=mesh,
                                                rules=rules, progress=progress,
                                                skip_unused=skip_unused,
                                                allow_non_finite=allow_non_finite)
    return assemble(graphdef, abs_state, pure), cfg


# ---------------------------------------------------------------------------------- ours -> HF
def _is_float(dt: np.dtype) -> bool:
    return np.issubdtype(dt, np.floating) or dt == np.dtype(ml_dtypes.bfloat16)


def state_to_hf(pure: Mapping | Callable[[list[tuple]], list], cfg: ModelConfig, *,
                scheme: str = "transformers", dtype=None,
                on_group: Callable[[Group], None] | None = None):
    """Yield (HF name, NumPy array) for every tensor of the model, group by group.

    pure: our state as a pure dict, or a function mapping a list of leaf paths to their arrays
    (e.g. `CheckpointLeaves`, which reads them from a checkpoint group by group).
    scheme "transformers" writes transformers names (MTP as `mtp.0.*`, which transformers ignores
    on load); "official" writes the official names with per-expert w1/w2/w3. dtype: float32,
    bfloat16 or None (keep our dtypes); tensors transformers keeps in fp32 stay fp32.
    """
    if scheme not in ("transformers", "official"):
        raise ValueError(f"scheme={scheme!r} is invalid: allowed values 'transformers', 'official'")
    dt = _np_dtype(dtype)
    fetch = pure if callable(pure) else (lambda paths: [_get(pure, p) for p in paths])
    for g in build_groups(cfg):
        ours = [np.asarray(jax.device_get(a)) for a in fetch(list(g.ours))]
        for r, names in enumerate(g.hf):
            layer = [a[r] for a in ours] if g.stacked else ours
            for name, arr in zip(names, g.transform.to_hf(layer)):
                if dt is not None and _is_float(arr.dtype):
                    arr = arr.astype(np.float32 if g.keep_fp32 else dt)
                if scheme == "transformers":
                    yield name, arr
                elif isinstance(g.transform, (ExpertsGateUp, ExpertsDown)):
                    half = arr.shape[1] // 2
                    for e, part, oname in official_expert_names(name, arr.shape[0]):
                        yield oname, {"w1": arr[e, :half], "w3": arr[e, half:], "w2": arr[e]}[part]
                else:
                    yield logical_to_official(name), arr
        if on_group is not None:
            on_group(g)


def exported_mtp_layers(cfg: ModelConfig, *, drop_mtp: bool = False,
                        declared_mtp: int | None = None) -> int:
    """`num_nextn_predict_layers` of an export of the model `cfg`.

    A model with MTP writes its MTP weights and says so (cfg.mtp_depth), unless drop_mtp (no
    MTP tensors, 0). A model without MTP weights that came from a checkpoint declaring MTP layers
    it did not carry (transformers drops the MTP weights, and its own save_pretrained keeps
    `num_nextn_predict_layers: 1`) keeps that declaration (`declared_mtp`), unless drop_mtp.
    """
    if drop_mtp:
        return 0
    if cfg.mtp_depth:
        return cfg.mtp_depth
    return int(declared_mtp or 0)


def write_hf(pure: Mapping | Callable[[list[tuple]], list], cfg: ModelConfig, out_dir: str, *,
             scheme: str = "transformers", dtype=None, max_shard_bytes: int = 5 * 2**30,
             progress: bool = True, drop_mtp: bool = False,
             declared_mtp: int | None = None) -> list[str]:
    """Write config.json + safetensors shards (+ index) into the existing directory out_dir.

    MTP weights are written when the model has them and config.json then says
    `num_nextn_predict_layers: cfg.mtp_depth`; `drop_mtp=True` leaves them out and writes 0.
    `declared_mtp`: see `exported_mtp_layers` (a model loaded from a transformers checkpoint).
    """
    n_mtp = exported_mtp_layers(cfg, drop_mtp=drop_mtp, declared_mtp=declared_mtp)
    if drop_mtp and cfg.mtp_depth:
        cfg = cfg.replace(mtp_depth=0)      # the same groups, minus the MTP ones
    writer = ShardedWriter(out_dir, max_shard_bytes)
    groups = build_groups(cfg)
    total = sum(len(g.hf_names) for g in groups)
    with tqdm(total=total, unit="tensor", desc="sparse_lm -> HF", disable=not progress) as bar:
        for name, arr in state_to_hf(pure, cfg, scheme=scheme, dtype=dtype,
                                     on_group=lambda g: bar.update(len(g.hf_names))):
            writer.add(name, arr)
    files = writer.close()
    hf_cfg = to_hf_config(cfg)
    hf_cfg["num_nextn_predict_layers"] = n_mtp
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    return files


# --------------------------------------------------------------------------- our checkpoints
def partial_path(out: str) -> str:
    """The temporary sibling directory a checkpoint is written into before the final rename."""
    out = os.path.abspath(os.fspath(out))
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")


def _sync(tag: str) -> None:
    """Barrier across processes (multi-host); a no-op in a single process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(tag)


def atomic_directory(out: str, write: Callable[[str], None]) -> None:
    """Create directory `out` by writing into a temporary sibling and renaming it at the end.

    `out` must not exist. On any error the temporary directory is removed and `out` is untouched.
    With several processes (a shared file system), all of them call this and `write` (orbax saves
    are collective); only process 0 creates, renames and cleans up the directory.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} already exists; remove it or choose another path")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the parent directory of --out ({parent}) does not exist")
    tmp = partial_path(out)
    primary = jax.process_index() == 0
    if primary:
        if os.path.exists(tmp):          # left over from an interrupted run of this tool
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _sync("sparse_lm.convert:partial-created")
    try:
        write(tmp)
        _sync("sparse_lm.convert:written")
        if primary:
            os.replace(tmp, out)
        _sync("sparse_lm.convert:renamed")
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(out: str, pure: Mapping, cfg: ModelConfig, source: Mapping | None = None):
    """Write our checkpoint format (see module docstring) atomically at `out`."""

    def write(tmp):
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, MODEL_ITEM), pure)
        ckptr.wait_until_finished()
        ckptr.close()
        if jax.process_index() == 0:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump({"format": FORMAT, "model_config": cfg.to_dict(),
                           "source": dict(source or {})}, f, indent=2)
    atomic_directory(out, write)


def read_checkpoint_config(path: str) -> ModelConfig:
    p = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} does not exist: {path} is not a sparse_lm.convert checkpoint")
    with open(p) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{p}: format {meta.get('format')!r} is not {FORMAT!r}")
    return ModelConfig.from_dict(meta["model_config"])


def restore_checkpoint(path: str, *, mesh: jax.sharding.Mesh | None = None, rules=None):
    """(model, cfg) from our checkpoint format, each array in its stored dtype (sharded by
    mesh + rules when given)."""
    path = os.path.abspath(os.fspath(path))
    cfg = read_checkpoint_config(path)
    graphdef, abs_state, flat_vars = abstract_model(cfg)
    ckptr = ocp.StandardCheckpointer()
    stored = ckptr.metadata(os.path.join(path, MODEL_ITEM)).item_metadata
    shardings = shardings_from_rules(flat_vars, mesh, rules) if mesh is not None else None
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target: dict = {}
    for p in flat_vars:
        m = _get(stored, p)
        sh = shardings[p] if shardings is not None else single
        _set(target, p, jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sh))
    pure = ckptr.restore(os.path.join(path, MODEL_ITEM), target)
    ckptr.close()
    return assemble(graphdef, abs_state, pure), cfg


class CheckpointLeaves:
    """`leaves(paths) -> arrays`: reads only those leaves of one of our checkpoints (an orbax
    partial restore), so an export holds one tensor group in memory at a time."""

    def __init__(self, path: str):
        self.path = os.path.join(os.path.abspath(os.fspath(path)), MODEL_ITEM)
        self.cfg = read_checkpoint_config(path)
        with open(os.path.join(os.path.abspath(os.fspath(path)), CONFIG_FILE)) as f:
            self.source = json.load(f).get("source") or {}
        self.meta = ocp.StandardCheckpointer().metadata(self.path).item_metadata
        self.ckptr = ocp.PyTreeCheckpointer()
        self.sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def _key(self, path: tuple) -> tuple:
        """The checkpoint's own spelling of a path (orbax metadata keys are strings)."""
        out, node = [], self.meta
        for k in path:
            k = k if k in node else str(k)
            out.append(k)
            node = node[k]
        return tuple(out)

    def __call__(self, paths: list[tuple]) -> list[np.ndarray]:
        item, args = {}, {}
        for p in paths:
            m = _get(self.meta, self._key(p))
            _set(item, self._key(p), jax.ShapeDtypeStruct(tuple(m.shape), m.dtype))
            _set(args, self._key(p), ocp.ArrayRestoreArgs(sharding=self.sharding))
        got = self.ckptr.restore(self.path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
        return [np.asarray(_get(got, self._key(p))) for p in paths]

    def close(self):
        self.ckptr.close()
