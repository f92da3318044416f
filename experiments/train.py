"""Train a DeepSeek-V4-style model from a config file.

    python -m experiments.train --config=configs/demo.py --workdir=runs/demo \
        [--config.train.steps=200 --config.model.hidden_size=128 ...]

The same entry point runs on a laptop CPU, a GPU, and every host of a Cloud TPU slice: with
several processes (detected from the environment, or --distributed=on) it first calls
`jax.distributed.initialize()`. Re-running with the same workdir resumes from its latest
checkpoint (the newest readable one; --config.train.restore_step=N picks one). Everything is
validated (config, schedule, data sources, checkpoint compatibility) before anything is written;
then the resolved config is written to <workdir>/config.json (and a copy per start to
<workdir>/config_history/).

Errors: a bad flag, config field, file or checkpoint is one line naming it, exit status 2; a run
that diverges is one line, exit status 1; --verbose adds the traceback.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from sparse_lm.train.config_check import main_guard, EXIT_FAILED, EXIT_USER, exit_with, run_main

if __name__ == "__main__":      # before the flags: config_flags applies the overrides to a
    main_guard(default_config="configs/train_base.py")   # default config file when the flag is defined

_CONFIG = config_flags.DEFINE_config_file("config", "configs/train_base.py",
                                          "Experiment config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).",
                               required=True)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Call jax.distributed.initialize(): auto = when the environment "
                                 "describes a multi-process job.")

# GPU clusters without a scheduler jax detects: coordinator, process count and id from flags or
# the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes (default: $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "This process's id (default: $JAX_PROCESS_ID).")

# Environment variables that describe a multi-process job (Cloud TPU slices are detected by
# jax.distributed.initialize itself from the TPU metadata).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _is_multiprocess_env() -> bool:
    if any(os.environ.get(k) for k in _MULTI_PROCESS_ENV):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(k, "1") or 1) > 1:
            return True
    return False


def maybe_initialize_distributed(mode: str) -> bool:
    # jax and the library are imported only once flags are parsed and jax.distributed is set up
    import jax
    if mode == "on" or (mode == "auto" and (_is_multiprocess_env() or _COORDINATOR.value)):
        def from_env(value, key, kind=str):
            return value if value is not None else (kind(os.environ[key]) if os.environ.get(key) else None)
        jax.distributed.initialize(
            coordinator_address=from_env(_COORDINATOR.value, "JAX_COORDINATOR_ADDRESS"),
            num_processes=from_env(_NUM_PROCESSES.value, "JAX_NUM_PROCESSES", int),
            process_id=from_env(_PROCESS_ID.value, "JAX_PROCESS_ID", int))
        return True
    return False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    multi = maybe_initialize_distributed(_DISTRIBUTED.value)
    # after jax.distributed.initialize: it must run before anything touches a backend
    import jax
    from sparse_lm.train.loop import RUN_ERRORS, USER_ERRORS, train
    if jax.process_index() == 0:
        print(f"[launch] backend {jax.default_backend()}, {jax.device_count()} device(s), "
              f"{jax.process_count()} process(es){' (jax.distributed)' if multi else ''}; "
              f"workdir {_WORKDIR.value}", flush=True)
    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except USER_ERRORS as e:             # a clear one-line error, no traceback
        exit_with(e, EXIT_USER)
    except RUN_ERRORS as e:
        exit_with(e, EXIT_FAILED, with_type=True)
    if jax.process_index() == 0:
        print(summary["line"], flush=True)


if __name__ == "__main__":
    run_main(main, default_config="configs/train_base.py")
