"""The grain input pipeline resumes bitwise on 2 processes: a run SIGKILLed mid-epoch and
restarted from its newest checkpoint reads, on every process, exactly the batches of an
uninterrupted run (tests/data/grain_resume_worker.py: the training loop's checkpointing of every
process's iterator state, without a model).

~60 s on 2 busy cores (three 2-process launches, no compilation).
"""
import socket
import subprocess
import sys

from tests.sharding.helpers import ROOT, worker_env

STEPS, KILL_AT = 30, 14


def _launch(workdir, kill_at=0):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = worker_env(devices=1)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.data.grain_resume_worker", str(pid),
                               "2", str(port), str(workdir), str(STEPS), str(kill_at)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs


def _batches(workdir, pid):
    """{step: (epoch, digest)}, the last record of each step (a resumed run reads it again)."""
    out = {}
    for line in (workdir / f"batches_p{pid}.txt").read_text().splitlines():
        step, epoch, digest = line.split()
        out[int(step)] = (int(epoch), digest)
    return out


def test_sigkill_mid_epoch_on_two_processes_then_resume_reads_the_same_batches(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    codes, outs = _launch(whole)
    assert codes == [0, 0], outs
    codes, outs = _launch(cut, kill_at=KILL_AT)
    assert codes == [-9, -9], outs
    killed = [_batches(cut, pid) for pid in range(2)]
    assert all(max(k) == KILL_AT - 1 for k in killed)
    codes, outs = _launch(cut)
    assert codes == [0, 0], outs
    assert all("[resume] step 12" in o or "[resume] step 8" in o for o in outs), outs
    ref = [_batches(whole, pid) for pid in range(2)]
    got = [_batches(cut, pid) for pid in range(2)]
    for pid in range(2):
        assert sorted(got[pid]) == list(range(STEPS)) and got[pid] == ref[pid], pid
    # The kill fell inside the first epoch and the run went on into the next ones.
    assert ref[0][KILL_AT - 1][0] == 0 and ref[0][STEPS - 1][0] >= 1
    # The two processes read different rows (their own shards).
    assert all(ref[0][s][1] != ref[1][s][1] for s in range(STEPS))
