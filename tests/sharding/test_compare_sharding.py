"""experiments/compare_sharding end to end on a small TPU topology (libtpu on this CPU host):
one row per preset with memory, loop-corrected FLOPs, collectives and a step estimate; an
invalid preset becomes a row, an unknown topology an error listing the valid names; CSV, JSON
and PNG are written."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.sharding.helpers import ROOT, has_libtpu, worker_env


def _run(args, tmp_path, timeout=1800):
    cmd = [sys.executable, "-m", "experiments.compare_sharding", f"--out={tmp_path}"] + args
    return subprocess.run(cmd, cwd=ROOT, env=worker_env(1), capture_output=True, text=True,
                          timeout=timeout)


def test_unknown_topology_is_an_error_listing_valid_names(tmp_path):
    p = _run(["--config=configs/tiny.py", "--presets=fsdp", "--topology=v5p-100"], tmp_path)
    assert p.returncode == 2
    assert "unknown TPU topology 'v5p-100'" in p.stderr and "v5p-128" in p.stderr


@pytest.mark.slow
@pytest.mark.skipif(not has_libtpu(), reason="libtpu not installed: TPU AOT compilation unavailable")
def test_compare_small_model_on_v5e_2x2(tmp_path):
    p = _run(["--config=configs/tiny.py", "--config.model.num_layers=3",
              "--config.model.num_hash_layers=1", "--presets=fsdp,fsdp_ep:expert=4,fsdp_tp:tensor=3",
              "--topology=v5e:2x2", "--seq_len=64", "--batch_per_device=2", "--optimizer=adamw"],
             tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = {r["preset"]: r for r in json.loads((tmp_path / "compare.json").read_text())["rows"]}
    for name in ("fsdp", "fsdp_ep:expert=4"):
        r = rows[name]
        assert r["status"] == "ok" and r["fits"], r
        assert 0 < r["peak_gb"] <= r["hbm_gb"]
        assert r["params_gb"] > 0 and r["opt_gb"] > 0
        assert r["unknown_loops"] == 0
        assert r["flops"] >= r["flops_raw"] > 0          # loop bodies (Sinkhorn) counted trip times
        assert r["est_step_s"] >= max(r["t_compute_s"], r["t_ici_s"]) > 0
    assert "all-gather" in rows["fsdp"]["collectives"]
    assert rows["fsdp_ep:expert=4"]["moe_dispatch"] == "ragged_a2a"
    assert "ragged-all-to-all" in rows["fsdp_ep:expert=4"]["collectives"]
    bad = rows["fsdp_tp:tensor=3"]
    assert bad["status"] == "invalid" and "divisors [1, 2, 4]" in bad["reason"]
    with open(tmp_path / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["preset"] for t in table] == list(rows)
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert "est step s" in p.stdout


def test_expected_flops_count_the_expert_receive_buffer():
    """Under EP the routed-expert matmuls run on the whole receive buffer: the compiled count
    to expect grows by (buffer rows / routed rows - 1) x 4 passes (forward, two backward, one
    remat forward) of the routed-expert FLOPs; without EP it is the analytic count."""
    from sparse_lm.config import ModelConfig
    from sparse_lm.aot.compare import analytic_flops
    from tests.conftest import tiny_config
    base = tiny_config(remat="full").to_dict()
    local = analytic_flops(ModelConfig.from_dict(base), 64, True, tokens_per_device=128, n_ep=4)
    assert local["expert_buffer_factor"] == 1.0
    assert local["expected_compiled_per_token"] == local["expected_per_token"]
    for cf, factor in ((1.25, 1.25), (0.0, 4.0)):
        cfg = ModelConfig.from_dict(dict(base, moe_dispatch="ragged_a2a", moe_capacity_factor=cf))
        a = analytic_flops(cfg, 64, True, tokens_per_device=128, n_ep=4)
        assert a["expert_buffer_factor"] == factor
        assert a["expected_compiled_per_token"] == pytest.approx(
            a["expected_per_token"] + (factor - 1) * 4 * a["routed_forward_per_token"])
        assert a["routed_forward_per_token"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not has_libtpu(), reason="libtpu not installed: TPU AOT compilation unavailable")
def test_ragged_all_to_all_on_limited_ici_routing_is_an_unsupported_row(tmp_path):
    """v5e 8x8 has limited ICI routing, where the TPU compiler has no ragged all-to-all: the row
    says so and names the dispatcher that works, instead of an opaque compiler error."""
    p = _run(["--config=configs/tiny.py", "--config.model.num_layers=3",
              "--config.model.num_hash_layers=1", "--presets=fsdp_ep", "--topology=v5e:8x8",
              "--seq_len=64", "--batch_per_device=1", "--optimizer=adamw"], tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    row = json.loads((tmp_path / "compare.json").read_text())["rows"][0]
    assert row["status"] == "unsupported", row
    assert "fsdp_ep:moe_dispatch=a2a_padded" in row["reason"]


def test_attention_paths_are_rows_side_by_side_and_bad_names_are_refused():
    from sparse_lm.aot.compare import attention_variants
    from tests.conftest import tiny_config
    cfg = tiny_config()
    assert [c.attention_impl for c in attention_variants("xla, pallas,auto", cfg)] == [
        "xla", "pallas_tpu", None]
    assert attention_variants("", cfg) == [cfg]
    with pytest.raises(ValueError, match=r"unknown path\(s\) \['triton'\]: allowed values "
                                         r"\['auto', 'pallas', 'xla'\]"):
        attention_variants("xla,triton", cfg)
    with pytest.raises(ValueError, match="names a path twice"):
        attention_variants("xla,xla", cfg)
