"""What every benchmark in `experiments/bench_*.py` shares (design.md section 8): the command
line (absl flags, as every entry point), the device's dense bf16 peak, timing a compiled
function, the run's provenance, the table header, and where the JSON goes.

    args = parse_flags(argv, define)                        # absl flags -> a namespace
    times = time_compiled(fn, args, runs=20, warmup=3)      # seconds per call, compile excluded
    meta = run_meta(preset="v4_flash", dtype="bfloat16")    # device, versions, git, time, argv
    write_result(result, path=None, default_name="indexer_H100_v4_flash.json")
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import types
from typing import Callable

import jax
import jaxlib
from absl import flags

from sparse_lm import presets
from sparse_lm.config import ModelConfig

# Dense bf16 matmul peaks (FLOP/s) by device-kind substring, most specific first: "TPU v5 lite"
# (v5e) must match before "TPU v5" (v5p).
PEAKS = (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
         ("A100", 312e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
         ("TPU v5", 459e12), ("TPU v6", 918e12), ("TPU v4", 275e12))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_peak(kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a `jax.Device.device_kind`, None when unknown (e.g. CPU)."""
    for key, peak in PEAKS:
        if key.lower() in kind.lower():
            return peak
    return None


def time_compiled(fn, args, runs: int, warmup: int) -> list[float]:
    """Seconds per call of `jax.jit(fn)(*args)`: compiled ahead of time (excluded), `warmup`
    untimed calls, then `runs` calls each ended by block_until_ready."""
    compiled = jax.jit(fn).lower(*args).compile()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return times


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether tracked files differ from it), or (None, None) outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=REPO, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, dirty


def run_meta(**extra) -> dict:
    """Provenance of a benchmark run: device, platform, versions, git state, the device's bf16
    peak (TFLOP/s, None if unknown), UTC time and the command line; `extra` is merged in."""
    dev = jax.devices()[0]
    peak = device_peak(dev.device_kind)
    commit, dirty = git_state()
    meta = {"device": str(dev), "device_kind": dev.device_kind, "platform": jax.default_backend(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "python": platform.python_version(), "git_commit": commit, "git_dirty": dirty,
            "peak_bf16_tflops": None if peak is None else peak / 1e12,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}
    meta.update(extra)
    return meta


def write_result(result: dict, path: str | None, *, default_name: str) -> str | None:
    """Write `result` as JSON to `path`; None = benchmarks/<default_name>, "-" = nowhere.
    Returns the path written (None for "-")."""
    if path is None:
        path = os.path.join("benchmarks", default_name)
    if path == "-":
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return path


def device_tag(result: dict) -> str:
    """The device kind of a result's meta as a file-name part ("NVIDIA_H100_80GB_HBM3")."""
    return result["meta"]["device_kind"].replace(" ", "_").replace("/", "_")


class FlagError(ValueError):
    """A bad benchmark flag; the message names it (the entry point prints it in one line and
    exits with status 2)."""


def parse_flags(argv, define: Callable[[flags.FlagValues], None]) -> types.SimpleNamespace:
    """Parse `argv` (without the program name) against the flags `define(fv)` declares on a
    fresh `absl.flags.FlagValues` (so a benchmark can run twice in one process, and importing
    several never clashes). Returns a namespace whose attributes are the flag names with '-'
    replaced by '_'. absl's own errors (unknown flag, bad value) become FlagError."""
    fv = flags.FlagValues()
    define(fv)
    try:
        fv(["bench"] + list(argv))
    except flags.Error as e:
        raise FlagError(str(e)) from None
    return types.SimpleNamespace(**{name.replace("-", "_"): fv[name].value for name in fv})


def define_common(fv: flags.FlagValues, name: str) -> None:
    """The flags every kernel benchmark has: --preset, --dtype, --runs, --warmup, --json, --tiny
    (`name` is the JSON file's prefix in the help text)."""
    flags.DEFINE_enum("preset", "flash", ["flash", "pro"], "Model shapes.", flag_values=fv)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.",
                      flag_values=fv)
    flags.DEFINE_integer("runs", 20, "Timed calls per arm.", flag_values=fv)
    flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.", flag_values=fv)
    flags.DEFINE_string("json", None, f"Output path (default benchmarks/{name}_<device>_"
                        "<preset>.json; none with --tiny; '-' = none).", flag_values=fv)
    flags.DEFINE_boolean("tiny", False, "Tiny preset shapes, interpreted kernels on CPU (for "
                         "tests).", flag_values=fv)


