"""One jitted distillation update over a batch of (prompt, completion) rows.

    batch = {"tokens": [B, P + N] int32 (prompt, then completion), "mask": [B, N] bool,
             "teacher_logits": [B, N, V] fp32}

The completion of a row is what the step's sampler produced (the student for on-policy, the
domain's teacher for off-policy) or the data's continuation (SFT). Each row's teacher (the one
of its prompt's domain) scores it beforehand with its own jitted forward in inference mode
(`make_teacher_forward`): the update sees only the teacher's logits of the completion
positions, so it cannot change a teacher.

The student's distribution over completion token j is its logits at position P - 1 + j of the
full row (they condition on the prompt and completion tokens < j). Objectives per position:
"reverse_kl" KL(student || teacher) (full vocabulary, or the student's top-k renormalised: see
`sparse_lm.distill.losses`), "forward_kl" KL(teacher || student), "ce" -log p_student(token).
The student's router biases follow the aux-loss-free rule as in training
(`sparse_lm.train.steps.update_router_biases`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparse_lm.distill import losses
from sparse_lm.train.losses import balance_term, indexer_term
from sparse_lm.train.steps import LossConfig, TrainState, update_router_biases

OBJECTIVES = ("reverse_kl", "forward_kl", "ce")


@dataclasses.dataclass(frozen=True)
class Objective:
    kind: str = "reverse_kl"      # one of OBJECTIVES
    topk: int = 0                 # reverse_kl only: 0 = full vocabulary, else the student's top-k

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective {self.kind!r} is invalid: allowed values {OBJECTIVES}")
        if self.topk and self.kind != "reverse_kl":
            raise ValueError(f"topk={self.topk} applies to the reverse KL only, not {self.kind!r}")


def completion_logits(logits: jax.Array, prompt_len: int, new_tokens: int) -> jax.Array:
    """[B, P + N, V] logits of full rows -> [B, N, V]: the distributions of the N completion
    tokens (position P - 1 + j predicts completion token j)."""
    return logits[:, prompt_len - 1:prompt_len - 1 + new_tokens]


def make_teacher_forward(graphdef, prompt_len: int, new_tokens: int):
    """jit((params, buffers, tokens [B, P + N]) -> fp32 completion logits [B, N, V]) of a teacher
    in inference mode: one compilation serves every teacher of the same architecture, and the
    parameters are read only (not donated, not differentiated)."""
    def forward(params, buffers, tokens):
        logits = nnx.merge(graphdef, params, buffers)(tokens, sparse=True)
        return completion_logits(logits, prompt_len, new_tokens).astype(jnp.float32)
    return jax.jit(forward)


def per_position_objective(objective: Objective, student: jax.Array, teacher: jax.Array | None,
                           targets: jax.Array) -> jax.Array:
    """[B, N, V] student and teacher completion logits, targets [B, N] -> [B, N]."""
    if objective.kind == "ce":
        return -losses.token_log_probs(student, targets)
    if objective.kind == "forward_kl":
        return losses.forward_kl(student, teacher)
    if objective.topk:
        return losses.topk_reverse_kl(student, teacher, objective.topk)
    return losses.reverse_kl(student, teacher)


def distill_step(state: TrainState, batch, *, graphdef, tx, schedule, loss_cfg: LossConfig,
                 objective: Objective, prompt_len: int):
    """(new state, metrics). batch: tokens [B, P + N], mask [B, N] and, unless the objective is
    "ce", teacher_logits [B, N, V] (each row's teacher: `make_teacher_forward`).

    metrics: fp32 scalars loss, objective, grad_norm, update_norm, lr; per row [B]:
    objective_row, reverse_kl_row (student || teacher, full vocabulary), teacher_logprob_row,
    student_logprob_row (mean log-prob of the completion tokens), length_row (completion tokens
    that count); and `tokens`, the rows the loss was computed on."""
    tokens, mask = batch["tokens"], batch["mask"]
    new = mask.shape[1]
    targets = tokens[:, prompt_len:]
    t_logits = batch.get("teacher_logits")
    if t_logits is None and objective.kind != "ce":
        raise ValueError(f"objective {objective.kind!r} needs batch['teacher_logits']")

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state.buffers)
        out = model(tokens, sparse=True, return_aux=True)
        s_logits = completion_logits(out.logits, prompt_len, new)
        per_pos = per_position_objective(objective, s_logits, t_logits, targets)
        obj = losses.masked_mean(per_pos, mask)
        loss = (obj + loss_cfg.balance_alpha * balance_term(out.balance_loss)
                + loss_cfg.indexer_weight * indexer_term(out.indexer_kl))
        return loss, (obj, per_pos, s_logits, out.expert_counts)

    (loss, (obj, per_pos, s_logits, counts)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model = nnx.merge(graphdef, params, state.buffers)
    update_router_biases(model, counts, loss_cfg.router_bias_rate)
    _, _, buffers = nnx.split(model, nnx.Param, ...)
    s_logits = jax.lax.stop_gradient(s_logits)
    metrics = {"loss": loss, "objective": obj, "grad_norm": optax.global_norm(grads),
               "update_norm": optax.global_norm(updates), "lr": schedule.lr(state.step),
               "objective_row": losses.row_means(per_pos, mask),
               "student_logprob_row": losses.row_means(losses.token_log_probs(s_logits, targets),
                                                       mask),
               "length_row": jnp.sum(mask, axis=-1).astype(jnp.float32), "tokens": tokens}
    if t_logits is not None:
        metrics["reverse_kl_row"] = losses.row_means(losses.reverse_kl(s_logits, t_logits), mask)
        metrics["teacher_logprob_row"] = losses.row_means(
            losses.token_log_probs(t_logits, targets), mask)
    return TrainState(params, buffers, opt_state, state.step + 1), metrics


def make_distill_step(graphdef, tx, schedule, loss_cfg: LossConfig, objective: Objective, *,
                      prompt_len: int):
    """jit(distill_step) with the student state donated."""
    fn = functools.partial(distill_step, graphdef=graphdef, tx=tx, schedule=schedule,
                           loss_cfg=loss_cfg, objective=objective, prompt_len=prompt_len)
    return jax.jit(fn, donate_argnums=(0,))
