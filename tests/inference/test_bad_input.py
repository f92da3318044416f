"""Bad input to generation gives a clear error before any work is done (issue 10).

Cases not already covered by tests/inference/test_decode.py::test_bad_input_errors (prefill /
decode / generate argument checks) and test_generate_cli.py (a checkpoint whose hidden_size
differs):
  * an empty prompt through `generate` and through `experiments.generate.generate_text`;
  * a prompt longer than the cache in a batch where only a later row overflows: the error
    names that row and the sizes;
  * sampling parameters out of range (inf / nan / negative / zero / above 1) through
    `generate`, `Decoder.sample`, `generate_text`, and on the command line (exit 2, flag named,
    before any model is loaded);
  * a checkpoint from a different config is refused, naming the field, also when the field
    changes no parameter shape (sliding_window, index_topk: a silent restore would run the
    wrong model), and when the run's recorded config.json was edited after the checkpoint; on
    the command line generation refuses to start (exit 2) and prints the differing field.
None of these compiles a step; the checkpoint fixture saves one tiny model (a few seconds).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import train_base
from experiments.generate import GenerateError, generate_text, load_model
from sparse_lm.inference import Decoder, InferenceError, generate
from sparse_lm.model import build_model
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train.loop import make_tx, run_meta, setup, write_resolved_config
from sparse_lm.train.steps import init_train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(num_layers=2, layer_prefix=(), layer_cycle=("csa", "hca"), layer_tail=(),
             num_hash_layers=1, mtp_depth=0)


def _config():
    c = train_base.base("tiny")
    c.model.update(SMALL)
    return c


@pytest.fixture(scope="module")
def model():
    from sparse_lm.config import ModelConfig
    return build_model(ModelConfig.from_dict(_config().model), seed=0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training run directory holding one checkpoint (step 3) of the SMALL tiny model."""
    wd = tmp_path_factory.mktemp("run")
    config = _config()
    run = setup(config, wd)
    write_resolved_config(run, corpus={})
    _, state = init_train_state(build_model(run.model_cfg, seed=1), make_tx(config))
    ck = ckpt_lib.Checkpointer(wd, keep=1, async_save=False)
    ck.save(3, state, [{}], run_meta(run, {}), force=True)
    ck.close()
    return wd


# ------------------------------------------------------------------ prompts and cache size
def test_empty_prompt_is_refused_by_generate_and_generate_text(model):
    with pytest.raises(InferenceError, match=r"prompts\[1\] is empty"):
        generate(model, [[1, 2, 3], []], max_new_tokens=2)
    with pytest.raises(GenerateError, match="prompt is empty"):
        generate_text(model, "", max_new_tokens=2)


def test_prompt_longer_than_the_cache_names_the_row_and_sizes(model):
    dec = Decoder(model)
    with pytest.raises(InferenceError, match=r"row 1 .* 0 tokens held \+ 9 new > max_len=8"):
        dec.prefill(dec.init_cache(2, 8), [[1] * 8, [2] * 9])
    with pytest.raises(InferenceError, match="max_len=8 is too small"):
        generate(dec, [[1] * 7], max_new_tokens=2, max_len=8)


# ------------------------------------------------------------------ sampling parameters
BAD_SAMPLING = [(dict(temperature=float("inf")), "temperature"),
                (dict(temperature=-1.0), "temperature"),
                (dict(top_p=float("nan")), "top_p"),
                (dict(top_p=-0.5), "top_p"),
                (dict(top_p=0.0), "top_p"),
                (dict(top_p=1.0001), "top_p")]


@pytest.mark.parametrize("kw,field", BAD_SAMPLING)
def test_sampling_parameters_out_of_range(model, kw, field):
    with pytest.raises(InferenceError, match=field):
        generate(model, [[1, 2]], max_new_tokens=1, **kw)
    with pytest.raises(InferenceError, match=field):
        Decoder(model).sample(np.zeros((1, 256), np.float32), jax.random.key(0), **kw)
    with pytest.raises(InferenceError, match=field):
        generate_text(model, "hi", max_new_tokens=1, **kw)


def _cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_refuses_bad_sampling_and_empty_prompt_before_loading(tmp_path):
    for args, needle in ((["--prompt=hi", "--temperature=-1"], "temperature"),
                         (["--prompt=", "--temperature=0"], "prompt is empty"),
                         (["--prompt=hi", "--max-new-tokens=0"], "max-new-tokens")):
        # an empty workdir: had the checks not come first, loading would fail differently
        res = _cli(f"--workdir={tmp_path}", *args)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        assert needle in res.stderr and "no checkpoint" not in res.stderr, res.stderr[-2000:]


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("field,value", [("sliding_window", 4), ("index_topk", 3),
                                         ("compress_ratio_hca", 16)])
def test_checkpoint_of_a_different_config_is_refused_naming_the_field(workdir, field, value):
    other = _config()
    assert other.model[field] != value
    other.model[field] = value
    with pytest.raises(ckpt_lib.CheckpointError, match=f"model.{field}"):
        load_model(str(workdir), other, log=lambda m: None)


def test_edited_recorded_config_is_refused(workdir, tmp_path):
    """The run's config.json no longer describes the checkpoint: refused, field named."""
    import shutil
    wd = tmp_path / "run"
    shutil.copytree(workdir, wd)
    doc = json.loads((wd / "config.json").read_text())
    doc["config"]["model"]["sliding_window"] = 16
    (wd / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ckpt_lib.CheckpointError, match="model.sliding_window"):
        load_model(str(wd), None, log=lambda m: None)


@pytest.mark.slow
def test_cli_refuses_to_start_with_a_checkpoint_of_another_config(workdir, tmp_path):
    cfg = tmp_path / "other.py"
    cfg.write_text("from configs import train_base\n\n\ndef get_config():\n"
                   "    c = train_base.base('tiny')\n"
                   f"    c.model.update({SMALL!r})\n"
                   "    c.model.sliding_window = 4\n    return c\n")
    res = _cli(f"--workdir={workdir}", f"--config={cfg}", "--prompt=hi", "--max-new-tokens=2")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "model.sliding_window" in res.stderr and "different model" in res.stderr
    assert res.stdout == ""                 # nothing generated, not even the prompt echoed
