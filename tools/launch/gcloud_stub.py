"""`gcloud` for the launcher's rehearsal (`launch_tpu --dry_run`): records every call and does on
this machine what gcloud does on a Cloud TPU slice.

    SPARSE_LM_REHEARSAL_DIR=DIR gcloud_stub.py compute tpus tpu-vm ssh NAME --worker=all --command=CMD

DIR/gcloud_calls.jsonl gets one line per call ({"argv": [...]}, the arguments after `gcloud`),
written before the call is carried out, so a failing call is recorded too. The slice is played
by directories and processes:

  tpu-vm create NAME --accelerator-type=T      one node NAME with one worker per host of T
  queued-resources create QR --node-count=N --node-prefix=P
                                               N nodes P-0 .. P-(N-1) (one per slice)
  queued-resources describe QR                 prints ACTIVE (what --format=value(state.state) shows)
  ... scp SRC NAME:DEST [--worker=] [--node=]  copies SRC to DEST under each chosen worker's home
  ... ssh NAME [--worker=] [--node=] --command=CMD
                                               runs `bash -c CMD` in each chosen worker's home,
                                               all at once, with that worker's environment
  ... delete NAME                              removes the node(s) and their homes

A worker's home is DIR/workers/<node>/<worker>; remote paths are under it (~/x, x, and /x alike).
Its environment is this one without PYTHONPATH / VIRTUAL_ENV (a worker runs its own copy of the
code) plus what a slice's runtime provides: HOME, TPU_WORKER_ID, and the coordinator variables
jax.distributed reads -- JAX_COORDINATOR_ADDRESS (localhost, a free port per ssh call),
JAX_NUM_PROCESSES, JAX_PROCESS_ID (slice-major: slice * hosts per slice + worker) -- with
MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID on queued resources,
JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES=$SPARSE_LM_REHEARSAL_DEVICES.

The image of a created worker has a venv already built at $SPARSE_LM_REHEARSAL_CODE_DIR/.venv
(the code directory the launcher copies to): its python runs this interpreter and its
.installed stamp is written at create, so `make -q .venv/.installed` is up to date after the
copy (the archive's files carry the older commit time) and the install step says "nothing to
do" instead of building a venv from PyPI per worker. That python refuses `-m pip`: a stale stamp
makes the install step fail instead of changing the interpreter's own environment.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GROUPS = ("tpu-vm", "queued-resources")


class StubError(Exception):
    pass


def _root() -> Path:
    d = os.environ.get("SPARSE_LM_REHEARSAL_DIR")
    if not d:
        raise StubError("SPARSE_LM_REHEARSAL_DIR is not set (run through launch_tpu --dry_run)")
    return Path(d)


def _load_state(root: Path) -> dict:
    p = root / "state.json"
    return json.loads(p.read_text()) if p.exists() else {"nodes": {}, "queued": {}}


def _save_state(root: Path, state: dict) -> None:
    (root / "state.json").write_text(json.dumps(state, indent=1))


def _parse(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """(positional arguments, {flag: value}); `--flag value` for --command, `--flag` alone = ''."""
    pos, opts, i = [], {}, 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            key, eq, val = a[2:].partition("=")
            if not eq and key == "command" and i + 1 < len(args):
                val, i = args[i + 1], i + 1
            opts[key] = val
        else:
            pos.append(a)
        i += 1
    return pos, opts


def _image(home: Path) -> None:
    """A worker's home as the rehearsal image has it: a built venv in the code directory."""
    code = os.environ.get("SPARSE_LM_REHEARSAL_CODE_DIR", "~/sparse-lm")
    venv = home / code.removeprefix("~/") / ".venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/bin/sh\n"
        "if [ \"$1\" = -m ] && [ \"$2\" = pip ]; then\n"
        "  echo 'rehearsal: pip does not run on a local worker (this venv is the interpreter of "
        "the launcher; its .installed stamp is older than requirements.txt or setup.py)' >&2\n"
        "  exit 1\nfi\n"
        f"exec {shlex.quote(sys.executable)} \"$@\"\n")
    python.chmod(0o755)
    (venv / ".installed").touch()


def _create(root: Path, state: dict, group: str, pos: list[str], opts: dict) -> None:
    # lazily: only create needs the TPU type tables (they import jax, seconds per call)
    sys.path.insert(0, str(REPO))
    from experiments.launch_tpu import target_from_accelerator_type
    if not pos or "accelerator-type" not in opts:
        raise StubError("create needs a NAME and --accelerator-type")
    name = pos[0]
    if group == "tpu-vm":
        nodes = [name]
    elif "node-count" in opts:
        nodes = [f"{opts.get('node-prefix', name)}-{k}" for k in range(int(opts["node-count"]))]
    else:
        nodes = [opts.get("node-id", name)]
    target = target_from_accelerator_type(opts["accelerator-type"])
    taken = [n for n in nodes if n in state["nodes"]] + ([name] if name in state["queued"] else [])
    if taken:
        raise StubError(f"already exists: {taken}")
    for k, node in enumerate(nodes):
        homes = []
        for w in range(target.hosts_per_slice):
            home = root / "workers" / node / f"w{w}"
            home.mkdir(parents=True)
            _image(home)
            homes.append(str(home))
        state["nodes"][node] = {"slice": k, "homes": homes}
    if group == "queued-resources":
        state["queued"][name] = nodes
    print(f"Created {group} {name}: {len(nodes)} node(s) x {target.hosts_per_slice} worker(s) "
          f"under {root / 'workers'}")


