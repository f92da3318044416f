"""Run sharding checks in a fresh Python process with N fake CPU devices.

The device count must be set before JAX initialises, and other test directories import JAX in
the pytest process first, so every multi-device check runs as
`python -m tests.sharding.workers <task> '<json args>'` and returns a JSON result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def worker_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_worker(task: str, args: dict | None = None, *, devices: int = 8, timeout: float = 900,
               module: str = "tests.sharding.workers") -> dict:
    """Run one task of a worker module (default tests/sharding/workers.py) with `devices` fake
    CPU devices; return its RESULT json (fail with its output)."""
    cmd = [sys.executable, "-m", module, task, json.dumps(args or {})]
    p = subprocess.run(cmd, cwd=ROOT, env=worker_env(devices), capture_output=True, text=True,
                       timeout=timeout)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            if p.returncode:
                break
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((p.stdout + "\n" + p.stderr).splitlines()[-60:])
    raise AssertionError(f"worker {task} failed (exit {p.returncode}):\n{tail}")


def has_libtpu() -> bool:
    try:
        import importlib.util
        return importlib.util.find_spec("libtpu") is not None
    except Exception:  # noqa: BLE001
        return False
