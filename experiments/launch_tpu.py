"""Launch a training run on Cloud TPU VM slices: print (with --run execute, with --dry_run
rehearse locally) the gcloud steps.

    python -m experiments.launch_tpu --name=v4flash --tpu=v5p-128 --zone=us-east5-a \
        --train_args="--config=configs/train_base.py --config.train.steps=1000" \
        --workdir=gs://my-bucket/runs/v4flash [--num_slices=2] [--steps=create,copy,...] [--run]

Steps (each one gcloud command; `--steps` picks a subset, in this order):
  create   one slice: gcloud compute tpus tpu-vm create (the TPU type's runtime image);
           N slices (--num_slices=N or --tpu=v5p-128x2): a queued resource of N nodes
           (gcloud compute tpus queued-resources create --node-count=N --node-prefix=NAME),
           waited for until it is ACTIVE; --spot optional
  copy     git archive of --ref (HEAD) -> tarball, scp to every worker (of every slice), unpack
           into --remote_dir (~/sparse-lm)
  install  `make .venv/.installed` (the Makefile's venv with the pinned requirements) on every
           worker; without a Python 3.12 there, tools/bootstrap.sh brings one (uv); says if
           nothing was to do
  start    python -m experiments.train ... on every worker, in the background, logging to
           ~/sparse-lm-train.log; its exit status goes to ~/sparse-lm-train.exit
  logs     follow the log of worker 0 until its run ends; exits with the run's status
  delete   gcloud compute tpus tpu-vm delete (queued-resources delete --force for N slices)

The training entry point is the same on every worker: with more than one worker it runs with
--distributed=on, and `jax.distributed.initialize()` finds the peers from the TPU metadata; on a
multi-slice queued resource the runtime also sets MEGASCALE_COORDINATOR_ADDRESS,
MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID, from which jax numbers the processes slice by slice
and the devices carry their `slice_index`. The sharding preset's `dcn` sizes then split the
slices (default: data parallel across slices, the outermost mesh factor; see
sparse_lm/sharding/mesh.py). The launcher checks before anything is created that the training
flags load and that the preset's mesh fits the chips of --tpu x --num_slices.

--dry_run rehearses the steps on this machine: each worker is a directory standing in for its
home and a process with CPU devices; `gcloud` is tools/launch/gcloud_stub.py (first on PATH),
which records every call and does the local equivalent (create: the worker homes; scp: copy;
ssh: run the command in the worker homes, with the coordinator variables a slice's runtime
gives: JAX_COORDINATOR_ADDRESS on localhost, JAX_NUM_PROCESSES, JAX_PROCESS_ID, MEGASCALE_*).
The rehearsal image has a venv already built (its python is this interpreter), so the install
step finds `.venv/.installed` up to date and says "nothing to do"; see docs/launch.md.

GPU clusters (no gcloud): start `python -m experiments.train` once per host with
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
        python -m experiments.train --distributed=on --config=... --workdir=...
(or SLURM / Open MPI, which jax.distributed.initialize detects itself); `--gpu_hosts` prints
these lines for a list of hosts.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from sparse_lm.aot.topology import TopologySpec, resolve_topology
from sparse_lm.sharding.mesh import ShardingError, mesh_shape
from sparse_lm.sharding.presets import load_preset
from sparse_lm.train.config_check import (ConfigOverrideError, UserError, _load as load_config_file,
                                          check_overrides, run_main)

# TPU VM software images per generation (Cloud TPU docs: "TPU software versions").
RUNTIME = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5",
           "v6e": "v2-alpha-tpuv6e"}
# Cloud accelerator-type names differ from the generation name for v5e (v5litepod-16).
ACCELERATOR_PREFIX = {"v5e": "v5litepod"}
STEPS = ("create", "copy", "install", "start", "logs", "delete")
TRAIN_CONFIG = "configs/train_base.py"        # experiments.train's default --config
REHEARSAL_MAX_WORKERS = 8                     # local worker processes a --dry_run starts at most
ROOT = Path(__file__).resolve().parents[1]
GCLOUD_STUB = ROOT / "tools" / "launch" / "gcloud_stub.py"

_NAME = flags.DEFINE_string("name", "sparse-lm", "TPU VM name (the queued resource and node "
                            "prefix with --num_slices > 1).")
_TPU = flags.DEFINE_string("tpu", "v5p-8", "Cloud TPU type of one slice, e.g. v5p-128, v6e-256 "
                           "(v5p-128x2 = 2 slices).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", None, "Number of slices joined over the "
                                   "data-center network (multi-slice; default: 1, or N of --tpu=TYPExN).")
_ZONE = flags.DEFINE_string("zone", None, "GCP zone, e.g. us-east5-a.")
_PROJECT = flags.DEFINE_string("project", "", "GCP project (default: gcloud's).")
_SPOT = flags.DEFINE_bool("spot", False, "Create Spot TPUs.")
_STEPS = flags.DEFINE_string("steps", "create,copy,install,start,logs",
                             f"Comma-separated subset of {','.join(STEPS)}.")
_TRAIN_ARGS = flags.DEFINE_string("train_args", f"--config={TRAIN_CONFIG}",
                                  "Arguments for python -m experiments.train.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Run directory, the same for every worker (gs://... "
                               "so that all hosts see it and checkpoints survive the VMs).")
_REMOTE_DIR = flags.DEFINE_string("remote_dir", "~/sparse-lm", "Code directory on the workers.")
_REF = flags.DEFINE_string("ref", "HEAD", "Git revision whose files the copy step ships "
                           "(uncommitted changes are not shipped).")
_RUN = flags.DEFINE_bool("run", False, "Execute the commands (default: only print them).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Rehearse: execute the commands against local "
                             "workers (processes with CPU devices, one directory each) with gcloud "
                             "replaced by the recording stub tools/launch/gcloud_stub.py.")
_DRY_RUN_DIR = flags.DEFINE_string("dry_run_dir", "", "Directory of a --dry_run: the workers' "
                                   "homes and the record of the gcloud calls (default: a new "
                                   "temporary directory; reuse one to run further steps).")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 1, "CPU devices of each local worker "
                                        "in a --dry_run.")
_GPU_HOSTS = flags.DEFINE_string("gpu_hosts", "", "Comma-separated GPU hosts: print the per-host "
                                 "launch lines instead of the TPU steps.")
_PORT = flags.DEFINE_integer("port", 1234, "Coordinator port for --gpu_hosts.")

LOG = "~/sparse-lm-train.log"
EXIT_FILE = "~/sparse-lm-train.exit"    # the exit status of the run, written when it ends
REMOTE_TARBALL = "sparse-lm.tar.gz"     # in each worker's home
# The install step on each worker: the Makefile's venv (pinned requirements.txt, libtpu included)
# from a Python 3.12 that tools/python312.sh finds or, on a stock image without one,
# tools/bootstrap.sh installs (uv + a managed 3.12). Idempotent; it says which of the two it did.
INSTALL = ("command -v make >/dev/null || { echo 'error: make is not installed on this worker "
           "(sudo apt-get install -y make)' >&2; exit 1; }; "
           "if make -q .venv/.installed 2>/dev/null; then "
           "echo 'install: .venv is up to date with requirements.txt and setup.py (nothing to do)'; "
           "else make .venv/.installed && echo 'install: .venv/.installed built from requirements.txt'; fi")


@dataclasses.dataclass(frozen=True)
class Target:
    """What the steps run on: `num_slices` slices of one TPU type."""
    spec: TopologySpec              # one slice
    num_slices: int

    @property
    def hosts_per_slice(self) -> int:
        return hosts_per_slice(self.spec)

    @property
    def workers(self) -> int:
        """TPU VM hosts in all slices = processes of the run."""
        return self.hosts_per_slice * self.num_slices

    @property
    def devices(self) -> int:
        """JAX devices of the run (one per chip on every generation here)."""
        return self.spec.chips * self.num_slices

    @property
    def accelerator_type(self) -> str:
        """The Cloud name of one slice (v5p-128, v5litepod-16)."""
        chip = self.spec.chip
        n = self.spec.chips * 2 if chip.name_counts_cores else self.spec.chips
        return f"{ACCELERATOR_PREFIX.get(self.spec.generation, self.spec.generation)}-{n}"


def hosts_per_slice(spec: TopologySpec) -> int:
    """TPU VM hosts of one slice: 4 chips per host, except v5e / v6e slices of up to 8 chips,
    which are one host."""
    if spec.generation in ("v5e", "v6e") and spec.chips <= 8:
        return 1
    return max(1, spec.chips // 4)


def resolve_target(tpu: str, num_slices: int | None = None) -> Target:
    """--tpu (a Cloud TPU type, optionally TYPExN) and --num_slices -> Target; bad or
    contradicting values raise ShardingError naming the flag and the allowed values."""
    if ":" in tpu:
        raise ShardingError(f"--tpu={tpu!r}: give a Cloud TPU type such as v5p-128 or v6e-256, "
                            f"not a topology string")
    spec = resolve_topology(tpu)
    if num_slices is not None:
        if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
            raise ShardingError(f"--num_slices={num_slices!r} is invalid: the number of slices is "
                                f"an integer >= 1 (1 = a single slice)")
        if spec.slices > 1 and num_slices != spec.slices:
            raise ShardingError(f"--tpu={tpu} names {spec.slices} slices but --num_slices="
                                f"{num_slices}; give the slice count once (--tpu="
                                f"{tpu.rsplit('x', 1)[0]} --num_slices=N, or --tpu=TYPExN)")
    return Target(dataclasses.replace(spec, slices=1), num_slices or spec.slices)


def target_from_accelerator_type(accelerator_type: str, num_slices: int = 1) -> Target:
    """The Target of a Cloud accelerator-type name (what `create` passes; v5litepod-16 too)."""
    for gen, prefix in ACCELERATOR_PREFIX.items():
        if accelerator_type.startswith(prefix + "-"):
            accelerator_type = gen + accelerator_type[len(prefix):]
    return resolve_target(accelerator_type, num_slices)


def _flag_value(args: list[str], name: str) -> str | None:
    """The last `--name=value` in args (None when absent)."""
    value = None
    for a in args:
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
    return value


def check_training(target: Target, train_args: str, workdir: str, *, rehearsal: bool) -> None:
    """Before anything is created: the training flags load (config file, overrides), every
    worker writes to one run directory, and the sharding preset's mesh fits the devices."""
    try:
        args = shlex.split(train_args)
    except ValueError as e:
        raise UserError(f"--train_args={train_args!r} cannot be split into arguments: {e}") from None
    try:
        check_overrides(["experiments.train"] + args, default_config=TRAIN_CONFIG)
    except ConfigOverrideError as e:
        raise UserError(f"--train_args: {str(e).removeprefix('error: ')}") from None
    run_dir = workdir or _flag_value(args, "workdir")
    if not run_dir:
        raise UserError("--workdir is required for the start step (or --workdir=... in "
                        "--train_args): the run directory of every worker")
    if target.workers > 1:
        if rehearsal and not os.path.isabs(run_dir) and not run_dir.startswith("gs://"):
            raise UserError(f"--workdir={run_dir}: the {target.workers} local workers of a "
                            f"--dry_run share a run directory only as an absolute path")
        if not rehearsal and not run_dir.startswith("gs://"):
            raise UserError(f"--workdir={run_dir}: a run over {target.workers} hosts needs a "
                            f"directory every host sees: give gs://BUCKET/PATH")
    sharding = _flag_value(args, "config.sharding")
    if sharding is None:
        cfg = load_config_file((_flag_value(args, "config") or TRAIN_CONFIG).split(":")[0])
        sharding = cfg.get("sharding") or None
    if sharding:
        preset = load_preset(str(sharding))
        try:
            mesh_shape(preset.ici, preset.dcn, target.devices, target.num_slices)
        except ShardingError as e:
            raise ShardingError(f"--config.sharding={sharding} on --tpu={target.accelerator_type}"
                                f" x --num_slices={target.num_slices} ({target.devices} chips): "
                                f"{e}") from None


