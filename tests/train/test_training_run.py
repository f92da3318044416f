"""End-to-end runs of `python -m experiments.train` in subprocesses (tiny model, shared
persistent compilation cache so only the first run compiles):

- a run killed with SIGKILL after a checkpoint and restarted ends with bitwise the same
  parameters, router biases, optimizer state and loss curve as an uninterrupted run;
- (a NaN that stops the run is checked in tests/faults/test_recovery.py, one run for all of it);
- an unknown config key, or a workdir holding another model, is a clear error.

~90 s on an idle 2-core machine (one compile of the train step, ~30 s).
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/train/tiny_train_config.py"


@pytest.fixture(scope="module")
def env(jax_cache_dir):
    return subprocess_env(jax_cache_dir)


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "experiments.train", f"--config={CONFIG}", f"--workdir={workdir}",
            *overrides]


def _run(env, workdir, *overrides, check=True):
    r = subprocess.run(_cmd(workdir, *overrides), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode:
        raise AssertionError(f"train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _losses(workdir):
    recs = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def _state(workdir, step):
    return ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    wd = tmp_path_factory.mktemp("uninterrupted")
    _run(env, wd)
    return wd


def test_sigkill_and_resume_is_bitwise_identical(env, uninterrupted, tmp_path):
    wd = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(wd), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = wd / "metrics.jsonl"
    deadline = time.time() + 300
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        if (wd / "checkpoints" / "4").is_dir() and metrics.exists():
            steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if l.strip()]
            if steps and max(steps) >= 6:
                proc.send_signal(signal.SIGKILL)
                killed_after = max(steps)
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_after is not None and proc.returncode == -signal.SIGKILL, \
        "the run finished before it could be killed mid-training"
    assert killed_after < 16
    r = _run(env, wd)
    assert "[resume] restored step" in r.stdout
    a, b = _state(uninterrupted, 16), _state(wd, 16)
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b and len(leaves_a) > 50
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    la, lb = _losses(uninterrupted), _losses(wd)
    assert sorted(la) == list(range(1, 17)) and la == lb


def test_unknown_config_key_is_an_error(env, tmp_path):
    r = _run(env, tmp_path / "x", "--config.train.no_such_key=1", check=False)
    assert r.returncode != 0 and "no_such_key" in r.stderr


def test_workdir_with_another_model_is_an_error(env, uninterrupted):
    r = _run(env, uninterrupted, "--config.model.hidden_size=48", check=False)
    assert r.returncode != 0
    assert "different model" in r.stderr and "model.hidden_size: 32 (checkpoint) vs 48" in r.stderr
