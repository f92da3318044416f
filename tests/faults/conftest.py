"""Fixtures of the fault-injection suite: the real entry points in subprocesses, a shared
persistent compilation cache (only the first training run compiles), one tiny trained workdir
that every probe copies, and a byte-level snapshot of a workdir to prove nothing changed."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "tests/train/tiny_train_config.py"
# 8 steps, a checkpoint every 4 (steps 4 and 8): the reference, uninterrupted run.
BASE = ("--config.train.steps=8", "--config.train.checkpoint_every=4")


@pytest.fixture(scope="session")
def env(jax_cache_dir):
    e = subprocess_env(jax_cache_dir)
    for k in ("SPARSE_LM_FAULT_KILL_IN_SAVE", "SPARSE_LM_FAULT_EVAL_ERROR"):
        e.pop(k, None)
    return e


def run(env, module, *args, extra_env=None, timeout=600):
    e = dict(env, **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def train(env, workdir, *overrides, extra_env=None):
    return run(env, "experiments.train", f"--config={CONFIG}", f"--workdir={workdir}", *BASE,
               *overrides, extra_env=extra_env)


@pytest.fixture(scope="session")
def base(env, tmp_path_factory):
    """A finished 8-step run (checkpoints 4 and 8); read-only: probes work on copies."""
    wd = tmp_path_factory.mktemp("base") / "run"
    r = train(env, wd)
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


@pytest.fixture
def copy(base, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(base, wd)
    return wd


def snapshot(workdir) -> dict:
    """{relative path: sha256} of every file under workdir (empty when it does not exist)."""
    wd = Path(workdir)
    if not wd.exists():
        return {}
    return {str(p.relative_to(wd)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(wd.rglob("*")) if p.is_file()}


def losses(workdir) -> dict:
    recs = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def one_line_error(r, code=2) -> str:
    """The stderr of a refused run: exactly one line starting with 'error:', no traceback,
    and the exit status `code`. Returns that line."""
    err_lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [l for l in err_lines if l.startswith("error:")]
    assert len(errors) == 1, err_lines
    return errors[0]
