"""Learning-rate and MTP-weight schedules (spec §11), built from optax schedules.

    step < warmup:                 lr = peak * (step + 1) / warmup
    warmup <= step < decay_start:  lr = peak
    decay_start <= step < total:   lr = final + (peak - final) * (1 + cos(pi * frac)) / 2
    step >= total:                 lr = final
decay_start = total_steps - decay_steps, frac = (step - decay_start) / decay_steps. The MTP loss
weight is `mtp_weight` until decay_start and `mtp_weight_decay` afterwards (0.3 -> 0.1 in the
report).

The pieces are optax's: `linear_schedule` (warm-up), `constant_schedule` (the plateau),
`cosine_decay_schedule` (the decay, alpha = final / peak), glued by `join_schedules` at the
phase boundaries. optax has no warm-up that *ends* at the peak on the last warm-up step (its
`warmup_cosine_decay_schedule` starts at `init_value` on step 0 and has no plateau), so the
warm-up is a linear schedule from peak / warmup to peak over warmup - 1 steps: the recipe's
peak * (step + 1) / warmup exactly.
"""
from __future__ import annotations

import dataclasses

import optax


def _warmup(peak: float, warmup_steps: int) -> optax.Schedule:
    """peak * (step + 1) / warmup_steps for step < warmup_steps (then held at peak)."""
    return optax.linear_schedule(init_value=peak / warmup_steps, end_value=peak,
                                 transition_steps=warmup_steps - 1)


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

    @property
    def lr_schedule(self) -> optax.Schedule:
        """The optax schedule of the learning rate (see the module doc)."""
        parts, boundaries = [], []
        if self.warmup_steps:
            parts.append(_warmup(self.peak_lr, self.warmup_steps))
            boundaries.append(self.warmup_steps)
        parts.append(optax.constant_schedule(self.peak_lr))
        if self.decay_steps:
            parts.append(optax.cosine_decay_schedule(self.peak_lr, self.decay_steps,
                                                     alpha=self.final_lr / self.peak_lr))
            boundaries.append(self.decay_start)
        else:
            # decay_steps=0: the plateau lasts to total_steps, then final_lr (as the formula).
            parts.append(optax.constant_schedule(self.final_lr))
            boundaries.append(self.total_steps)
        return optax.join_schedules(parts, boundaries)

    @property
    def mtp_schedule(self) -> optax.Schedule:
        return optax.join_schedules([optax.constant_schedule(self.mtp_weight),
                                     optax.constant_schedule(self.mtp_weight_decay)],
                                    [self.decay_start])

    def lr(self, step):
        """Learning rate at `step` (int or traced int array)."""
        return self.lr_schedule(step)

    def mtp(self, step):
        """MTP loss weight at `step`."""
        return self.mtp_schedule(step)

    __call__ = lr
