"""What every benchmark in `experiments/bench_*.py` shares (design.md section 8): the device's
dense bf16 peak, timing a compiled function, the run's provenance, and where the JSON goes.

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

import jax
import jaxlib

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
