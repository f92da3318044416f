"""Bad input gives an error naming the tensor/field, and nothing is ever left at --out."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_lm.config import ConfigError
from sparse_lm.convert import core
from sparse_lm.convert.hf_to_orbax import convert
from sparse_lm.convert.safetensors_io import CheckpointError, SafetensorsDir, ShardedWriter
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "tests" / "parity_data" / "small_window"


def write_dir(out: Path, tensors: dict, hf_config: dict, max_shard_bytes=200_000):
    os.makedirs(out)
    w = ShardedWriter(str(out), max_shard_bytes)
    for k, v in tensors.items():
        w.add(k, v)
    w.close()
    (out / "config.json").write_text(json.dumps(hf_config))


@pytest.fixture
def parts():
    files = SafetensorsDir(SRC)
    return {n: files.read(n) for n in sorted(files.names())}, json.loads(
        (SRC / "config.json").read_text())


def assert_nothing_at(out: Path):
    assert not out.exists()
    assert not Path(core.partial_path(str(out))).exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_sharded_copy_converts(tmp_path, parts):
    """The fixture's sharded directory is valid, so the failures below are the injected ones."""
    write_dir(tmp_path / "hf", *parts)
    assert len(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())[
        "weight_map"]) == len(parts[0])
    convert(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert (tmp_path / "out" / "model").is_dir()


def test_missing_shard_names_the_file_and_its_tensors(tmp_path, parts):
    write_dir(tmp_path / "hf", *parts)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(tmp_path / "hf" / victim)
    with pytest.raises(CheckpointError, match=f"missing shard '{victim}'.*model"):
        convert(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert_nothing_at(tmp_path / "out")


def test_wrong_shape_names_the_tensor_and_both_shapes(tmp_path, parts):
    tensors, cfg = parts
    name = "model.layers.1.self_attn.q_a_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    write_dir(tmp_path / "hf", tensors, cfg)
    with pytest.raises(CheckpointError,
                       match=rf"'{name}' has shape \(64, 32\), expected \(32, 64\)"):
        convert(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert_nothing_at(tmp_path / "out")


def test_unknown_and_missing_tensors_are_named(tmp_path, parts):
    tensors, cfg = parts
    extra = dict(tensors, **{"model.layers.0.self_attn.rotary_extra": np.zeros(3, np.float32)})
    write_dir(tmp_path / "a", extra, cfg)
    with pytest.raises(CheckpointError,
                       match="unknown tensor.*'model.layers.0.self_attn.rotary_extra'"):
        convert(str(tmp_path / "a"), str(tmp_path / "out"), progress=False)
    fewer = {k: v for k, v in tensors.items() if k != "model.layers.2.mlp.gate.weight"}
    write_dir(tmp_path / "b", fewer, cfg)
    with pytest.raises(CheckpointError, match="missing tensor.*'model.layers.2.mlp.gate.weight'"):
        convert(str(tmp_path / "b"), str(tmp_path / "out"), progress=False)
    assert_nothing_at(tmp_path / "out")


def test_unrepresentable_or_disagreeing_config_names_the_field(tmp_path, parts):
    tensors, cfg = parts
    write_dir(tmp_path / "a", tensors, dict(cfg, scoring_func="softmax"))
    with pytest.raises(ConfigError, match="'scoring_func'='softmax'"):
        convert(str(tmp_path / "a"), str(tmp_path / "out"), progress=False)
    write_dir(tmp_path / "b", tensors, cfg)
    with pytest.raises(ConfigError, match="disagrees with config.json.*num_layers: 8 vs 3"):
        convert(str(tmp_path / "b"), str(tmp_path / "out"), config=tiny_config(), progress=False)
    assert_nothing_at(tmp_path / "out")


def test_failure_while_writing_leaves_nothing_and_existing_out_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def half_written(tmp):
        (Path(tmp) / "model").mkdir()
        (Path(tmp) / "model" / "part").write_text("x")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        core.atomic_directory(str(out), half_written)
    assert_nothing_at(out)

    import orbax.checkpoint as ocp

    def failing_save(self, directory, *a, **k):
        os.makedirs(directory)
        raise RuntimeError("interrupted")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing_save)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert(str(SRC), str(out), progress=False)
    assert_nothing_at(out)

    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(str(SRC), str(out), progress=False)
    assert (out / "keep").read_text() == "mine"


def _run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_command_lines_convert_and_export_and_fail_cleanly(tmp_path, parts):
    """The exact commands of docs/hf_weights.md, run as programs."""
    ckpt, hf = tmp_path / "ckpt", tmp_path / "hf"
    r = _run("sparse_lm.convert.hf_to_orbax", f"--hf-dir={SRC}", f"--out={ckpt}", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run("sparse_lm.convert.orbax_to_hf", f"--ckpt={ckpt}", f"--out={hf}", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = SafetensorsDir(SRC), SafetensorsDir(hf)
    assert a.names() == b.names()
    assert all(a.read(n).tobytes() == b.read(n).tobytes() for n in a.names())
    tensors, cfg = parts
    tensors["model.layers.0.mlp.gate.tid2eid"] = tensors["model.layers.0.mlp.gate.tid2eid"][:7]
    write_dir(tmp_path / "bad", tensors, cfg)
    r = _run("sparse_lm.convert.hf_to_orbax", f"--hf-dir={tmp_path / 'bad'}",
             f"--out={tmp_path / 'out'}", "--quiet")
    assert r.returncode != 0 and "'model.layers.0.mlp.gate.tid2eid' has shape (7, 2)" in r.stderr
    assert_nothing_at(tmp_path / "out")


def test_without_config_json_the_model_config_must_be_given(tmp_path, parts):
    tensors, cfg_json = parts
    write_dir(tmp_path / "hf", tensors, cfg_json)
    os.remove(tmp_path / "hf" / "config.json")
    with pytest.raises(ConfigError, match="has no config.json; pass the model config"):
        convert(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert_nothing_at(tmp_path / "out")
    cfg = core.from_hf_config(cfg_json)
    assert cfg.mtp_depth == 1               # config.json says 1; the tensors decide below
    got = convert(str(tmp_path / "hf"), str(tmp_path / "out"), config=cfg, progress=False)
    assert got.mtp_depth == 0 and core.config_differences(got, cfg.replace(mtp_depth=0)) == []


def test_non_finite_weights_are_refused_naming_the_tensor_unless_allowed(tmp_path, parts):
    tensors, hf_config = parts
    name = next(n for n in sorted(tensors) if n.endswith("q_a_proj.weight"))
    bad = tensors[name].astype(np.float32).copy()
    bad[0, :3] = [np.nan, np.inf, -np.inf]
    write_dir(tmp_path / "hf", {**tensors, name: bad.astype(tensors[name].dtype)}, hf_config)
    with pytest.raises(CheckpointError, match=rf"{name}.*3 non-finite value\(s\).*allow"):
        convert(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False)
    assert_nothing_at(tmp_path / "out")
    convert(str(tmp_path / "hf"), str(tmp_path / "out"), progress=False, allow_non_finite=True)
    assert (tmp_path / "out" / "model").is_dir()


@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\x9c" * 16],
                         ids=["huge-header-length", "header-not-json"])
def test_random_bytes_safetensors_names_the_file(tmp_path, garbage):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(garbage)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a safetensors file"):
        SafetensorsDir(tmp_path / "hf")


def test_cli_reports_a_user_error_in_one_line_with_exit_status_2(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\xff" * 64)
    r = subprocess.run([sys.executable, "-m", "sparse_lm.convert.hf_to_orbax",
                        f"--hf-dir={tmp_path / 'hf'}", f"--out={tmp_path / 'out'}", "--quiet"],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "is not a safetensors file" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
