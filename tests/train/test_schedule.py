"""The optax-built schedules give the recipe's values (spec §11), written out here in float64."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.train.schedule import Schedule


def recipe_lr(step, *, peak, total, warmup, decay, final):
    """The recipe's learning rate, term by term (module doc of sparse_lm/train/schedule.py)."""
    decay_start = total - decay
    if step < warmup:
        return peak * (step + 1) / warmup
    if step < decay_start:
        return peak
    if step < total:
        frac = (step - decay_start) / decay
        return final + (peak - final) * (1 + math.cos(math.pi * frac)) / 2
    return final


CASES = [  # (peak, total, warmup, decay, final)
    (2e-3, 1000, 50, 300, 2e-4),      # configs/train_base.py's schedule
    (3e-3, 16, 2, 6, 3e-4),           # tests/train/tiny_train_config.py's
    (1.0, 10, 1, 9, 0.0),             # one warm-up step, decay to zero
    (1.0, 10, 0, 0, 0.5),             # no warm-up, no decay
    (0.5, 7, 7, 0, 0.0),              # warm-up to the last step
]


@pytest.mark.parametrize("peak,total,warmup,decay,final", CASES)
def test_optax_schedule_equals_the_recipe_at_every_phase_boundary(peak, total, warmup, decay,
                                                                  final):
    s = Schedule(peak_lr=peak, total_steps=total, warmup_steps=warmup, decay_steps=decay,
                 final_lr=final)
    start = total - decay
    steps = sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1, start - 1, start, start + 1,
                    (start + total) // 2, total - 1, total, total + 5} - {-1})
    for t in steps:
        want = recipe_lr(t, peak=peak, total=total, warmup=warmup, decay=decay, final=final)
        assert float(s.lr(t)) == pytest.approx(want, rel=1e-6, abs=1e-9), t
    # the same values traced (as the train step calls it, on the int32 step counter)
    traced = jax.jit(jax.vmap(s.lr))(jnp.asarray(steps, jnp.int32))
    np.testing.assert_allclose(np.asarray(traced), [float(s.lr(t)) for t in steps], rtol=1e-6)


def test_mtp_weight_switches_at_the_decay_start():
    s = Schedule(peak_lr=1.0, total_steps=100, warmup_steps=10, decay_steps=40, final_lr=0.1,
                 mtp_weight=0.3, mtp_weight_decay=0.1)
    assert [float(s.mtp(t)) for t in (0, 59, 60, 99)] == pytest.approx([0.3, 0.3, 0.1, 0.1])
