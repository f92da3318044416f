"""The shared benchmark harness: peaks by device kind (most specific match first), timing
excludes compilation and counts every run, provenance is complete, JSON lands where asked."""
import json
import os

import jax.numpy as jnp

from experiments import benchlib


def test_device_peak_matches_most_specific_kind_first():
    assert benchlib.device_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert benchlib.device_peak("TPU v5 lite") == 197e12        # v5e, not v5p's "TPU v5"
    assert benchlib.device_peak("TPU v5p") == 459e12
    assert benchlib.device_peak("cpu") is None


def test_time_compiled_returns_one_positive_time_per_run():
    calls = []

    def fn(x):
        calls.append(1)                                         # traced once, at compile time
        return x * 2

    times = benchlib.time_compiled(fn, (jnp.ones(4),), runs=3, warmup=2)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert len(calls) == 1


def test_run_meta_records_provenance_and_extras():
    meta = benchlib.run_meta(preset="tiny", runs=3)
    for key in ("device_kind", "platform", "jax", "jaxlib", "python", "git_commit", "time",
                "command", "peak_bf16_tflops"):
        assert key in meta
    assert meta["platform"] == "cpu" and meta["peak_bf16_tflops"] is None
    assert meta["preset"] == "tiny" and meta["runs"] == 3


def test_write_result_default_path_explicit_path_and_dash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = {"meta": {"device_kind": "TPU v5 lite"}, "rows": [1]}
    assert benchlib.write_result(result, "-", default_name="x.json") is None
    assert not (tmp_path / "benchmarks").exists()
    path = benchlib.write_result(result, None, default_name=f"m_{benchlib.device_tag(result)}.json")
    assert path == os.path.join("benchmarks", "m_TPU_v5_lite.json")
    assert json.loads((tmp_path / path).read_text()) == result
    sub = tmp_path / "a" / "b.json"
    assert benchlib.write_result(result, str(sub), default_name="x.json") == str(sub)
    assert json.loads(sub.read_text()) == result