def tpu_commands(name: str, tpu: str, zone: str, *, project: str = "", spot: bool = False,
                 steps=STEPS, train_args: str = "", workdir: str = "",
                 remote_dir: str = "~/sparse-lm", num_slices: int | None = None,
                 tarball: str = "", ref: str = "HEAD",
                 rehearsal: bool = False) -> list[tuple[str, list[str] | str]]:
    """[(step, command)] for the chosen steps; a command is an argv list or a shell string.

    tarball: the local path `copy` writes the code archive to (default /tmp/NAME-code.tar.gz);
    ref: the git revision archived.
    rehearsal: the workers are local (--dry_run): the run directory may be a local absolute path.
    """
    target = resolve_target(tpu, num_slices)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ShardingError(f"unknown step(s) {unknown}; valid steps: {list(STEPS)}")
    if not zone:
        raise ShardingError("--zone is required (e.g. us-east5-a for v5p, us-east1-d for v6e)")
    if "start" in steps:
        check_training(target, train_args, workdir, rehearsal=rehearsal)
    where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])
    if target.num_slices > 1:    # multi-slice: a queued resource of N nodes (one per slice)
        base = ["gcloud", "compute", "tpus", "queued-resources"]
        every, first = ["--node=all", "--worker=all"], ["--node=0", "--worker=0"]
        describe = shlex.join(base + ["describe", name] + where + ["--format=value(state.state)"])
        create = (shlex.join(base + ["create", name] + where + [
            f"--accelerator-type={target.accelerator_type}",
            f"--runtime-version={RUNTIME[target.spec.generation]}",
            f"--node-count={target.num_slices}", f"--node-prefix={name}"]
            + (["--spot"] if spot else []))
            + f" && while :; do s=$({describe}) || exit 1; case $s in ACTIVE) break;; "
              f"FAILED|SUSPENDED|SUSPENDING) echo \"error: queued resource {name} is $s\" >&2; "
              f"exit 1;; esac; echo \"create: queued resource {name} is $s, waiting\"; "
              f"sleep 30; done")
        delete = base + ["delete", name] + where + ["--force", "--quiet"]
    else:
        base = ["gcloud", "compute", "tpus", "tpu-vm"]
        every, first = ["--worker=all"], ["--worker=0"]
        create = base + ["create", name] + where + [f"--accelerator-type={target.accelerator_type}",
                                                    f"--version={RUNTIME[target.spec.generation]}"] \
            + (["--spot"] if spot else [])
        delete = base + ["delete", name] + where + ["--quiet"]
    ssh = base + ["ssh", name] + where
    tarball = tarball or f"/tmp/{name}-code.tar.gz"
    train = f".venv/bin/python -m experiments.train {train_args}" + (
        f" --workdir={workdir}" if workdir else "") + (
        " --distributed=on" if target.workers > 1 else "")
    cmds = {
        "create": create,
        "copy": (f"git archive --format=tar.gz -o {shlex.quote(tarball)} {shlex.quote(ref)} && "
                 + shlex.join(base + ["scp", tarball, f"{name}:{REMOTE_TARBALL}"] + where + every)
                 + " && " + shlex.join(ssh + every + [
                     "--command", f"mkdir -p {remote_dir} && tar -xzf {REMOTE_TARBALL} -C {remote_dir}"])),
        "install": ssh + every + ["--command", f"cd {remote_dir} && {{ {INSTALL}; }}"],
        "start": ssh + every + ["--command", f"cd {remote_dir} && rm -f {EXIT_FILE} && setsid nohup "
                                f"bash -c {shlex.quote(f'{train}; echo $? > {EXIT_FILE}')} "
                                f"> {LOG} 2>&1 < /dev/null &"],
        # tail until the run's exit file appears (tail --pid follows a waiter that ends then)
        "logs": ssh + first + ["--command", f"( while [ ! -e {EXIT_FILE} ]; do sleep 1; done ) & "
                               f"tail -n 200 -F --pid=$! {LOG}; exit $(cat {EXIT_FILE})"],
        "delete": delete,
    }
    return [(s, cmds[s]) for s in STEPS if s in steps]


