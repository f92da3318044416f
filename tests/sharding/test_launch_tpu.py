"""experiments/launch_tpu.py builds the gcloud steps for a named TPU type (nothing is run)."""
from __future__ import annotations

import pytest

from experiments import launch_tpu
from sparse_lm.sharding.mesh import ShardingError


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
