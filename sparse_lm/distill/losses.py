"""Distillation objectives as pure functions of logits (fp32 inside).

Reverse KL of the student from the teacher at each position t of the student's own sample:

    KL(p_s || p_t)_t = sum_v p_s(v | x_<t) (log p_s(v | x_<t) - log p_t(v | x_<t))

`reverse_kl` sums over the full vocabulary. `topk_reverse_kl` truncates to K_t, the k tokens the
student ranks highest at t (the selection carries no gradient), and renormalises BOTH
distributions over K_t before comparing them:

    q_s(v) = p_s(v) / sum_{u in K_t} p_s(u),   q_t(v) = p_t(v) / sum_{u in K_t} p_t(u)
    KL_k = sum_{v in K_t} q_s(v) (log q_s(v) - log q_t(v))

so KL_k >= 0, and with k = V it is the full reverse KL. `forward_kl` (teacher || student) is the
objective of off-policy distillation on teacher samples. Every function returns per-position
values [B, T]; `masked_mean` averages them over the positions that count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def log_probs(logits: jax.Array) -> jax.Array:
    """[..., V] logits -> [..., V] fp32 log-probabilities."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """student, teacher [B, T, V] -> KL(p_s || p_t) [B, T] over the full vocabulary (nats)."""
    ls, lt = log_probs(student_logits), log_probs(teacher_logits)
    return jnp.sum(jnp.exp(ls) * (ls - lt), axis=-1)


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """student, teacher [B, T, V] -> KL(p_t || p_s) [B, T] over the full vocabulary (nats)."""
    return reverse_kl(teacher_logits, student_logits)


def topk_reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array, k: int) -> jax.Array:
    """student, teacher [B, T, V] -> [B, T]: the reverse KL over the student's top-k tokens at
    each position, both distributions renormalised over those k tokens (module docstring).
    Ties at the k-th logit are broken by lax.top_k (lowest index first)."""
    v = student_logits.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(f"k={k} is invalid: must be in [1, vocab size {v}]")
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(student_logits), k)             # [B, T, k]
    s = jnp.take_along_axis(student_logits.astype(jnp.float32), idx, axis=-1)
    t = jnp.take_along_axis(teacher_logits.astype(jnp.float32), idx, axis=-1)
    return reverse_kl(s, t)           # log_softmax over the k entries = the renormalisation


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [B, T, V], tokens [B, T] int -> log p(tokens) [B, T] (fp32)."""
    return jnp.take_along_axis(log_probs(logits), tokens[..., None].astype(jnp.int32),
                               axis=-1)[..., 0]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """values [B, T], mask [B, T] bool -> mean over the mask (0 when it is empty)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def row_means(values: jax.Array, mask: jax.Array) -> jax.Array:
    """values [B, T], mask [B, T] bool -> [B] mean of each row over its mask (0 if empty)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(values * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