def rehearsal_env(root: Path, remote_dir: str, devices: int) -> dict:
    """The environment of a --dry_run in `root`: `gcloud` on PATH is the recording stub, which
    keeps the workers' homes and its record (gcloud_calls.jsonl) in `root`."""
    if not remote_dir.startswith("~/"):
        raise UserError(f"--remote_dir={remote_dir}: a --dry_run puts the code under each local "
                        f"worker's home: give ~/DIR")
    if devices < 1:
        raise UserError(f"--dry_run_devices={devices}: give the CPU devices per worker, >= 1")
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                      f"{shlex.quote(str(GCLOUD_STUB))} \"$@\"\n")
    gcloud.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                SPARSE_LM_REHEARSAL_DIR=str(root), SPARSE_LM_REHEARSAL_CODE_DIR=remote_dir,
                SPARSE_LM_REHEARSAL_DEVICES=str(devices))


def execute(cmds, env: dict | None = None) -> None:
    """Run the steps in order; the first failing one ends the launch with its exit status."""
    for step, cmd in cmds:
        print(f"# {step}\n{_show(cmd)}", flush=True)
        r = subprocess.run(cmd, shell=isinstance(cmd, str), env=env)
        if r.returncode:
            print(f"[launch_tpu] step {step} failed with exit code {r.returncode}", file=sys.stderr)
            sys.exit(r.returncode)


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
    if _RUN.value and _DRY_RUN.value:
        raise UserError("--run and --dry_run exclude each other: --run executes on Cloud TPU, "
                        "--dry_run rehearses on local workers")
    root = None
    if _DRY_RUN.value:
        target = resolve_target(_TPU.value, _NUM_SLICES.value)
        if target.workers > REHEARSAL_MAX_WORKERS:
            raise UserError(f"--dry_run: --tpu={_TPU.value} x --num_slices={target.num_slices} "
                            f"has {target.workers} hosts; a rehearsal starts at most "
                            f"{REHEARSAL_MAX_WORKERS} local workers (e.g. --tpu=v5p-16: 2 hosts)")
        root = Path(_DRY_RUN_DIR.value or tempfile.mkdtemp(prefix="sparse-lm-rehearsal-")).resolve()
    cmds = tpu_commands(_NAME.value, _TPU.value, _ZONE.value, project=_PROJECT.value,
                        spot=_SPOT.value,
                        steps=[s.strip() for s in _STEPS.value.split(",") if s.strip()],
                        train_args=_TRAIN_ARGS.value, workdir=_WORKDIR.value,
                        remote_dir=_REMOTE_DIR.value, num_slices=_NUM_SLICES.value,
                        tarball=str(root / "code.tar.gz") if root else "", ref=_REF.value,
                        rehearsal=root is not None)
    if root is not None:
        env = rehearsal_env(root, _REMOTE_DIR.value, _DRY_RUN_DEVICES.value)
        print(f"[launch_tpu] rehearsal in {root} (gcloud calls: {root / 'gcloud_calls.jsonl'})",
              flush=True)
        execute(cmds, env)
    elif _RUN.value:
        execute(cmds)
    else:
        for step, cmd in cmds:
            print(f"# {step}\n{_show(cmd)}")


if __name__ == "__main__":
    run_main(main, config_flag=None, user_errors=(ShardingError,))
