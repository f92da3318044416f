"""Two processes over loopback (`jax.distributed`, gloo CPU collectives): train a few steps with
one preset, save with orbax, restore onto another mesh and preset with identical values."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from tests.sharding.helpers import ROOT, worker_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_train_save_restore_onto_another_mesh(tmp_path):
    port, n = _free_port(), 2
    env = worker_env(devices=2)
    # The worker sets jax_num_cpu_devices itself: no device-count flag, the others kept.
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    procs, outs = [], []
    for pid in range(n):
        out = tmp_path / f"p{pid}.json"
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.sharding.dist_worker", str(pid), str(n), str(port),
             str(tmp_path / "run"), str(out)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        assert p.returncode == 0, "\n".join(log.splitlines()[-40:])
    res = [json.loads(o.read_text()) for o in outs]
    for r in res:
        assert r["processes"] == 2 and r["devices"] == 4 and r["local_devices"] == 2
        assert r["mesh_a"]["fsdp"] == 4 and r["mesh_b"] == dict(data=1, fsdp=2, tensor=2, expert=1,
                                                                context=1)
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["restored_in_b_layout"] and r["layouts_differ"] > 0
        assert r["param_max_abs_diff"] == 0.0 and r["opt_max_abs_diff"] == 0.0
        assert r["step_restored"] == 3
    # Both processes trained the same global model.
    assert res[0]["losses"] == res[1]["losses"]
    assert res[0]["param_checksum"] == res[1]["param_checksum"]
