"""bench_train's bookkeeping (no timing): the dense arm's step-time budget projects quadratically
from the longest measured length and never skips the sparse arm, and the compiled memory
figure counts the donated state once (argument + output - alias + temp)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.benchlib import compiled_memory, over_budget   # bench_train's bookkeeping


def _row(seq, arm, step_s):
    return {"seq_len": seq, "arm": arm, "batch": 1, "step_s": step_s}


def test_dense_budget_projects_from_the_longest_shorter_length_and_spares_sparse():
    rows = [_row(8192, "dense", 20.0), _row(16384, "dense", 80.0), _row(16384, "sparse", 900.0)]
    skip = over_budget(rows, 65536, "dense", budget_s=900.0)
    assert skip["skipped"] and skip["projected_from_seq_len"] == 16384
    assert skip["projected_step_s"] == 80.0 * 16
    assert over_budget(rows, 32768, "dense", budget_s=900.0) is None          # 320 s fits
    assert over_budget(rows, 65536, "sparse", budget_s=1.0) is None
    assert over_budget(rows, 65536, "dense_noindex", budget_s=1.0) is None    # nothing measured


def test_compiled_memory_counts_donated_buffers_once():
    x = jnp.zeros((256, 256), jnp.float32)
    step = jax.jit(lambda a: (a @ a) + 1.0, donate_argnums=0).lower(x).compile()
    m = compiled_memory(step)
    assert m["compiled_argument_bytes"] == m["compiled_output_bytes"] == x.nbytes
    assert m["compiled_bytes"] == (m["compiled_argument_bytes"] + m["compiled_output_bytes"]
                                   - m["compiled_alias_bytes"] + m["compiled_temp_bytes"])
    assert m["compiled_bytes"] >= x.nbytes