def int_list(text: str, flag: str) -> list[int]:
    """'64,128' -> [64, 128]; FlagError naming `flag` otherwise."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlagError(f"{flag}={text!r} is invalid: a comma-separated list of integers") from None
    if not vals:
        raise FlagError(f"{flag}={text!r} is invalid: empty")
    return vals


def name_list(text: str, flag: str, allowed) -> list[str]:
    """'a,b' -> ['a', 'b'], each in `allowed`; FlagError naming `flag` otherwise."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise FlagError(f"{flag}={text!r} is invalid: allowed values {tuple(allowed)}")
    return names


def check_runs(runs: int, warmup: int) -> None:
    if runs < 1:
        raise FlagError(f"--runs={runs} is invalid: must be >= 1")
    if warmup < 0:
        raise FlagError(f"--warmup={warmup} is invalid: must be >= 0")


def header(meta: dict, shapes: str) -> str:
    """The first line of every kernel benchmark's table: device, JAX, commit, preset, dtype,
    the shapes, how many runs, and a warning when the kernels were interpreted."""
    return (f"device: {meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, commit "
            f"{(meta['git_commit'] or '?')[:10]}{'+dirty' if meta['git_dirty'] else ''}, preset "
            f"{meta['preset']}, {meta['dtype']}, {shapes}, median of {meta['runs']} runs"
            + (" (interpreted kernels: timings are not performance)" if meta["interpret"] else ""))


def percent_of_peak(row: dict) -> str:
    return "" if row.get("frac_peak") is None else f"{100 * row['frac_peak']:.1f}"


def main_of(parse_args: Callable, run: Callable, format_table: Callable, prefix: str):
    """The `main(argv)` of a kernel benchmark: parse, run, print the table, write the JSON
    (benchmarks/<prefix>_<device>_<preset>.json; none with --tiny unless --json is given).
    A bad flag prints one line and exits with status 2."""
    def main(argv=None) -> dict:
        try:
            a = parse_args(sys.argv[1:] if argv is None else argv)
        except FlagError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        result = run(a)
        print(format_table(result))
        write_result(result, "-" if a.json is None and a.tiny else a.json,
                     default_name=f"{prefix}_{device_tag(result)}_{result['meta']['preset']}.json")
        return result
    return main


BENCH_PRESETS = {"tiny": "tiny", "flash": "v4_flash", "pro": "v4_pro"}


def preset_model(name: str) -> ModelConfig:
    """The ModelConfig of a benchmark preset name ("tiny", "flash", "pro")."""
    if name not in BENCH_PRESETS:
        raise FlagError(f"--preset={name!r} is invalid: allowed values {tuple(BENCH_PRESETS)}")
    return ModelConfig.from_dict(presets.model_preset(BENCH_PRESETS[name]))


def compiled_memory(compiled) -> dict:
    """A compiled function's `memory_analysis()` in bytes, and what it allocates:
    compiled_bytes = argument + output - alias (donated buffers counted once) + temp."""
    m = compiled.memory_analysis()
    out = {f"compiled_{k}_bytes": int(getattr(m, f"{k}_size_in_bytes"))
           for k in ("argument", "output", "alias", "temp", "generated_code")}
    out["compiled_bytes"] = (out["compiled_argument_bytes"] + out["compiled_output_bytes"]
                             - out["compiled_alias_bytes"] + out["compiled_temp_bytes"])
    return out


def over_budget(rows, seq: int, arm: str, budget_s: float) -> dict | None:
    """The skip row of a dense arm of `experiments.bench_train` whose step time at `seq`,
    projected quadratically from its longest shorter measured length, exceeds `budget_s`
    (None: run it, including when no shorter S of that arm was measured)."""
    if arm == "sparse":
        return None
    done = [r for r in rows if r["arm"] == arm and "step_s" in r and r["seq_len"] < seq]
    if not done:
        return None
    base = max(done, key=lambda r: r["seq_len"])
    projected = base["step_s"] * (seq / base["seq_len"]) ** 2
    if projected <= budget_s:
        return None
    return {"seq_len": seq, "arm": arm, "skipped": True,
            "projected_step_s": projected, "projected_from_seq_len": base["seq_len"],
            "reason": f"projected {projected:.0f} s/step = {base['step_s']:.0f} s at "
                      f"S={base['seq_len']} x ({seq}/{base['seq_len']})^2 exceeds "
                      f"--dense_step_budget_s={budget_s:.0f}"}
