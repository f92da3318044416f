"""Distil domain specialists into one student (sparse_lm/distill/loop.py).

    python -m experiments.distill --config=configs/distill/recipe.py --workdir=DIR \
        [--config.distill.mode=on_policy|off_policy|sft --config.train.steps=N ...]

Every step samples completions from the current student (the cached Decoder), scores them with
the teacher of each prompt's domain and updates the student on the per-token reverse KL.
Re-running with the same workdir resumes from its latest checkpoint. A domain without a teacher,
a teacher with another vocabulary, an empty prompt source or an incompatible checkpoint is one
line naming it, exit status 2, before any compute.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from sparse_lm.train.config_check import main_guard, run_main

DEFAULT_CONFIG = "configs/distill/recipe.py"
if __name__ == "__main__":      # before the flags: the overrides apply to the default config file
    main_guard(default_config=DEFAULT_CONFIG)

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                          "Distillation config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).",
                               required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    from sparse_lm.distill.loop import distill     # after flag parsing: jax starts here
    print(distill(_CONFIG.value, _WORKDIR.value)["line"], flush=True)


if __name__ == "__main__":
    # imported here so that --help and flag errors do not start jax
    from sparse_lm.train.loop import RUN_ERRORS, USER_ERRORS
    run_main(main, default_config=DEFAULT_CONFIG, user_errors=USER_ERRORS,
             runtime_errors=RUN_ERRORS)
