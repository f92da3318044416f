"""train.init_from: model weights from a training workdir or a converted checkpoint, a fresh
optimizer state and step 0; another architecture is refused before any compute."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from sparse_lm.convert.core import save_checkpoint
from sparse_lm.model import build_model
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train.loop import train, with_init_weights
from sparse_lm.train.steps import init_train_state
from tests.distill.common import STUDENT, model_config, save_run


def _equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def cfg():
    return model_config(STUDENT)


def test_workdir_weights_are_restored_with_a_fresh_optimizer_state_at_step_0(tmp_path, cfg):
    saved = save_run(tmp_path / "base", cfg, seed=1, step=3)
    tx = optax.adam(1e-2)
    _, fresh = init_train_state(build_model(cfg, seed=2), tx)
    assert not _equal(fresh.params, saved.params)
    state = with_init_weights(fresh, ckpt_lib.resolve_init_source(tmp_path / "base",
                                                                  cfg.to_dict()), tx)
    assert _equal(state.params, saved.params) and _equal(state.buffers, saved.buffers)
    assert _equal(state.opt_state, tx.init(state.params))          # fresh: zero moments, count 0
    assert not _equal(saved.opt_state, tx.init(saved.params))      # (the saved one was not)
    assert int(state.step) == 0


def test_converted_checkpoint_weights_are_restored(tmp_path, cfg):
    model = build_model(cfg, seed=3)
    save_checkpoint(str(tmp_path / "hf"), nnx.to_pure_dict(nnx.state(model)), cfg)
    tx = optax.adam(1e-2)
    _, fresh = init_train_state(build_model(cfg, seed=4), tx)
    src = ckpt_lib.resolve_init_source(tmp_path / "hf", cfg.to_dict())
    assert src.kind == "converted"
    state = with_init_weights(fresh, src, tx)
    _, params, buffers = nnx.split(model, nnx.Param, ...)
    assert _equal(state.params, params) and _equal(state.buffers, buffers)


def test_another_architecture_or_a_missing_step_is_refused_naming_it(tmp_path, cfg):
    save_run(tmp_path / "base", cfg, seed=1, step=3)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model.hidden_size: 32 \(checkpoint\) vs 48"):
        ckpt_lib.resolve_init_source(tmp_path / "base", cfg.replace(hidden_size=48).to_dict())
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 7 has no checkpoint.*\[3\]"):
        ckpt_lib.resolve_init_source(tmp_path / "base", cfg.to_dict(), step=7)
    with pytest.raises(ckpt_lib.CheckpointError, match="neither a training workdir"):
        ckpt_lib.resolve_init_source(tmp_path, cfg.to_dict())


def test_train_refuses_an_incompatible_init_checkpoint_before_writing_anything(tmp_path, cfg):
    from tests.distill.common import distill_config    # a full train config of the same model
    save_run(tmp_path / "base", cfg.replace(num_layers=2), seed=1)
    c = distill_config({})
    c.train.init_from = str(tmp_path / "base")
    c.train.seq_len = 16
    c.data.source = "synthetic:repeat"
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model.num_layers: 2 \(checkpoint\) vs 1"):
        train(c, tmp_path / "run")
    assert not (tmp_path / "run").exists()
