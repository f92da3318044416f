"""Launch a training run on a Cloud TPU VM slice: print (and with --run execute) the gcloud steps.

    python -m experiments.launch_tpu --name=v4flash --tpu=v5p-128 --zone=us-east5-a \
        --train_args="--config=configs/train_base.py --config.train.steps=1000" \
        --workdir=gs://my-bucket/runs/v4flash [--steps=create,copy,install,start,logs] [--run]

Steps (each one gcloud command; `--steps` picks a subset, in this order):
  create   gcloud compute tpus tpu-vm create (the TPU type's runtime image; --spot optional)
  copy     git archive of HEAD -> tarball, scp to every worker, unpack into ~/sparse-lm
  install  `make .venv/.installed` (the Makefile's venv with the pinned requirements) on every worker;
           without a Python 3.12 there, tools/bootstrap.sh brings one (uv); says if nothing was to do
  start    python -m experiments.train ... on --worker=all, in the background, logging to a file
  logs     tail the log of worker 0
  delete   gcloud compute tpus tpu-vm delete

The training entry point is the same on every worker: each process finds its peers through
`jax.distributed.initialize()` (the TPU metadata), feeds its own rows and runs the same program.
No cluster manager of ours is involved.

GPU clusters (no gcloud): start `python -m experiments.train` once per host with
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
        python -m experiments.train --distributed=on --config=... --workdir=...
(or SLURM / Open MPI, which jax.distributed.initialize detects itself); `--gpu_hosts` prints
these lines for a list of hosts.
"""
from __future__ import annotations

import shlex
import subprocess
import sys

from absl import app, flags

from sparse_lm.aot.topology import resolve_topology
from sparse_lm.sharding.mesh import ShardingError
from sparse_lm.train.config_check import run_main

# TPU VM software images per generation (Cloud TPU docs: "TPU software versions").
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
STEPS = ("create", "copy", "install", "start", "logs", "delete")

_NAME = flags.DEFINE_string("name", "sparse-lm", "TPU VM name.")
_TPU = flags.DEFINE_string("tpu", "v5p-8", "Cloud TPU accelerator type, e.g. v5p-128, v6e-256.")
_ZONE = flags.DEFINE_string("zone", None, "GCP zone, e.g. us-east5-a.")
_PROJECT = flags.DEFINE_string("project", "", "GCP project (default: gcloud's).")
_SPOT = flags.DEFINE_bool("spot", False, "Create a Spot TPU.")
_STEPS = flags.DEFINE_string("steps", "create,copy,install,start,logs",
                             f"Comma-separated subset of {','.join(STEPS)}.")
_TRAIN_ARGS = flags.DEFINE_string("train_args", "--config=configs/train_base.py",
                                  "Arguments for python -m experiments.train.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory on every worker (use gs://... so "
                               "checkpoints survive the VM).")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "~/sparse-lm", "Code directory on the workers.")
_RUN = flags.DEFINE_bool("run", False, "Execute the commands (default: only print them).")
_GPU_HOSTS = flags.DEFINE_string("gpu_hosts", "", "Comma-separated GPU hosts: print the per-host "
                                 "launch lines instead of the TPU steps.")
_PORT = flags.DEFINE_integer("port", 1234, "Coordinator port for --gpu_hosts.")

LOG = "~/sparse-lm-train.log"
# The install step on each worker: the Makefile's venv (pinned requirements.txt, libtpu included)
# from a Python 3.12 that tools/python312.sh finds or, on a stock image without one,
# tools/bootstrap.sh installs (uv + a managed 3.12). Idempotent; it says which of the two it did.
INSTALL = ("command -v make >/dev/null || { echo 'error: make is not installed on this worker "
           "(sudo apt-get install -y make)' >&2; exit 1; }; "
           "if make -q .venv/.installed 2>/dev/null; then "
           "echo 'install: .venv is up to date with requirements.txt and setup.py (nothing to do)'; "
           "else make .venv/.installed && echo 'install: .venv/.installed built from requirements.txt'; fi")


