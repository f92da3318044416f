"""Tiny models, saved checkpoints and a distill config for the tests of tests/distill/."""
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax

from configs.train_base import base
from sparse_lm.config import ModelConfig
from sparse_lm.model import build_model
from sparse_lm.train.checkpoint import Checkpointer
from sparse_lm.train.steps import init_train_state

# One SWA layer (the student) and a deeper, narrower teacher sharing the byte vocabulary.
STUDENT = dict(vocab_size=256, hidden_size=32, num_layers=1, num_heads=2, head_dim=16,
               rope_head_dim=8, q_lora_rank=16, o_groups=1, o_lora_rank=16, sliding_window=8,
               layer_prefix=(), layer_cycle=("swa",), layer_tail=(), compress_ratio_csa=4,
               compress_ratio_hca=8, index_n_heads=2, index_head_dim=8, index_topk=2,
               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
               num_hash_layers=0, mtp_depth=0, yarn_original_max_position=64, moe_impl="xla")
TEACHER = dict(STUDENT, num_layers=2, hidden_size=24)


def model_config(d: dict) -> ModelConfig:
    return ModelConfig.from_dict(base().model.to_dict() | d)


def save_run(workdir: Path, cfg: ModelConfig, *, seed: int, step: int = 3):
    """A training workdir with one checkpoint of a model of `cfg` (seed's weights) whose
    optimizer state is not fresh. Returns the saved state."""
    tx = optax.adam(1e-2)
    _, state = init_train_state(build_model(cfg, seed=seed), tx)
    opt_state = jax.tree.map(lambda x: x + 1, state.opt_state)       # as after some updates
    state = type(state)(state.params, state.buffers, opt_state, jnp.asarray(step, jnp.int32))
    ckpt = Checkpointer(workdir, keep=2, async_save=False)
    ckpt.save(step, state, {}, {"model": cfg.to_dict()}, force=True)
    ckpt.close()
    return state


def distill_config(teachers: dict, **distill):
    """Two domains (synthetic repeat / recall prompts), 2 rows each, 8 + 8 tokens per row."""
    c = base()
    c.model.update(STUDENT)
    c.data.update(dict(synthetic_docs=16, synthetic_length=64))
    c.train.update(dict(steps=2, batch_size=4, log_every=1, checkpoint_every=1,
                        keep_checkpoints=3, progress=False, tensorboard=False, init_from=""))
    c.schedule.update(dict(peak_lr=1e-2, warmup_steps=1, decay_steps=1, final_lr=1e-3))
    c.distill = ml_collections.ConfigDict(dict(
        mode="on_policy", prompts={"a": "synthetic:repeat", "b": "synthetic:recall"},
        teachers=dict(teachers), prompt_len=8, new_tokens=8, temperature=0.0, top_p=1.0,
        topk=0, stop_token=-1, eval_len=16, eval_windows=0))
    c.distill.update(distill)
    return c
