"""Faults during and after a run never lose data, and a resumed run is bitwise the run that was
not interrupted:

* SIGKILL while an (async) checkpoint save is in flight, then resume: training continues from
  the newest complete step and the loss curve and the final state equal the uninterrupted run's;
* a checkpoint truncated at a file: one warning line naming the step and the file, the run falls
  back to the newest readable step (the damaged one is moved aside, not deleted) and the loss
  curve equals the uninterrupted run's; evaluate falls back the same way;
* an evaluation that fails during training costs no checkpoint (saved first);
* a diverged run (a NaN injected at step 6) stops naming the step and the metric, keeps the last
  good checkpoint (finite) and writes metrics.jsonl that is strict JSON on every line (no bare
  NaN).
"""
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.faults.conftest import losses, one_line_error, run, train


def _state(workdir, step):
    return ocp.StandardCheckpointer().restore(Path(workdir) / "checkpoints" / str(step) / "state")


def _assert_same_state(a_dir, b_dir, step):
    a, b = _state(a_dir, step), _state(b_dir, step)
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb and len(la) > 50
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("delay", ["0"])
def test_sigkill_during_a_save_then_resume_is_bitwise(env, base, tmp_path, delay):
    wd = tmp_path / "killed"
    r = train(env, wd, extra_env={"SPARSE_LM_FAULT_KILL_IN_SAVE": f"8:{delay}"})
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    r = train(env, wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[resume] restored step" in r.stdout
    assert losses(wd) == losses(base) and sorted(losses(wd)) == list(range(1, 9))
    _assert_same_state(base, wd, 8)


def _truncate_a_data_file(step_dir: Path) -> Path:
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()
                    and p.parent.name == "d" and "ocdbt" not in str(p)), key=lambda p: p.name)
    victim = files[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 3)
    return victim


@pytest.mark.parametrize("what", ["array data", "meta json"])
def test_truncated_latest_checkpoint_falls_back_bitwise(env, base, copy, what):
    step8 = copy / "checkpoints" / "8"
    if what == "array data":
        victim = _truncate_a_data_file(step8)
    else:
        victim = step8 / ("meta/metadata" if what == "meta json" else "state/_METADATA")
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    r = train(env, copy)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
    warn = [l for l in r.stdout.splitlines() if "checkpoint step 8 is unreadable" in l]
    assert len(warn) == 1 and str(victim) in warn[0], r.stdout[-3000:]
    assert "resuming from step 4" in r.stdout and "[resume] restored step 4" in r.stdout
    assert (copy / "checkpoints_unreadable" / "8").is_dir()       # kept, not deleted
    assert losses(copy) == losses(base)
    _assert_same_state(base, copy, 8)


def test_restore_step_picks_a_checkpoint(env, base, copy):
    r = train(env, copy, "--config.train.restore_step=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[resume] restored step 4" in r.stdout
    assert (copy / "checkpoints_superseded" / "8").is_dir()
    assert losses(copy) == losses(base)
    dropped = (copy / "metrics_dropped.jsonl").read_text().splitlines()
    assert sorted(json.loads(l)["step"] for l in dropped) == [5, 6, 7, 8]


def test_evaluate_falls_back_from_a_truncated_checkpoint(env, copy):
    _truncate_a_data_file(copy / "checkpoints" / "8")
    r = run(env, "experiments.evaluate", f"--workdir={copy}",
            "--config=tests/train/tiny_train_config.py", "--config.eval.needle_lengths=(64,)",
            "--config.eval.needle_examples=2", "--config.eval.batches=1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint step 8 is unreadable" in r.stdout and "evaluated step 4" in r.stdout


def test_an_evaluation_failure_costs_no_checkpoint(env, tmp_path):
    wd = tmp_path / "evalfail"
    r = train(env, wd, "--config.train.eval_every=2", "--config.train.eval_batches=1",
              extra_env={"SPARSE_LM_FAULT_EVAL_ERROR": "1"})
    line = one_line_error(r, code=1)
    assert "evaluation at step 2 failed" in line and "checkpoint step 2 is saved" in line
    assert (wd / "checkpoints" / "2").is_dir()


def _strict(line):
    def bad(c):
        raise ValueError(f"bare {c} in metrics.jsonl")
    return json.loads(line, parse_constant=bad)


def test_diverged_run_metrics_are_strict_json(env, tmp_path):
    wd = tmp_path / "nan"
    r = train(env, wd, "--config.train.inject_nan_at_step=6")
    line = one_line_error(r, code=1)
    assert "TrainingDiverged" in line and "step 6" in line and "loss=nan" in line, line
    assert "last good checkpoint is step 4" in line
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    assert lines and all(isinstance(_strict(l), dict) for l in lines)
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir()) == [4]
    # The checkpoint kept is the last good one: every float in it is finite.
    leaves = jax.tree.leaves(_state(wd, 4))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves if np.asarray(x).dtype.kind == "f")
