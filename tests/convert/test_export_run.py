"""A training run exported to a Hugging Face directory (`orbax_to_hf.export_run` / --workdir):
`load_hf` of the export computes the training checkpoint's logits (to 1e-6, fp32), at the newest
step and at an earlier one, in transformers' tensor names; the run's tokenizer file travels with
it; a workdir without checkpoints, a step that does not exist and an --out that exists are
clear errors that leave nothing behind.

One in-process run of the tiny training config (2 steps, a checkpoint after each; its compile
is most of the time) and two CLI runs: 3.7 min for the file on the shared 2-core machine under
a load of ~12, about 1.7 min of CPU time."""
import functools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, models

from sparse_lm.convert import core, load_hf
from sparse_lm.convert.orbax_to_hf import export_run
from sparse_lm.data.tokenizer import TokenizerError, train_bpe
from sparse_lm.train.checkpoint import CheckpointError
from sparse_lm.train.evaluation import config_from_workdir
from sparse_lm.train.loop import load_for_eval, train
from tests.conftest import subprocess_env
from tests.train.tiny_train_config import get_config

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    c = get_config()
    c.train.update(dict(steps=2, checkpoint_every=1, async_checkpoint=False))
    c.schedule.update(dict(warmup_steps=1, decay_steps=1))
    train(c, wd)
    return wd


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _logits(model):
    """One compile per model structure (the two steps of a run share it)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(TOKENS)))


@pytest.fixture(scope="module")
def exports(workdir, tmp_path_factory):
    """{asked step: (HF dir, the training checkpoint's logits, the export's logits)}."""
    out = {}
    for step in (None, 1):
        d = tmp_path_factory.mktemp("hf") / "out"
        files = export_run(workdir, str(d), step=step, progress=False)
        assert files
        _, trained, got_step = load_for_eval(config_from_workdir(workdir), workdir, step)
        assert got_step == (2 if step is None else 1)
        exported, cfg = load_hf(d, progress=False)
        assert cfg.mtp_depth == trained.cfg.mtp_depth == 1
        out[step] = (d, _logits(trained), _logits(exported))
    return out


@pytest.mark.parametrize("step", [None, 1])
def test_exported_run_loads_with_the_training_checkpoints_logits(exports, step):
    out, ref, got = exports[step]
    assert (out / "config.json").exists() and not (out / "tokenizer.json").exists()
    report = core.check_hf(out)
    assert report.scheme == "transformers" and report.skipped == []
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert got.shape == ref.shape == (*TOKENS.shape, 256)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_steps_differ_so_the_step_is_really_chosen(exports):
    assert np.abs(exports[None][2] - exports[1][2]).max() > 1e-4


def _with_tokenizer(workdir, tmp_path, tokenizer_path):
    """A copy of the run whose recorded config names `tokenizer_path` as data.tokenizer."""
    wd = tmp_path / f"run_{tokenizer_path.stem}"
    shutil.copytree(workdir, wd)
    doc = json.loads((wd / "config.json").read_text())
    doc["config"]["data"]["tokenizer"] = str(tokenizer_path)
    (wd / "config.json").write_text(json.dumps(doc))
    return wd


def test_the_runs_tokenizer_is_copied(workdir, tmp_path):
    """data.tokenizer's tokenizer.json and the tokenizer_config.json beside it are copied
    beside the weights, byte for byte; a tokenizer with more ids than the model's vocabulary,
    or one that does not exist, is an error naming data.tokenizer, and nothing is written."""
    (tmp_path / "tok").mkdir()
    small = tmp_path / "tok" / "tokenizer.json"
    Tokenizer(models.WordLevel({"[UNK]": 0, "def": 1, "return": 2}, unk_token="[UNK]")).save(
        str(small))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "[UNK]"}')
    export_run(_with_tokenizer(workdir, tmp_path, small), str(tmp_path / "hf"), progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()

    big = tmp_path / "big.json"
    train_bpe(["def f(x):\n    return x\n"] * 4, vocab_size=300).save(str(big))
    with pytest.raises(TokenizerError, match="data.tokenizer=.*model.vocab_size=256"):
        export_run(_with_tokenizer(workdir, tmp_path, big), str(tmp_path / "hf2"), progress=False)
    with pytest.raises(TokenizerError, match="data.tokenizer=.*does not exist"):
        export_run(_with_tokenizer(workdir, tmp_path, tmp_path / "missing.json"),
                   str(tmp_path / "hf3"), progress=False)
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf3").exists()


def test_bad_workdir_step_or_out_are_clear_errors(workdir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in .*train first"):
        export_run(empty, str(tmp_path / "o1"), progress=False)
    with pytest.raises(CheckpointError, match=r"step 7 has no checkpoint .*steps there: \[1, 2\]"):
        export_run(workdir, str(tmp_path / "o2"), step=7, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_run(tmp_path / "nowhere", str(tmp_path / "o3"), progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        export_run(workdir, str(empty), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_step_that_does_not_exist_is_one_line_exit_2(workdir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sparse_lm.convert.orbax_to_hf",
                        f"--workdir={workdir}", "--step=9", f"--out={tmp_path / 'o'}", "--quiet"],
                       capture_output=True, text=True, env=subprocess_env(tmp_path / "cache"),
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors == [f"error: step 9 has no checkpoint in {workdir}/checkpoints; steps there: "
                      "[1, 2]"], r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_cli_log_levels_follow_verbosity(workdir, tmp_path):
    """By default the exporter's own INFO line shows and orbax's INFO lines do not; absl's
    --verbosity=-1 hides INFO."""
    env = subprocess_env(tmp_path / "cache")

    def export(out, *flags):
        r = subprocess.run([sys.executable, "-m", "sparse_lm.convert.orbax_to_hf",
                            f"--workdir={workdir}", f"--out={tmp_path / out}", "--quiet", *flags],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.startswith(f"wrote {tmp_path / out}: config.json + 1 safetensors file")
        return r.stderr
    default = export("a")
    assert "exporting step 2 of" in default and "checkpoint_manager.py" not in default
    assert "exporting step 2 of" not in export("b", "--verbosity=-1")
