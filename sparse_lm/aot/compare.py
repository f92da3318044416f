"""Compare sharding presets on TPU topologies by compiling the train step ahead of time.

For one (preset, topology) `analyze` builds the plan on the topology's abstract devices, lowers
and compiles the full train step (forward, backward, optimizer update, router-bias update) with
libtpu on the CPU host, and reports per device:

  memory   parameters / optimizer state / buffers (from the shardings), the compiler's temp
           (activations, gathered weights, workspace) and peak (`memory_analysis()`); fits if
           peak <= HBM. A `RESOURCE_EXHAUSTED ... hbm` compile error becomes a "does not fit" row
           with the required and available bytes from the compiler's message.
  FLOPs    `cost_analysis()` (loop bodies counted once) and the same corrected for loop trip
           counts (hlo_stats), split forward / backward / other (optimizer); the forward +
           backward matmul FLOPs are checked against the analytic count
           (`accounting.train_flops_per_token`, + one forward per remat recomputation).
  comms    collectives by kind (count and bytes per step, loops counted) and their time on ICI
           and DCN by the rules in `topology.collective_seconds`.
  time     compute (FLOPs / peak), HBM (bytes / bandwidth) and communication estimates; the step
           estimate assumes perfect overlap (the largest of them) and is also given without
           overlap (their sum).
"""
from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
import re
import time
import traceback
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from sparse_lm.analysis import accounting
from sparse_lm.aot import hlo_stats
from sparse_lm.aot.topology import (TopologySpec, collective_seconds, resolve_topology,
                                    topology_devices)
from sparse_lm.config import ModelConfig
from sparse_lm.inference import Decoder
from sparse_lm.model import build_model
from sparse_lm.sharding import partition
from sparse_lm.sharding.expert_parallel import buffer_rows
from sparse_lm.sharding.kernels import length_axes
from sparse_lm.sharding.mesh import ShardingError, describe
from sparse_lm.sharding.presets import load_preset
from sparse_lm.sharding.rules import spec_for
from sparse_lm.train import optimizer as opt_lib
from sparse_lm.train.plan import make_plan
from sparse_lm.train.schedule import Schedule
from sparse_lm.train.steps import LossConfig

GB = 1e9


@dataclasses.dataclass
class Options:
    seq_len: int = 4096
    batch_per_device: float = 1.0      # rows of seq_len per device (global batch = this x devices)
    optimizer: str = "report"          # "report" (Muon + AdamW, sparse_lm.train.optimizer) | "adamw"
    sparse: bool = True
    keep_hlo: str = ""                 # directory to write the compiled HLO text into


ATTENTION_PATHS = {"xla": "xla", "pallas": "pallas_tpu", "auto": None}