def _select(state: dict, group: str, name: str, opts: dict) -> list[dict]:
    """The chosen workers of NAME: [{home, env}] with the environment a slice's runtime gives."""
    if group == "queued-resources":
        if name not in state["queued"]:
            raise StubError(f"queued resource {name!r} not found (created: {sorted(state['queued'])})")
        nodes = state["queued"][name]
    else:
        if name not in state["nodes"]:
            raise StubError(f"TPU {name!r} not found (created: {sorted(state['nodes'])})")
        nodes = [name]
    hosts = len(state["nodes"][nodes[0]]["homes"])
    node_opt, worker_opt = opts.get("node", "0"), opts.get("worker", "0")
    with socket.socket() as s:       # the coordinator of this call: process 0, on localhost
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = []
    for k, node in enumerate(nodes):
        if node_opt != "all" and int(node_opt) != k:
            continue
        for w, home in enumerate(state["nodes"][node]["homes"]):
            if worker_opt != "all" and int(worker_opt) != w:
                continue
            env = dict(base, HOME=home, TPU_WORKER_ID=str(w), JAX_PLATFORMS="cpu",
                       JAX_NUM_CPU_DEVICES=os.environ.get("SPARSE_LM_REHEARSAL_DEVICES", "1"),
                       JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(hosts * len(nodes)),
                       JAX_PROCESS_ID=str(k * hosts + w))
            if group == "queued-resources":
                env.update(MEGASCALE_COORDINATOR_ADDRESS="127.0.0.1",
                           MEGASCALE_NUM_SLICES=str(len(nodes)), MEGASCALE_SLICE_ID=str(k))
            out.append({"home": Path(home), "env": env})
    if not out:
        raise StubError(f"no worker matches --node={node_opt} --worker={worker_opt} in {name}")
    return out


def _remote(home: Path, path: str) -> Path:
    return home / path.removeprefix("~").lstrip("/")


def _scp(state: dict, group: str, pos: list[str], opts: dict) -> None:
    if len(pos) < 2 or ":" not in pos[-1]:
        raise StubError("scp copies local files to NAME:DEST (only uploads are rehearsed)")
    name, dest = pos[-1].split(":", 1)
    for w in _select(state, group, name, opts):
        target = _remote(w["home"], dest)
        for src in pos[:-1]:
            to = target / Path(src).name if (not dest or dest.endswith("/") or target.is_dir()) else target
            to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, to)


def _ssh(state: dict, group: str, pos: list[str], opts: dict) -> int:
    if not pos or "command" not in opts:
        raise StubError("ssh is rehearsed with a command: ssh NAME --command=CMD")
    workers = _select(state, group, pos[0], opts)
    procs = [subprocess.Popen(["bash", "-c", opts["command"]], cwd=w["home"], env=w["env"])
             for w in workers]
    return max(p.wait() for p in procs)


def _delete(root: Path, state: dict, group: str, pos: list[str]) -> None:
    name = pos[0] if pos else ""
    nodes = state["queued"].pop(name, None) if group == "queued-resources" else (
        [name] if name in state["nodes"] else None)
    if nodes is None:
        raise StubError(f"{group} {name!r} not found")
    for node in nodes:
        state["nodes"].pop(node, None)
        shutil.rmtree(root / "workers" / node, ignore_errors=True)
    print(f"Deleted {group} {name}")


def main(args: list[str]) -> int:
    root = _root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "gcloud_calls.jsonl", "a") as f:
        f.write(json.dumps({"argv": args}) + "\n")
    if args[:2] != ["compute", "tpus"] or len(args) < 4 or args[2] not in GROUPS:
        raise StubError(f"not rehearsed: gcloud {shlex.join(args)} (only compute tpus "
                        f"{'/'.join(GROUPS)} create, describe, scp, ssh, delete)")
    group, verb = args[2], args[3]
    pos, opts = _parse(args[4:])
    state = _load_state(root)
    if verb == "create":
        _create(root, state, group, pos, opts)
    elif verb == "describe" and group == "queued-resources":
        _select(state, group, pos[0] if pos else "", {"node": "all", "worker": "all"})
        print("ACTIVE")
        return 0
    elif verb == "scp":
        _scp(state, group, pos, opts)
    elif verb == "ssh":
        return _ssh(state, group, pos, opts)
    elif verb == "delete":
        _delete(root, state, group, pos)
    else:
        raise StubError(f"not rehearsed: gcloud compute tpus {group} {verb}")
    _save_state(root, state)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (StubError, ValueError) as e:   # ValueError: a bad --accelerator-type
        print(f"ERROR: (gcloud stub) {e}", file=sys.stderr)
        sys.exit(1)
