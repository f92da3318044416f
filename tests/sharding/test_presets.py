"""Every preset on 8 fake CPU devices gives the loss and gradients of one device (fp32), and its
parameters (and gradients) are laid out as the preset says.

Model: all layer kinds (SWA with hash routing, CSA with the lightning indexer, HCA), score-routed
MoE, MTP, packed documents (tests/sharding/workers.small_config). Loss: the full training
objective (next-token + MTP CE, balance loss, indexer KL). The EP presets run the capacity-padded
all-to-all dispatcher (the ragged one needs TPU/GPU).
"""
from __future__ import annotations

import pytest

from sparse_lm.sharding.presets import PRESETS
from tests.sharding.helpers import run_worker

RUN = [p + (":moe_dispatch=a2a_padded" if p in ("fsdp_ep", "ep_as_cp") else "") for p in PRESETS]


@pytest.fixture(scope="module")
def result():
    return run_worker("presets", {"presets": RUN, "batch": 8, "seq": 32}, timeout=1800)


@pytest.mark.slow
@pytest.mark.parametrize("preset", RUN)
def test_preset_matches_one_device(result, preset):
    r = result["presets"][preset]
    assert r["loss_diff"] <= 1e-5 * abs(result["reference_loss"]), r
    assert r["grad_max_abs_err"] <= 1e-5 * r["grad_scale"], r


@pytest.mark.slow
@pytest.mark.parametrize("preset", RUN)
def test_parameters_are_placed_as_the_preset_says(result, preset):
    r = result["presets"][preset]
    assert not r["misplaced"], r["misplaced"][:5]
    if preset.startswith("dp"):
        assert r["sharded_arrays"] == 0
    else:   # most arrays are split (the rest: sinks and mHC vectors that nothing divides)
        assert r["sharded_arrays"] >= 0.8 * r["arrays"], r


@pytest.mark.slow
def test_ep_presets_used_the_expert_parallel_dispatcher(result):
    assert result["presets"][RUN[PRESETS.index("fsdp_ep")]]["moe_dispatch"] == "a2a_padded"
    assert result["presets"][RUN[PRESETS.index("fsdp_ep")]]["mesh"]["expert"] == 8