def attention_variants(text: str, cfg: ModelConfig) -> list[ModelConfig]:
    """One model config per attention path in a comma-separated list ("xla": the XLA math,
    "pallas": the TPU kernels, "auto": the target's preference); [cfg] for an empty list."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ATTENTION_PATHS]
    if bad:
        raise ValueError(f"{text!r} has unknown path(s) {bad}: allowed values "
                         f"{sorted(ATTENTION_PATHS)}, comma-separated")
    if len(set(names)) != len(names):
        raise ValueError(f"{text!r} names a path twice")
    return [cfg.replace(attention_impl=ATTENTION_PATHS[a]) for a in names] or [cfg]


def make_tx(kind: str, schedule):
    if kind == "report":
        return opt_lib.make_optimizer(opt_lib.OptimizerConfig(), schedule)
    if kind == "adamw":
        return optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-20, weight_decay=0.1)
    raise ValueError(f"optimizer={kind!r} is invalid: allowed values ('report', 'adamw')")


_SIZE = r"\(?([\d.]+)\s*([KMGT]?)i?B?\)?"
_OOM_FORMS = (
    # "CompileTimeHbmOom: ... memory required for HLO temporaries (96.00G) exceeds available HBM (15.75G)"
    re.compile(r"required[^()]*" + _SIZE + r"[^()]*available HBM\s*" + _SIZE, re.I),
    # "Ran out of memory in memory space hbm. Used 150.00G of 95.74G hbm."
    re.compile(r"Used\s+" + _SIZE + r"\s+of\s+" + _SIZE + r"\s+hbm", re.I),
)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_oom(msg: str) -> tuple[float, float] | None:
    """(required, available) bytes from a TPU compile-time HBM OOM message, (nan, nan) for an
    out-of-memory error in another form, None if it is not one."""
    if not re.search(r"RESOURCE_EXHAUSTED|HbmOom|out of memory", msg, re.I):
        return None
    for form in _OOM_FORMS:
        m = form.search(msg)
        if m:
            return (float(m.group(1)) * _UNIT[m.group(2).upper()],
                    float(m.group(3)) * _UNIT[m.group(4).upper()])
    return (float("nan"), float("nan"))


def _tree_bytes(abstract, shardings, sizes) -> float:
    total = 0.0
    for x, s in zip(jax.tree.leaves(abstract),
                    jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))):
        total += partition.shard_bytes(x.shape, x.dtype, s.spec, sizes)
    return total


def analytic_flops(cfg: ModelConfig, seq_len: int, sparse: bool, *, tokens_per_device: float = 0,
                   n_ep: int = 1) -> dict:
    """Analytic training FLOPs per token, and what the compiled step should show per token.

    expected_per_token adds one forward recomputation under remat. expected_compiled_per_token
    also counts the padding the routed-expert matmuls run on under expert parallelism: they
    multiply a device's whole receive buffer (`expert_parallel.buffer_rows`, e.g. 1.25x the
    routed rows at capacity factor 1.25, n_ep x with no drop), and a compiled program cannot
    know how much of it holds rows (the TPU kernel skips the empty tail at run time)."""
    f = accounting.train_flops_per_token(cfg, seq_len, sparse=sparse)
    recompute = {"none": 0.0}.get(cfg.remat, 1.0)       # one forward recomputation under remat
    expected = f.total + recompute * f.forward
    pc = accounting.param_counts(cfg)
    routed = 2.0 * (pc.activated_by_component["routed_experts"]
                    + (pc.mtp_by_component.get("routed_experts", 0) * cfg.num_experts_per_tok
                       / cfg.n_routed_experts if cfg.mtp_depth else 0))
    factor = 1.0
    if cfg.moe_dispatch != "local" and tokens_per_device:
        a = int(tokens_per_device) * cfg.num_experts_per_tok
        factor = buffer_rows(cfg.moe_dispatch, a, n_ep, cfg.moe_capacity_factor) / a
    return {"per_token": f.total, "forward": f.forward, "expected_per_token": expected,
            "routed_forward_per_token": routed, "expert_buffer_factor": factor,
            "expected_compiled_per_token": expected + (factor - 1.0) * (3.0 + recompute) * routed}


def _topology_row(topo: str | TopologySpec, preset_spec: str):
    """(spec, devices, devices per chip, HBM bytes per device, the row's first fields)."""
    spec = resolve_topology(topo) if isinstance(topo, str) else topo
    devices = topology_devices(spec)
    per_chip = len(devices) / (spec.chips * spec.slices)
    hbm = spec.chip.hbm_bytes / per_chip
    row: dict[str, Any] = {"preset": preset_spec, "topology": spec.name, "generation": spec.generation,
                           "topology_str": spec.topology + (f" x{spec.slices}" if spec.slices > 1 else ""),
                           "devices": len(devices), "hbm_gb": hbm / GB}
    return spec, devices, per_chip, hbm, row


def _score_dims(plan, batch: int, seq_len: int) -> tuple[int, int] | None:
    """(query rows per device, CSA entries per row) of the indexer's scores; None without CSA."""
    cfg = plan.model_cfg
    if "csa" not in cfg.layer_kinds or seq_len < cfg.compress_ratio_csa:
        return None
    rows = ("activation_batch", "activation_length")
    axes = length_axes(spec_for(rows, (batch, seq_len), plan.sizes, plan.preset.rules), rows)
    return seq_len // math.prod(plan.sizes[a] for a in axes), seq_len // cfg.compress_ratio_csa


def analyze(preset_spec: str, topo: str | TopologySpec, model_cfg: ModelConfig,
            opts: Options = Options(), schedule=None, loss_cfg=None) -> dict[str, Any]:
    """One row of the comparison (a dict; `status` is ok / does not fit / invalid / error)."""
    spec, devices, per_chip, hbm, row = _topology_row(topo, preset_spec)
    chip, n = spec.chip, len(devices)
    row.update(kind="train", seq_len=opts.seq_len, optimizer=opts.optimizer,
               attention=model_cfg.attention_impl or "auto")
    schedule = schedule or Schedule(peak_lr=1e-3, total_steps=1000)
    loss_cfg = loss_cfg or LossConfig()
    tx = make_tx(opts.optimizer, schedule)
    try:
        preset = load_preset(preset_spec)
        plan = make_plan(preset, model_cfg, tx, devices)
        global_batch = int(round(opts.batch_per_device * n))
        batch = plan.batch_spec_struct(global_batch, opts.seq_len)
    except (ShardingError, ValueError) as e:
        row.update(status="invalid", reason=str(e))
        return row
    cfg = plan.model_cfg
    sizes = plan.sizes
    row.update(mesh=describe(plan.mesh), moe_dispatch=cfg.moe_dispatch, global_batch=global_batch,
               tokens_per_device=global_batch * opts.seq_len / n, remat=cfg.remat, dtype=cfg.dtype)
    abstract = plan.abstract
    row["params_gb"] = _tree_bytes(abstract.params, plan.shardings.params, sizes) / GB
    row["opt_gb"] = _tree_bytes(abstract.opt_state, plan.shardings.opt_state, sizes) / GB
    row["buffers_gb"] = _tree_bytes(abstract.buffers, plan.shardings.buffers, sizes) / GB
    rep = partition.replication_report(abstract.params, sizes, preset.rules)
    row["replicated_frac"] = rep["replicated_fraction"]
    step = plan.train_step(schedule, loss_cfg, sparse=opts.sparse, donate=True)
    compiled = _compile(row, lambda: step.lower(plan.abstract_state(), batch), preset_spec, hbm)
    if compiled is None:
        return row
    hs = _costs(row, compiled, n, opts.keep_hlo, f"{_slug(preset_spec)}__{_slug(spec.name)}__{row['attention']}",
                score_dims=_score_dims(plan, global_batch, opts.seq_len))
    row["flops_forward"] = hs.flops.get("forward", 0.0)
    row["flops_backward"] = hs.flops.get("backward", 0.0)
    row["flops_unattributed"] = hs.flops.get("unattributed", 0.0)
    row["flops_other"] = hs.flops.get("other", 0.0)
    row["unknown_loops"] = len(hs.unknown_loops)
    an = analytic_flops(cfg, opts.seq_len, opts.sparse, tokens_per_device=row["tokens_per_device"],
                        n_ep=sizes.get("expert", 1))
    expected = an["expected_compiled_per_token"] * row["tokens_per_device"]
    row["flops_model_analytic"] = expected
    row["flops_useful"] = an["expected_per_token"] * row["tokens_per_device"]
    row["expert_buffer_factor"] = an["expert_buffer_factor"]
    model = row["flops_forward"] + row["flops_backward"] + row["flops_unattributed"]
    row["flops_ratio"] = model / expected if expected else float("nan")
    _times(row, hs, plan.mesh, chip, per_chip)
    tokens = global_batch * opts.seq_len
    row["est_tokens_per_s"] = tokens / row["est_step_s"] if row["est_step_s"] else float("nan")
    row["est_mfu"] = (an["per_token"] * tokens / row["est_step_s"] / (chip.peak_flops * n / per_chip)
                      if row["est_step_s"] else float("nan"))
    row["reason"] = explain(row)
    return row


def analyze_decode(preset_spec: str, topo: str | TopologySpec, model_cfg: ModelConfig, *,
                   batch: int, context: int, sparse: bool = True, compile: bool = True,
                   keep_hlo: str = "") -> dict[str, Any]:
    """One decode row: a step of the sharded `Decoder` (one new token per row; the cache
    allocated for `context` tokens) compiled for the topology. Per device: the weights the
    decoder holds (the layers once, no MTP block) and the cache (from their shardings), the
    compiler's peak against HBM, FLOPs and HBM bytes of the step and its time estimate.

    The step attends the whole allocated cache whatever its fill (the decode path's cost is flat
    in position today), so the estimate is that of a step at `context`. compile=False stops
    after the shardings: status "state only", weights + cache per device against HBM (a lower
    bound of the peak: no activations or workspace), in seconds instead of a compile.
    """
    spec, devices, per_chip, hbm, row = _topology_row(topo, preset_spec)
    row.update(kind="decode", batch=batch, context=context,
               attention=model_cfg.attention_impl or "auto")
    try:
        preset = load_preset(preset_spec)
        mesh = preset.make_mesh(devices)
        cfg = preset.with_moe_dispatch(model_cfg)
        dec = Decoder(nnx.eval_shape(lambda: build_model(cfg)), sparse=sparse, sharding=preset,
                      mesh=mesh)
        cache = dec.abstract_cache(batch, context)
    except (ShardingError, ValueError) as e:
        row.update(status="invalid", reason=str(e))
        return row
    sizes = dec.layout.sizes

    def per_device(tree):
        return _tree_bytes(tree, jax.tree.map(lambda x: x.sharding, tree), sizes)
    row.update(mesh=describe(mesh), moe_dispatch=cfg.moe_dispatch, dtype=cfg.dtype,
               params_gb=(per_device(dec.params) + per_device(dec.block_params)) / GB,
               cache_gb=per_device(cache) / GB)
    if not compile:
        state = row["params_gb"] + row["cache_gb"]
        row.update(status="state only", state_fits=state <= hbm / GB,
                   reason=(f"weights + cache {state:.1f} GB/device "
                           f"{'<=' if state <= hbm / GB else '>'} {hbm / GB:.1f} GB HBM "
                           f"(not compiled: activations and workspace not counted)"))
        return row
    tokens, n_new = dec.row_struct((batch, 1)), dec.row_struct((batch,))
    compiled = _compile(row, lambda: dec.lower(cache, tokens, n_new, logits="last"), preset_spec,
                        hbm)
    if compiled is None:
        return row
    hs = _costs(row, compiled, len(devices), keep_hlo,
                f"decode__{_slug(preset_spec)}__{_slug(spec.name)}__b{batch}")
    _times(row, hs, mesh, spec.chip, per_chip)
    row["est_tokens_per_s"] = batch / row["est_step_s"] if row["est_step_s"] else float("nan")
    row["reason"] = explain(row)
    return row


def _compile(row: dict, lower, preset_spec: str, hbm: float):
    """lower().compile(), with the compiler's memory analysis in `row`; None (and the row's
    status says why) when it fails: out of HBM, unsupported collectives, any other error."""
    t0 = time.perf_counter()
    try:
        lowered = lower()
        row["lower_s"] = time.perf_counter() - t0
        compiled = lowered.compile()
    except ShardingError as e:   # e.g. a kernel asked for under a preset it cannot run in
        row.update(status="invalid", reason=str(e), compile_s=time.perf_counter() - t0)
        return None
    except Exception as e:       # noqa: BLE001 - every compile failure becomes a row
        msg = str(e)
        row["compile_s"] = time.perf_counter() - t0
        oom = parse_oom(msg)
        if oom is not None:
            row.update(status="does not fit", fits=False, required_gb=oom[0] / GB,
                       available_gb=oom[1] / GB, compiler_message=msg.splitlines()[0][:300])
            row["reason"] = explain(row)
        elif "limited ICI routing" in msg:
            # e.g. v5e 8x8: the TPU has no ragged all-to-all without full ICI routing
            row.update(status="unsupported", reason=(
                "this topology has limited ICI routing, where the TPU compiler does not "
                "implement ragged all-to-all: use moe_dispatch=a2a_padded ('"
                + preset_spec + ("," if ":" in preset_spec else ":") + "moe_dispatch=a2a_padded')"))
        else:
            row.update(status="error", reason=msg.splitlines()[0][:300] if msg else repr(e),
                       traceback=traceback.format_exc()[-2000:])
        return None
    row["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arg, out, alias, temp = (float(getattr(mem, k, 0) or 0) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"))
    peak = float(getattr(mem, "peak_memory_in_bytes", 0) or 0) or (arg + out - alias + temp)
    row.update(status="ok", argument_gb=arg / GB, temp_gb=temp / GB, peak_gb=peak / GB,
               fits=peak <= hbm, required_gb=peak / GB, available_gb=hbm / GB)
    if not row["fits"]:
        row["status"] = "does not fit"
    return compiled


