"""`launch_tpu --dry_run`: the launcher's own steps (create, copy, install, start, logs, delete)
run against local workers -- a directory and a process with a CPU device each, coordinated by
jax.distributed on localhost -- with gcloud replaced by tools/launch/gcloud_stub.py, whose
recorded arguments are checked. A 2-host slice trains and then resumes from its checkpoint; two
1-host slices start as a queued resource whose workers join one jax.distributed job.

The model is the tiny training config cut to one layer without MTP: what is tested is the
launch, not the model (tests/train covers that)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.sharding.helpers import ROOT

TRAIN = ("--config=tests/train/tiny_train_config.py --config.model.num_layers=1 "
         "--config.model.mtp_depth=0 --config.train.checkpoint_every=100 "
         "--config.schedule.warmup_steps=1 --config.schedule.decay_steps=1")
NOTHING_TO_DO = "install: .venv is up to date with requirements.txt and setup.py (nothing to do)"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return subprocess_env(tmp_path_factory.mktemp("jax_cache"))   # shared by all the workers


# The commit shipped, fixed before any worker image exists: the image's venv stamp is then newer
# than every file of the archive (a commit made meanwhile by someone else would not be).
REF = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                     check=True).stdout.strip()


def _rehearse(root: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "experiments.launch_tpu", "--dry_run", f"--dry_run_dir={root}",
            "--zone=local", f"--ref={REF}", *flags]


def _launch(env, root: Path, *flags: str) -> str:
    """Run the launcher's rehearsal; its output (the steps, then worker 0's log)."""
    r = subprocess.run(_rehearse(root, *flags),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, "\n".join(out.splitlines()[-40:])
    return out


def _calls(root: Path) -> list[list[str]]:
    return [json.loads(l)["argv"] for l in (root / "gcloud_calls.jsonl").read_text().splitlines()]


def _exit_statuses(homes: list[Path]) -> list[str]:
    """Each worker's run status once all have ended (the logs step waits for worker 0 only)."""
    files = [h / "sparse-lm-train.exit" for h in homes]
    deadline = time.monotonic() + 300        # a guard against a hung worker, not a measurement
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.5)
    return [f.read_text().strip() if f.exists() else "missing" for f in files]


@pytest.mark.slow
def test_two_host_slice_trains_then_resumes_through_the_launch_steps(env, tmp_path):
    root, run = tmp_path / "rehearsal", tmp_path / "run"
    common = ("--name=reh", "--tpu=v5p-16", f"--workdir={run}")
    first = _launch(env, root, *common, f"--train_args={TRAIN} --config.train.steps=2")
    homes = [root / "workers" / "reh" / f"w{i}" for i in range(2)]
    assert first.splitlines().count(NOTHING_TO_DO) == 2                  # both workers, no venv built
    assert "[launch] backend cpu, 2 device(s), 2 process(es) (jax.distributed)" in first
    assert "[done] steps 0->2" in first and "[resume]" not in first
    assert _exit_statuses(homes) == ["0", "0"]
    # each worker ran its own copy of the code
    assert all((h / "sparse-lm" / "experiments" / "train.py").is_file() for h in homes)

    second = _launch(env, root, *common, "--steps=start,logs",
                     f"--train_args={TRAIN} --config.train.steps=3")
    assert f"[resume] restored step 2 from {run / 'checkpoints'}" in second
    assert "[done] steps 2->3" in second and "(resumed from step 2)" in second
    assert _exit_statuses(homes) == ["0", "0"]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("kind") == "train"]
    assert steps == [1, 2, 3]

    _launch(env, root, "--name=reh", "--tpu=v5p-16", "--steps=delete")
    assert not (root / "workers" / "reh").exists()

    calls = _calls(root)
    where = ["reh", "--zone=local"]
    tpu_vm = ["compute", "tpus", "tpu-vm"]
    assert calls[0] == tpu_vm + ["create"] + where + ["--accelerator-type=v5p-16",
                                                      "--version=v2-alpha-tpuv5"]
    assert calls[1][:5] == tpu_vm + ["scp", str(root / "code.tar.gz")]
    assert calls[1][5:] == ["reh:sparse-lm.tar.gz", "--zone=local", "--worker=all"]
    ssh = [c for c in calls if c[3] == "ssh"]
    # copy (unpack), install, start, logs; then start, logs of the resume
    assert [c[4:7] for c in ssh] == [where + ["--worker=all"]] * 3 + [where + ["--worker=0"]] + \
        [where + ["--worker=all"], where + ["--worker=0"]]
    assert all(c[7] == "--command" for c in ssh)
    assert "tar -xzf sparse-lm.tar.gz -C ~/sparse-lm" in ssh[0][8]
    assert "make -q .venv/.installed" in ssh[1][8]
    assert "--config.train.steps=2" in ssh[2][8] and "--distributed=on" in ssh[2][8]
    assert "--config.train.steps=3" in ssh[4][8]
    assert calls[-1] == tpu_vm + ["delete"] + where + ["--quiet"]


def test_two_slices_start_one_jax_job_as_a_queued_resource(env, tmp_path):
    """Two 1-host slices: the workers of both nodes join one jax.distributed job (2 processes,
    numbered slice by slice); the run then refuses its schedule before compiling anything, and
    the logs step ends with the run's exit status (2, a user error)."""
    root = tmp_path / "rehearsal"
    r = subprocess.run(_rehearse(root, "--name=ms", "--tpu=v5p-8", "--num_slices=2",
                                 f"--workdir={tmp_path / 'run'}",
                                 f"--train_args={TRAIN} --config.train.steps=2 "
                                 "--config.schedule.decay_steps=5"),
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 2, "\n".join(lines[-40:])
    assert lines.count(NOTHING_TO_DO) == 2
    assert not any(l.startswith("create: queued resource") for l in lines)   # ACTIVE at once
    assert any(l.startswith("[launch] backend cpu, 2 device(s), 2 process(es) (jax.distributed)")
               for l in lines)
    assert any(l.startswith("error: schedule.decay_steps=5 is invalid") for l in lines)
    assert lines[-1] == "[launch_tpu] step logs failed with exit code 2"
    assert _exit_statuses([root / "workers" / f"ms-{k}" / "w0" for k in range(2)]) == ["2", "2"]
    _launch(env, root, "--name=ms", "--tpu=v5p-8", "--num_slices=2", "--steps=delete")

    calls = _calls(root)
    qr = ["compute", "tpus", "queued-resources"]
    assert calls[0] == qr + ["create", "ms", "--zone=local", "--accelerator-type=v5p-8",
                             "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
                             "--node-prefix=ms"]
    assert calls[1] == qr + ["describe", "ms", "--zone=local", "--format=value(state.state)"]
    fan_out = [c for c in calls if c[3] in ("scp", "ssh")]
    assert [c[-4:-2] if c[3] == "ssh" else c[-2:] for c in fan_out] == \
        [["--node=all", "--worker=all"]] * 4 + [["--node=0", "--worker=0"]]
    assert calls[-1] == qr + ["delete", "ms", "--zone=local", "--force", "--quiet"]
    assert not any((root / "workers").iterdir())
