"""Learning-rate and MTP-weight schedules (spec §11): linear warm-up, constant, cosine decay.

    step < warmup:                 lr = peak * (step + 1) / warmup
    warmup <= step < decay_start:  lr = peak
    decay_start <= step < total:   lr = final + (peak - final) * (1 + cos(pi * frac)) / 2
    step >= total:                 lr = final
decay_start = total_steps - decay_steps. The MTP loss weight is `mtp_weight` until decay_start
and `mtp_weight_decay` afterwards (0.3 -> 0.1 in the report).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_steps: int = 0             # cosine over the last decay_steps; 0 = constant to the end
    final_lr: float = 0.0
    mtp_weight: float = 0.3
    mtp_weight_decay: float = 0.1

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"train.steps={self.total_steps} is invalid: must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"schedule.warmup_steps={self.warmup_steps} is invalid: must be in "
                             f"[0, train.steps={self.total_steps}]")
        if not 0 <= self.decay_steps <= self.total_steps - self.warmup_steps:
            raise ValueError(f"schedule.decay_steps={self.decay_steps} is invalid: must be in "
                             f"[0, train.steps - warmup_steps = {self.total_steps - self.warmup_steps}]")
        if self.peak_lr <= 0 or self.final_lr < 0:
            raise ValueError(f"schedule: peak lr {self.peak_lr} must be > 0 and final lr "
                             f"{self.final_lr} >= 0")

    @property
    def decay_start(self) -> int:
        return self.total_steps - self.decay_steps

    def lr(self, step):
        """Learning rate at `step` (int or traced int array)."""
        step = jnp.asarray(step, jnp.float32)
        warm = self.peak_lr * (step + 1.0) / max(self.warmup_steps, 1)
        frac = jnp.clip((step - self.decay_start) / max(self.decay_steps, 1), 0.0, 1.0)
        cos = self.final_lr + (self.peak_lr - self.final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        lr = jnp.where(step < self.decay_start, self.peak_lr, cos)
        return jnp.where(step < self.warmup_steps, warm, lr)

    def mtp(self, step):
        step = jnp.asarray(step)
        return jnp.where(step < self.decay_start, self.mtp_weight, self.mtp_weight_decay)

    __call__ = lr