def tpu_commands(name: str, tpu: str, zone: str, *, project: str = "", spot: bool = False,
                 steps=STEPS, train_args: str = "", workdir: str = "",
                 remote_dir: str = "~/sparse-lm") -> list[tuple[str, list[str] | str]]:
    """[(step, command)] for the chosen steps; a command is an argv list or a shell string."""
    spec = resolve_topology(tpu)
    if spec.slices != 1 or ":" in tpu:
        raise ShardingError(f"--tpu={tpu!r}: give a single-slice Cloud TPU type such as v5p-128 "
                            f"(multi-slice needs queued resources, not covered here)")
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ShardingError(f"unknown step(s) {unknown}; valid steps: {list(STEPS)}")
    if not zone:
        raise ShardingError("--zone is required (e.g. us-east5-a for v5p, us-east1-d for v6e)")
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    ssh = base + ["ssh", name] + where + ["--worker=all"]
    tarball = "/tmp/sparse-lm.tar.gz"
    train = f"python -m experiments.train {train_args}" + (f" --workdir={workdir}" if workdir else "")
    cmds = {
        "create": base + ["create", name] + where + [f"--accelerator-type={tpu}",
                                                    f"--version={RUNTIME[spec.generation]}"]
        + (["--spot"] if spot else []),
        "copy": (f"git archive --format=tar.gz -o {tarball} HEAD && "
                 + shlex.join(base + ["scp", tarball, f"{name}:/tmp/"] + where + ["--worker=all"])
                 + " && " + shlex.join(ssh + ["--command",
                                               f"mkdir -p {remote_dir} && tar -xzf {tarball} -C {remote_dir}"])),
        "install": ssh + ["--command", f"cd {remote_dir} && {{ {INSTALL}; }}"],
        "start": ssh + ["--command",
                        f"cd {remote_dir} && setsid nohup .venv/bin/{train} > {LOG} 2>&1 < /dev/null &"],
        "logs": base + ["ssh", name] + where + ["--worker=0", "--command", f"tail -n 200 -f {LOG}"],
        "delete": base + ["delete", name] + where + ["--quiet"],
    }
    return [(s, cmds[s]) for s in STEPS if s in steps]


def gpu_lines(hosts: list[str], port: int, train_args: str, workdir: str) -> list[str]:
    coord = f"{hosts[0]}:{port}"
    train = f"python -m experiments.train --distributed=on {train_args}" + (
        f" --workdir={workdir}" if workdir else "")
    return [f"# on {h}:\nJAX_COORDINATOR_ADDRESS={coord} JAX_NUM_PROCESSES={len(hosts)} "
            f"JAX_PROCESS_ID={i} {train}" for i, h in enumerate(hosts)]


def _show(cmd) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
    if _GPU_HOSTS.value:
        print("\n".join(gpu_lines([h for h in _GPU_HOSTS.value.split(",") if h], _PORT.value,
                                  _TRAIN_ARGS.value, _WORKDIR.value)))
        return
    try:
        cmds = tpu_commands(_NAME.value, _TPU.value, _ZONE.value, project=_PROJECT.value,
                            spot=_SPOT.value, steps=[s.strip() for s in _STEPS.value.split(",") if s.strip()],
                            train_args=_TRAIN_ARGS.value, workdir=_WORKDIR.value,
                            remote_dir=_REMOTE_DIR.value)
    except ShardingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for step, cmd in cmds:
        print(f"# {step}\n{_show(cmd)}")
        if _RUN.value:
            r = subprocess.run(cmd, shell=isinstance(cmd, str))
            if r.returncode:
                print(f"[launch_tpu] step {step} failed with exit code {r.returncode}", file=sys.stderr)
                sys.exit(r.returncode)


if __name__ == "__main__":
    run_main(main, config_flag=None, user_errors=(ShardingError,))
