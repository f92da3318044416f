"""Which sharding preset fits a TPU slice, and which is fastest, before spending TPU hours.

    python -m experiments.compare_sharding --config=configs/v4_flash.py \
        --presets=dp,fsdp,fsdp_tp,fsdp_ep,ep_as_cp,cp --topology=v5p-128,v6e-256 \
        [--seq_len=4096 --batch_per_device=1 --out=runs/compare_sharding] \
        [--config.model.remat=full --config.model.dtype=bfloat16 --config.model.moe_capacity_factor=1.25]

For every preset x topology the full train step (forward, backward, optimizer update) is
compiled ahead of time with libtpu on this CPU host (no TPU needed) for the topology's devices,
and a table reports per device: parameter / optimizer / activation memory and the compiler's
peak against HBM, compiled FLOPs (loop trip counts included) against the analytic count,
collectives by kind, and an analytic step-time estimate. Also written: <out>/compare.csv,
<out>/compare.json and <out>/compare.png. `--measured=FILE` (JSON list of {preset, topology,
step_time_s}) merges step times measured on hardware into the table. `--decode_batch=1,32
[--decode_context=131072]` adds decode rows: a step of the sharded Decoder per preset x topology
x batch, with weights and cache per device, the compiler's peak and a step estimate
(`--notrain` for those alone). `--attention=xla,pallas` compiles every row once per attention
path (the XLA math; the TPU kernels inside `shard_map`); each row says its path and counts the
kernel calls in its compiled HLO, and a train row lists any buffer shaped like the indexer's
[B, S, N] scores (`index_score_shapes`).

Presets take overrides after a colon (`fsdp_ep:expert=16`); topologies are Cloud TPU names
(`v5p-128`, `v6e-256`, `v5e-8`; `x2` for two slices) or topology strings (`v5e:2x2`).
The compute dtype, remat policy and expert-parallel capacity factor are the model config's fields
(configs/v4_flash.py and v4_pro.py: bf16 compute, fp32 parameters, full remat); presets may
override the capacity factor. How to read the table: docs/sharding.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import logging as std_logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402,F401  (after the environment above is set)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from sparse_lm.aot import compare  # noqa: E402
from sparse_lm.aot.topology import resolve_topology  # noqa: E402
from sparse_lm.config import ModelConfig  # noqa: E402
from sparse_lm.sharding.mesh import ShardingError  # noqa: E402
from sparse_lm.sharding.presets import load_preset  # noqa: E402
from sparse_lm.train.config_check import main_guard, UserError, run_main  # noqa: E402

if __name__ == "__main__":      # before the flags: config_flags applies the overrides to a
    main_guard(default_config="configs/v4_flash.py")   # default config file when the flag is defined

_CONFIG = config_flags.DEFINE_config_file("config", "configs/v4_flash.py",
                                          "Model config file (get_config() with a `model` field).")
_PRESETS = flags.DEFINE_string("presets", "dp,fsdp,fsdp_tp,fsdp_ep,ep_as_cp,cp",
                               "Comma-separated sharding presets (name[:overrides]).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-128,v6e-256", "Comma-separated TPU topologies.")
_SEQ = flags.DEFINE_integer("seq_len", 4096, "Training sequence length.")
_BPD = flags.DEFINE_float("batch_per_device", 1.0, "Rows of seq_len per device (global batch = "
                          "this x devices).")
_OPT = flags.DEFINE_enum("optimizer", "report", ["report", "adamw"],
                         "report = Muon + AdamW of sparse_lm.train.optimizer; adamw = optax.adamw.")
_DENSE = flags.DEFINE_bool("dense", False, "Compile the indexer warm-up stage (CSA dense).")
_ATTENTION = flags.DEFINE_string(
    "attention", "", "Comma-separated attention paths to compile side by side: xla (the XLA "
    "math), pallas (the TPU kernels inside shard_map; under presets that split the sequence "
    "at each shard's query offset), auto (the target's preference: kernels where per-device "
    "tiles fit). Empty: the config's model.attention_impl. Each row says its path and counts "
    "its kernel calls.")
_OUT = flags.DEFINE_string("out", "runs/compare_sharding", "Output directory.")
_MEASURED = flags.DEFINE_string("measured", "", "JSON file of measured step times to merge.")
_KEEP_HLO = flags.DEFINE_bool("keep_hlo", False, "Also write each compiled HLO text to <out>/hlo/.")
_TRAIN = flags.DEFINE_bool("train", True, "Compile the train step of each preset (--notrain: "
                           "decode rows only).")
_DECODE_BATCH = flags.DEFINE_string("decode_batch", "", "Comma-separated decode batch sizes: "
                                    "adds a decode row per preset x topology x batch (a step of "
                                    "the sharded Decoder: weights + cache per device, peak, "
                                    "step estimate). Empty = no decode rows.")
_DECODE_COMPILE = flags.DEFINE_bool("decode_compile", True, "Compile the decode rows "
                                    "(--nodecode_compile: weights + cache per device from the "
                                    "shardings only, no compile; status 'state only').")
_DECODE_CONTEXT = flags.DEFINE_integer("decode_context", 131072, "Context (cache length in "
                                       "tokens) of the decode rows.")


def split_presets(text: str) -> list[str]:
    """'fsdp,fsdp_ep:expert=16,dcn_data=2,cp' -> ['fsdp', 'fsdp_ep:expert=16,dcn_data=2', 'cp']
    (a comma-separated item with '=' but no ':' continues the previous preset's overrides)."""
    out: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    # Compute dtype, remat and the EP capacity factor are the model config's own fields
    # (configs/v4_flash.py: bf16, full remat; override with --config.model.FIELD=VALUE).
    if "model" not in _CONFIG.value:
        raise app.UsageError("the config has no `model` field (expected get_config() with a "
                             "`model` section of ModelConfig values)")
    cfg = ModelConfig.from_dict(_CONFIG.value.model.to_dict())
    try:
        cfgs = compare.attention_variants(_ATTENTION.value, cfg)
    except ValueError as e:
        raise UserError(f"--attention: {e}") from None
    presets = split_presets(_PRESETS.value)
    if not presets:
        raise UserError(f"--presets={_PRESETS.value!r} is empty: give comma-separated presets")
    if _SEQ.value < 1:
        raise UserError(f"--seq_len={_SEQ.value} is invalid: must be >= 1")
    if not _BPD.value > 0:
        raise UserError(f"--batch_per_device={_BPD.value} is invalid: must be > 0")
    try:
        decode_batches = [int(b) for b in _DECODE_BATCH.value.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--decode_batch={_DECODE_BATCH.value!r} is invalid: give comma-separated "
                        "integers >= 1, e.g. 1,32") from None
    if any(b < 1 for b in decode_batches):
        raise UserError(f"--decode_batch={_DECODE_BATCH.value!r} is invalid: batch sizes must be >= 1")
    if _DECODE_CONTEXT.value < 1:
        raise UserError(f"--decode_context={_DECODE_CONTEXT.value} is invalid: must be >= 1")
    if not _TRAIN.value and not decode_batches:
        raise UserError("--notrain without --decode_batch leaves nothing to compile")
    measured = None
    if _MEASURED.value:             # read before hours of compilation, not after
        mp = Path(_MEASURED.value)
        if not mp.is_file():
            raise UserError(f"--measured={mp}: no such file (a JSON list of {{preset, topology, "
                            f"step_time_s}})")
        try:
            measured = json.loads(mp.read_text())
        except ValueError as e:
            raise UserError(f"--measured={mp}: not valid JSON ({e})") from None
        if not isinstance(measured, list):
            raise UserError(f"--measured={mp}: expected a JSON list of {{preset, topology, "
                            f"step_time_s}}, got {type(measured).__name__}")
    try:
        for p in presets:
            load_preset(p)
        topos = [resolve_topology(t) for t in _TOPOLOGY.value.split(",") if t.strip()]
    except ShardingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not topos:
        raise UserError(f"--topology={_TOPOLOGY.value!r} is empty: give comma-separated topologies")
    opts = compare.Options(seq_len=_SEQ.value, batch_per_device=_BPD.value, optimizer=_OPT.value,
                           sparse=not _DENSE.value,
                           keep_hlo=str(Path(_OUT.value) / "hlo") if _KEEP_HLO.value else "")
    std_logging.getLogger(__name__).info(
        f"[compare_sharding] model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.n_routed_experts} experts; seq_len {opts.seq_len}, {opts.batch_per_device:g} "
        f"row(s)/device, dtype {cfg.dtype}, remat {cfg.remat}, EP capacity factor "
        f"{cfg.moe_capacity_factor:g} (0 = no drop); optimizer: "
        f"{'Muon + AdamW (sparse_lm.train.optimizer)' if opts.optimizer == 'report' else 'optax.adamw stand-in'}")
    rows = []
    t_start = time.perf_counter()
    jobs = ([(p, t, 0, c) for t in topos for p in presets for c in cfgs] if _TRAIN.value
            else []) + [(p, t, b, c) for t in topos for p in presets for b in decode_batches
                        for c in cfgs]
    bar = tqdm(jobs, desc="compile", dynamic_ncols=True)
    out = Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": cfg.to_dict(), "options": vars(opts), "presets": presets,
            "attention": [c.attention_impl or "auto" for c in cfgs],
            "decode_batch": decode_batches, "decode_context": _DECODE_CONTEXT.value,
            "topologies": [t.name for t in topos], "jax": jax.__version__}

    def save():          # after every row: a long run keeps what it has
        meta["wall_s"] = time.perf_counter() - t_start
        (out / "compare.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1,
                                                     default=str))
        compare.write_csv(rows, out / "compare.csv")

    for p, t, b, c in bar:
        what = f"{p} @ {t.name}" + (f" decode batch {b}" if b else "") + (
            f" [{c.attention_impl or 'auto'}]" if len(cfgs) > 1 else "")
        bar.set_postfix_str(what)
        if b:
            row = compare.analyze_decode(p, t, c, batch=b, context=_DECODE_CONTEXT.value,
                                         sparse=not _DENSE.value, keep_hlo=opts.keep_hlo,
                                         compile=_DECODE_COMPILE.value)
        else:
            row = compare.analyze(p, t, c, opts)
        rows.append(row)
        bar.write(f"  {what}: {row['status']} ({row.get('compile_s', 0):.0f} s) "
                  f"{row.get('reason', '')}")
        save()
    train_rows = [r for r in rows if r.get("kind") != "decode"]
    decode_rows = [r for r in rows if r.get("kind") == "decode"]
    if measured is not None:
        compare.merge_measured(train_rows, measured)
    save()
    if train_rows:
        compare.plot(train_rows, out / "compare.png")
        print()
        print(compare.format_table(train_rows))
    if decode_rows:
        print(f"\ndecode: one token per row, cache of {_DECODE_CONTEXT.value} tokens")
        print(compare.format_table(decode_rows, compare.DECODE_COLUMNS))
    print(f"\n[compare_sharding] {len(rows)} rows in {meta['wall_s']:.0f} s; wrote {out}/compare.csv, "
          f"compare.json, compare.png")


if __name__ == "__main__":
    run_main(main, default_config="configs/v4_flash.py", user_errors=(ShardingError,))
