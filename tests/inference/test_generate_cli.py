"""`experiments.generate`: restore from a training workdir, refuse a different model, stream text.

* `load_model` restores exactly the parameters (and router biases / hash tables) a training
  checkpoint holds, through the training code's restore;
* a --config whose model differs from the checkpoint's refuses to start and names the field;
* a workdir without checkpoints and no --config is an error that says what to do;
* the command line streams the continuation after the prompt and exits 0; bad sampling flags
  exit 2 with the flag named, before any model is loaded.
"""
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import train_base
from experiments.generate import GenerateError, generate_text, load_model
from sparse_lm.config import ModelConfig
from sparse_lm.model import build_model
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train.loop import make_tx, run_meta, setup, write_resolved_config
from sparse_lm.train.steps import init_train_state

SMALL = dict(num_layers=2, layer_prefix=(), layer_cycle=("csa", "hca"), layer_tail=(),
             num_hash_layers=1, mtp_depth=0)


def _config():
    c = train_base.base("tiny")
    c.model.update(SMALL)
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir with one checkpoint of a (randomly initialised) model, step 7."""
    wd = tmp_path_factory.mktemp("run")
    config = _config()
    run = setup(config, wd)
    write_resolved_config(run, corpus={})
    model = build_model(run.model_cfg, seed=11)
    _, state = init_train_state(model, make_tx(config))
    ck = ckpt_lib.Checkpointer(wd, keep=2, async_save=False)
    ck.save(7, state, [{}], run_meta(run, {}), force=True)
    ck.close()
    return wd, model


def test_restores_the_checkpointed_model(workdir):
    wd, saved = workdir
    model, where = load_model(str(wd), log=lambda m: None)
    assert "step 7" in where
    a, b = nnx.state(saved), nnx.state(model)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_refuses_a_checkpoint_of_another_model(workdir):
    wd, _ = workdir
    other = _config()
    other.model.hidden_size = 32
    with pytest.raises(ckpt_lib.CheckpointError, match="hidden_size"):
        load_model(str(wd), other, log=lambda m: None)


def test_no_checkpoint_and_no_config_is_an_error(tmp_path):
    with pytest.raises(GenerateError, match="no checkpoint"):
        load_model(str(tmp_path), None, log=lambda m: None)


def test_rejects_non_byte_vocabularies():
    model = nnx.eval_shape(lambda: build_model(
        ModelConfig.from_dict(_config().model).replace(vocab_size=300)))
    with pytest.raises(GenerateError, match="vocab_size=256"):
        generate_text(model, "hi", max_new_tokens=1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.generate", *args],
                          capture_output=True, text=True, timeout=600,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def test_cli_bad_flag_fails_fast():
    """(The other sampling checks are tested in-process in test_decode.test_bad_input_errors.)"""
    res = _cli("--config=configs/tiny.py", "--prompt=hi", "--top-p=0")
    assert res.returncode == 2, res.stderr
    assert "top_p" in res.stderr and "untrained" not in res.stderr


@pytest.mark.slow
def test_cli_streams_a_continuation_from_the_checkpoint(workdir):
    wd, _ = workdir
    res = _cli(f"--workdir={wd}", "--prompt=def f", "--max-new-tokens=6", "--temperature=0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def f") and len(res.stdout.encode()) > len("def f")
    assert "step 7" in res.stderr
