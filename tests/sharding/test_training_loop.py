"""The training loop with `config.sharding` set: the run records the resolved preset, and a run
resumed under another preset (another mesh) continues from the checkpoint."""
from __future__ import annotations

import math

import pytest

from tests.sharding.helpers import run_worker


@pytest.mark.slow
def test_loop_with_presets_and_resume_onto_another_mesh(tmp_path):
    r = run_worker("train_loop", {"workdir": str(tmp_path / "run")}, timeout=1800)
    a, b = r["fsdp"], r["fsdp_tp:tensor=2"]
    assert a["resumed_from"] is None and b["resumed_from"] == 4
    assert a["sharding"]["name"] == "fsdp" and a["sharding"]["mesh"]["fsdp"] == 8
    assert b["sharding"]["mesh"]["tensor"] == 2 and b["sharding"]["rules"]["heads"] == ["tensor", "fsdp"]
    assert math.isfinite(a["last_loss"]) and math.isfinite(b["last_loss"])