def _costs(row: dict, compiled, n_devices: int, keep_hlo: str, name: str,
           score_dims: tuple[int, int] | None = None):
    """FLOPs and HBM bytes per device of a compiled program (loop trip counts included), its
    Pallas kernel calls (`kernel_calls`: which attention path the row ran) and, with
    score_dims = (query rows per device, CSA entries), the buffers shaped like indexer scores
    [.., S, (H,) N] (`index_score_shapes`) into `row`; returns the HLO statistics."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    row["kernel_calls"] = sum(hlo_stats.kernel_calls(text).values())
    if score_dims is not None:
        row["index_score_shapes"] = hlo_stats.shapes_with_dims(text, score_dims)
    if keep_hlo:
        p = pathlib.Path(keep_hlo)
        p.mkdir(parents=True, exist_ok=True)
        (p / f"{name}.hlo.txt").write_text(text)
    hs = hlo_stats.summarize(text, n_devices)
    del text
    raw_flops = float(cost.get("flops", 0.0))
    raw_bytes = float(cost.get("bytes accessed", 0.0))
    row["flops_raw"] = raw_flops
    row["flops"] = raw_flops + hs.matmul_flops - hs.matmul_flops_once
    row["bytes_hbm"] = raw_bytes + hs.bytes - hs.bytes_once
    return hs


def _times(row: dict, hs, mesh, chip, per_chip: float) -> None:
    """Collectives by kind and the compute / HBM / ICI / DCN time estimates into `row`."""
    t_ici = t_dcn = 0.0
    by_kind: dict[str, dict] = {}
    flat = list(mesh.devices.flat)
    for c in hs.collectives:
        t, link = collective_seconds(c.kind, c.bytes, c.groups[0] if c.groups else None,
                                     c.group_size, flat, chip)
        d = by_kind.setdefault(c.kind, {"count": 0.0, "bytes": 0.0, "seconds": 0.0})
        d["count"] += c.count
        d["bytes"] += c.bytes * c.count
        d["seconds"] += t * c.count
        if link == "dcn":
            t_dcn += t * c.count
        else:
            t_ici += t * c.count
    row["collectives"] = by_kind
    row["comm_gb"] = sum(d["bytes"] for d in by_kind.values()) / GB
    row["t_compute_s"] = row["flops"] / chip.peak_flops * per_chip
    row["t_hbm_s"] = row["bytes_hbm"] / chip.hbm_bw * per_chip
    row["t_ici_s"] = t_ici
    row["t_dcn_s"] = t_dcn
    parts = {"compute": row["t_compute_s"], "hbm": row["t_hbm_s"], "ici": t_ici, "dcn": t_dcn}
    row["bound"] = max(parts, key=parts.get)
    row["est_step_s"] = max(parts.values())
    row["est_step_serial_s"] = max(row["t_compute_s"], row["t_hbm_s"]) + t_ici + t_dcn


def _slug(s: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", s)


def explain(row: dict) -> str:
    """A one-line why for a row, from its numbers."""
    state = (row.get("params_gb", 0) + row.get("opt_gb", 0) + row.get("buffers_gb", 0)
             + row.get("cache_gb", 0))
    what_state = "weights + cache" if row.get("kind") == "decode" else "parameters + optimizer state"
    hbm = row.get("available_gb") or row.get("hbm_gb") or 0
    if row.get("status") == "does not fit":
        need = row.get("required_gb", float("nan"))
        if state > hbm:
            return (f"{what_state} alone are {state:.1f} GB/device "
                    f"(> {hbm:.1f} GB HBM): the preset does not shard them enough")
        what = ("temporaries" if "temporaries" in row.get("compiler_message", "")
                else "the program")
        return (f"state {state:.1f} GB/device fits, but the compiler's {what} need "
                f"{need:.1f} GB of {hbm:.1f} GB: activations, gathered weights, collective "
                f"buffers and workspace")
    if row.get("status") != "ok":
        return row.get("reason", "")
    bound = row.get("bound", "")
    top = max(row.get("collectives", {}).items(), key=lambda kv: kv[1]["seconds"], default=None)
    comm = f"; largest collective: {top[0]} ({top[1]['bytes'] / GB:.1f} GB/step)" if top else ""
    return (f"fits ({row['peak_gb']:.1f} of {hbm:.1f} GB; state {state:.1f} GB); "
            f"{bound}-bound{comm}")


# ----------------------------------------------------------------------------- output
COLUMNS = [("preset", "preset", "{}"), ("topology", "topology", "{}"), ("mesh", "mesh", "{}"),
           ("attention", "attention", "{}"), ("kernel_calls", "kernels", "{}"),
           ("status", "status", "{}"), ("required_gb", "peak/needs GB", "{:.1f}"), ("hbm_gb", "HBM GB", "{:.1f}"),
           ("params_gb", "param GB", "{:.2f}"), ("opt_gb", "opt GB", "{:.2f}"),
           ("temp_gb", "temp GB", "{:.1f}"), ("flops", "TFLOP/dev", "{:.1f}", 1e-12),
           ("flops_ratio", "model/analytic", "{:.2f}"), ("comm_gb", "comm GB", "{:.1f}"),
           ("t_compute_s", "compute s", "{:.2f}"), ("t_ici_s", "ICI s", "{:.2f}"),
           ("t_dcn_s", "DCN s", "{:.2f}"), ("est_step_s", "est step s", "{:.2f}"),
           ("est_mfu", "est MFU", "{:.0%}"), ("measured_step_s", "measured s", "{:.2f}"),
           ("compile_s", "compile s", "{:.0f}")]


DECODE_COLUMNS = [("preset", "preset", "{}"), ("topology", "topology", "{}"), ("mesh", "mesh", "{}"),
                  ("batch", "batch", "{}"), ("context", "context", "{}"),
                  ("attention", "attention", "{}"), ("kernel_calls", "kernels", "{}"),
                  ("status", "status", "{}"), ("required_gb", "peak/needs GB", "{:.1f}"),
                  ("hbm_gb", "HBM GB", "{:.1f}"), ("params_gb", "weights GB", "{:.2f}"),
                  ("cache_gb", "cache GB", "{:.2f}"), ("temp_gb", "temp GB", "{:.2f}"),
                  ("bytes_hbm", "HBM GB/step", "{:.1f}", 1e-9), ("comm_gb", "comm GB", "{:.2f}"),
                  ("est_step_s", "est step ms", "{:.1f}", 1e3),
                  ("est_tokens_per_s", "est tok/s", "{:.0f}"), ("compile_s", "compile s", "{:.0f}")]


def _cell(row, col) -> str:
    key, _, fmt = col[:3]
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if len(col) > 3:
        v = v * col[3]
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def format_table(rows: list[dict], columns=None) -> str:
    """Train rows (COLUMNS, the default) or decode rows (DECODE_COLUMNS) as a text table, one
    line of explanation per row below it."""
    cols = [c for c in (columns or COLUMNS) if any(r.get(c[0]) is not None for r in rows)]
    cells = [[c[1] for c in cols]] + [[_cell(r, c) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) if j > 3 else v.ljust(w) for j, (v, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.extend(f"{r['preset']} @ {r['topology']}"
                 + (f" batch {r['batch']}" if r.get("kind") == "decode" else "")
                 + f": {r.get('reason', '')}" for r in rows)
    return "\n".join(lines)


def write_csv(rows: list[dict], path) -> None:
    keys = []
    for r in rows:
        for k in r:
            if k not in keys and k not in ("collectives", "traceback"):
                keys.append(k)
    kinds = sorted({k for r in rows for k in r.get("collectives", {})})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + [f"{k}_{m}" for k in kinds for m in ("count", "gb", "s")])
        for r in rows:
            c = r.get("collectives", {})
            w.writerow([r.get(k, "") for k in keys]
                       + [x for k in kinds for x in (c.get(k, {}).get("count", ""),
                                                      c.get(k, {}).get("bytes", 0) / GB if k in c else "",
                                                      c.get(k, {}).get("seconds", ""))])


def plot(rows: list[dict], path) -> None:
    """Two panels per topology: peak memory per device against HBM, and the step estimate
    split into compute and communication."""
    import matplotlib          # optional package, needed only for the figure
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    topos = list(dict.fromkeys(r["topology"] for r in rows))
    fig, axes = plt.subplots(2, len(topos), figsize=(5.5 * len(topos), 8), squeeze=False)
    for j, t in enumerate(topos):
        rs = [r for r in rows if r["topology"] == t]
        names = [r["preset"] for r in rs]
        x = np.arange(len(rs))
        ax = axes[0, j]
        need = [r.get("required_gb") or r.get("peak_gb") or 0 for r in rs]
        state = [r.get("params_gb", 0) + r.get("opt_gb", 0) for r in rs]
        ax.bar(x, need, color=["tab:blue" if r.get("fits") else "tab:red" for r in rs],
               label="peak (red: does not fit)")
        ax.bar(x, state, color="none", edgecolor="black", hatch="//", label="params + optimizer")
        hbm = next((r["hbm_gb"] for r in rs if r.get("hbm_gb")), None)
        if hbm:
            ax.axhline(hbm, color="k", ls="--", label=f"HBM {hbm:.0f} GB")
        ax.set_yscale("log")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("GB per device")
        ax.set_title(f"{t}: memory")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        comp = [r.get("t_compute_s", 0) or 0 for r in rs]
        comm = [(r.get("t_ici_s", 0) or 0) + (r.get("t_dcn_s", 0) or 0) for r in rs]
        ax.bar(x - 0.2, comp, 0.4, label="compute")
        ax.bar(x + 0.2, comm, 0.4, label="ICI + DCN")
        for i, r in enumerate(rs):
            if r.get("measured_step_s"):
                ax.plot([i], [r["measured_step_s"]], "k*", ms=10)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("seconds per step (estimate)")
        ax.set_title(f"{t}: step time")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_measured(rows: list[dict], measured: list[dict]) -> None:
    """Add `measured_step_s` from hardware runs ({preset, topology, step_time_s} records)."""
    table = {(m["preset"], m["topology"]): float(m["step_time_s"]) for m in measured}
    for r in rows:
        v = table.get((r["preset"], r["topology"]))
        if v is not None:
            r["measured_step_s"] = v
            if r.get("est_step_s"):
                r["measured_over_estimate"] = v / r["est_step_s"]
