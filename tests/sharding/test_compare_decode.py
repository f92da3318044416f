"""compare_sharding's decode rows: a step of the sharded Decoder compiled for a TPU topology
(libtpu on this CPU host): weights and cache per device follow the preset's layout, the step
reads the cache, and the table and JSON carry the rows."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx

from sparse_lm.inference import cache_bytes, init_cache
from sparse_lm.model import build_model
from tests.conftest import tiny_config
from tests.sharding.helpers import ROOT, has_libtpu, worker_env

CONTEXT = 4096


@pytest.mark.skipif(not has_libtpu(), reason="libtpu not installed: TPU AOT compilation unavailable")
def test_decode_rows_report_weights_and_cache_per_device(tmp_path):
    cmd = [sys.executable, "-m", "experiments.compare_sharding", f"--out={tmp_path}",
           "--config=configs/tiny.py", "--config.model.num_layers=3",
           "--config.model.num_hash_layers=1", "--presets=fsdp,fsdp_tp", "--topology=v5e:2x2",
           "--notrain", "--decode_batch=1,4", f"--decode_context={CONTEXT}"]
    p = subprocess.run(cmd, cwd=ROOT, env=worker_env(1), capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = {(r["preset"], r["batch"]): r
            for r in json.loads((tmp_path / "compare.json").read_text())["rows"]}
    assert set(rows) == {("fsdp", 1), ("fsdp", 4), ("fsdp_tp", 1), ("fsdp_tp", 4)}
    cfg = tiny_config(num_layers=3, num_hash_layers=1)
    one_row = (sum(d["state"] + d["entries"] for d in cache_bytes(
        cfg, jax.eval_shape(lambda: init_cache(cfg, 1, CONTEXT))).values()) + 4) / 1e9  # + lengths
    for r in rows.values():
        assert r["kind"] == "decode" and r["status"] == "ok" and r["fits"], r
        assert r["params_gb"] > 0 and r["est_step_s"] > 0 and r["est_tokens_per_s"] > 0
        assert r["bytes_hbm"] >= r["cache_gb"] * 1e9        # the step reads the whole cache
    # fsdp (fsdp=4): batch 4 splits over the 4 devices, batch 1 is replicated -> same bytes
    assert rows[("fsdp", 4)]["cache_gb"] == pytest.approx(rows[("fsdp", 1)]["cache_gb"])
    # fsdp_tp (tensor=4, batch axes of size 1): every device holds every row's cache
    assert rows[("fsdp_tp", 1)]["cache_gb"] == pytest.approx(one_row, rel=1e-9)
    assert rows[("fsdp_tp", 4)]["cache_gb"] == pytest.approx(4 * one_row, rel=1e-9)
    # weights do not depend on the batch; split over the 4 devices they are < 1/2 of the model
    model_gb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        nnx.split(nnx.eval_shape(lambda: build_model(cfg)))[1])) / 1e9
    for preset in ("fsdp", "fsdp_tp"):
        assert rows[(preset, 4)]["params_gb"] == rows[(preset, 1)]["params_gb"]
        assert rows[(preset, 1)]["params_gb"] < 0.5 * model_gb
    assert f"cache of {CONTEXT} tokens" in p.stdout and "weights GB" in p.stdout
    assert "fsdp @ v5e:2x2 batch 4: fits" in p.stdout


def test_notrain_without_decode_rows_is_an_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "experiments.compare_sharding", f"--out={tmp_path}",
                        "--config=configs/tiny.py", "--presets=fsdp", "--topology=v5e:2x2",
                        "--notrain"], cwd=ROOT, env=worker_env(1), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2 and "--notrain without --decode_batch" in p.stderr, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "experiments.compare_sharding", f"--out={tmp_path}",
                        "--config=configs/tiny.py", "--presets=fsdp", "--topology=v5e:2x2",
                        "--decode_batch=1,x"], cwd=ROOT, env=worker_env(1), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 2 and "--decode_batch='1,x' is invalid" in p.stderr, p.stderr[-2000:]


def test_state_only_decode_rows_need_no_compile(tmp_path):
    """--nodecode_compile: the same weights and cache per device, from the shardings alone."""
    p = subprocess.run([sys.executable, "-m", "experiments.compare_sharding", f"--out={tmp_path}",
                        "--config=configs/tiny.py", "--config.model.num_layers=3",
                        "--config.model.num_hash_layers=1", "--presets=fsdp_tp",
                        "--topology=v5e:2x2", "--notrain", "--decode_batch=4",
                        f"--decode_context={CONTEXT}", "--nodecode_compile"], cwd=ROOT,
                       env=worker_env(1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    (row,) = json.loads((tmp_path / "compare.json").read_text())["rows"]
    cfg = tiny_config(num_layers=3, num_hash_layers=1)
    one_row = (sum(d["state"] + d["entries"] for d in cache_bytes(
        cfg, jax.eval_shape(lambda: init_cache(cfg, 1, CONTEXT))).values()) + 4) / 1e9
    assert row["status"] == "state only" and row["state_fits"] and "compile_s" not in row
    assert row["cache_gb"] == pytest.approx(4 * one_row, rel=1e-9)
    assert "not compiled" in row["reason"]
