"""experiments/launch_tpu.py builds the gcloud steps for a named TPU type, one slice or several
(nothing is run; tests/sharding/test_launch_rehearsal.py runs them against local workers)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from experiments import launch_tpu
from sparse_lm.sharding.mesh import ShardingError
from tests.conftest import subprocess_env
from tests.sharding.helpers import ROOT


def test_steps_in_order_with_the_runtime_of_the_generation():
    cmds = dict(launch_tpu.tpu_commands("run1", "v6e-256", "us-east1-d", workdir="gs://b/r",
                                        train_args="--config=configs/train_base.py"))
    assert list(cmds) == list(launch_tpu.STEPS)
    create = cmds["create"]
    assert "--accelerator-type=v6e-256" in create and "--version=v2-alpha-tpuv6e" in create
    assert "--worker=all" in cmds["install"] and "make .venv/.installed" in cmds["install"][-1]
    start = cmds["start"]
    assert "--worker=all" in start
    assert "python -m experiments.train --config=configs/train_base.py --workdir=gs://b/r" in start[-1]
    assert "git archive" in cmds["copy"] and "--worker=all" in cmds["copy"]
    assert "--worker=0" in cmds["logs"] and cmds["delete"][-1] == "--quiet"


def test_subset_of_steps_and_bad_input():
    assert [s for s, _ in launch_tpu.tpu_commands("r", "v5p-8", "z", steps=["delete"])] == ["delete"]
    with pytest.raises(ShardingError, match="v5p-128"):
        launch_tpu.tpu_commands("r", "v5p-100", "z")
    with pytest.raises(ShardingError, match="valid steps"):
        launch_tpu.tpu_commands("r", "v5p-8", "z", steps=["boot"])
    with pytest.raises(ShardingError, match="--zone is required"):
        launch_tpu.tpu_commands("r", "v5p-8", "")


def test_gpu_hosts_share_one_coordinator():
    lines = launch_tpu.gpu_lines(["a", "b", "c"], 99, "--config=x.py", "")
    assert all("JAX_COORDINATOR_ADDRESS=a:99 JAX_NUM_PROCESSES=3" in l for l in lines)
    assert [f"JAX_PROCESS_ID={i}" in l for i, l in enumerate(lines)] == [True] * 3


def _train(workdir="gs://b/r", **kw):
    return dict(launch_tpu.tpu_commands("run", kw.pop("tpu", "v5p-128"), "us-east5-a",
                                        workdir=workdir, train_args="--config=configs/train_base.py",
                                        **kw))


def test_multi_slice_is_a_queued_resource_of_one_node_per_slice():
    cmds = _train(num_slices=2, spot=True)
    assert _train(tpu="v5p-128x2") == _train(num_slices=2)      # TYPExN names the same launch
    create = cmds["create"]
    assert create.startswith("gcloud compute tpus queued-resources create run --zone=us-east5-a "
                             "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 "
                             "--node-count=2 --node-prefix=run --spot && ")
    assert "queued-resources describe run" in create and "ACTIVE) break" in create
    for step in ("install", "start"):
        assert cmds[step][:5] == ["gcloud", "compute", "tpus", "queued-resources", "ssh"]
        assert "--node=all" in cmds[step] and "--worker=all" in cmds[step]
    assert "queued-resources scp" in cmds["copy"] and cmds["copy"].count("--node=all") == 2
    # 16 hosts per slice x 2 slices: every process calls jax.distributed.initialize
    assert "--workdir=gs://b/r --distributed=on" in cmds["start"][-1]
    assert "--node=0" in cmds["logs"] and "--worker=0" in cmds["logs"]
    assert cmds["delete"][-2:] == ["--force", "--quiet"]
    # the default fsdp preset puts the slices on the dcn factor of `data`: it fits
    launch_tpu.tpu_commands("r", "v5p-128", "z", num_slices=2, workdir="gs://b/r",
                            train_args="--config.sharding=fsdp")


def test_hosts_and_cloud_names_of_a_slice():
    assert [launch_tpu.resolve_target(t).workers for t in ("v5p-8", "v5p-16", "v6e-8", "v6e-256")] \
        == [1, 2, 1, 64]
    assert launch_tpu.resolve_target("v5e-16", 3).accelerator_type == "v5litepod-16"
    assert launch_tpu.target_from_accelerator_type("v5litepod-16").spec.generation == "v5e"
    single = _train(tpu="v5p-8", workdir="runs/local")           # one host: a local dir is fine
    assert "--distributed=on" not in single["start"][-1]


def test_bad_multi_slice_combinations_name_the_flag():
    with pytest.raises(ShardingError, match=r"--num_slices=0 is invalid.*>= 1"):
        _train(num_slices=0)
    with pytest.raises(ShardingError, match=r"--tpu=v5p-128x2 names 2 slices but --num_slices=3"):
        _train(tpu="v5p-128x2", num_slices=3)
    with pytest.raises(ShardingError, match="not a topology string"):
        _train(tpu="v5p:4x4x4")
    with pytest.raises(ValueError, match=r"--workdir=runs/x: a run over 32 hosts .* gs://"):
        _train(workdir="runs/x", num_slices=2)
    with pytest.raises(ValueError, match="--workdir is required"):
        _train(workdir="")
    # the preset's dcn sizes must fit the slices: fsdp=4 across 2 slices cannot
    with pytest.raises(ShardingError, match=r"--config.sharding=fsdp:dcn_fsdp=4 on "
                                            r"--tpu=v5p-128 x --num_slices=2 \(128 chips\)"):
        launch_tpu.tpu_commands("r", "v5p-128", "z", num_slices=2, workdir="gs://b/r",
                                train_args="--config.sharding=fsdp:dcn_fsdp=4")
    with pytest.raises(ValueError, match=r"--train_args: --config.train.no_such_key"):
        launch_tpu.tpu_commands("r", "v5p-8", "z", workdir="gs://b/r",
                                train_args="--config.train.no_such_key=1")
    # without the start step nothing about the training is checked
    assert [s for s, _ in launch_tpu.tpu_commands("r", "v5p-128", "z", num_slices=2,
                                                  steps=["create"])] == ["create"]
    # a rehearsal's local workers share a run directory only by an absolute path
    with pytest.raises(ValueError, match=r"--workdir=runs/x: the 2 local workers of a --dry_run"):
        _train(tpu="v5p-16", workdir="runs/x", rehearsal=True)


def test_a_rehearsal_too_large_for_this_machine_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.launch_tpu", "--dry_run",
                        f"--dry_run_dir={tmp_path / 'reh'}", "--tpu=v5p-128", "--zone=z"],
                       cwd=ROOT, env=subprocess_env(tmp_path / "cache"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: --dry_run: --tpu=v5p-128 x --num_slices=1 has 16 hosts; a rehearsal starts at "
        "most 8 local workers (e.g. --tpu=v5p-16: 2 hosts)"]
    assert not (tmp_path / "reh").exists()                   # refused before anything was made
