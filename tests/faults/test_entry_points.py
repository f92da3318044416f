"""Every entry point reports a user error in one line naming the field / file / value, exit
status 2, no traceback, and creates or changes nothing: evaluate, generate, demo, inspect_model,
compare_sharding, launch_tpu (train: test_train_refusals.py)."""

import pytest

from tests.faults.conftest import one_line_error, run, snapshot


def test_evaluate_missing_workdir_creates_nothing(env, tmp_path):
    wd = tmp_path / "missing"
    line = one_line_error(run(env, "experiments.evaluate", f"--workdir={wd}"))
    assert str(wd) in line and "does not exist" in line
    assert not wd.exists()


def test_evaluate_workdir_without_checkpoints(env, tmp_path, base):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.json").write_text((base / "config.json").read_text())
    before = snapshot(wd)
    line = one_line_error(run(env, "experiments.evaluate", f"--workdir={wd}"))
    assert "no checkpoint" in line
    assert snapshot(wd) == before


def test_evaluate_step_that_does_not_exist_lists_the_steps(env, copy):
    before = snapshot(copy)
    line = one_line_error(run(env, "experiments.evaluate", f"--workdir={copy}", "--step=5"))
    assert "step 5" in line and "[4, 8]" in line
    assert snapshot(copy) == before


@pytest.mark.parametrize("module", ["experiments.evaluate", "experiments.generate"])
def test_invalid_config_json_names_the_file(env, copy, module):
    (copy / "config.json").write_text('{"config": {"model": ')        # truncated
    before = snapshot(copy)
    args = ["--prompt=hi", "--max-new-tokens=1"] if module.endswith("generate") else []
    line = one_line_error(run(env, module, f"--workdir={copy}", *args))
    assert str(copy / "config.json") in line
    assert snapshot(copy) == before


def test_generate_missing_workdir_creates_nothing(env, tmp_path):
    wd = tmp_path / "missing"
    line = one_line_error(run(env, "experiments.generate", f"--workdir={wd}", "--prompt=hi"))
    assert "no checkpoint" in line
    assert not wd.exists()


PROBES = [
    ("experiments.generate", ["--prompt=hi", "--config=configs/tiny.py", "--config.model.nope=1"],
     "no key 'nope' under model"),
    ("experiments.generate", ["--prompt=hi", "--config=configs/nope.py"], "get_config()"),
    ("experiments.inspect_model", [], "--config is required"),
    ("experiments.inspect_model", ["--config=configs/tiny.py", "--config.model.hidden_size=-1"],
     "model.hidden_size=-1"),
    ("experiments.inspect_model", ["--config=configs/tiny.py", "--config.model.nope=1"],
     "no key 'nope' under model"),
    ("experiments.inspect_model", ["--config=configs/tiny.py", "--context=0"], "--context=0"),
    ("experiments.compare_sharding", ["--config=configs/tiny.py", "--measured=/no/such.json"],
     "--measured=/no/such.json"),
    ("experiments.compare_sharding", ["--config=configs/tiny.py", "--config.model.nope=1"],
     "no key 'nope'"),
    ("experiments.launch_tpu", ["--tpu=v5p-100", "--zone=z"], "v5p-100"),
    ("experiments.launch_tpu", ["--no_such_flag"], "no_such_flag"),
    ("experiments.demo", ["--config.train.nope=1"], "no key 'nope' under train"),
    ("experiments.train", ["--workdir=/nonexistent/wd", "--config.train.nope=1"],
     "no key 'nope' under train"),
    ("experiments.train", ["--config.train.steps=3"], "--workdir"),
    ("experiments.compare_sharding", ["--config.model.nope=1"], "no key 'nope' under model"),
]


@pytest.mark.parametrize("module,args,needle", PROBES,
                         ids=[f"{m.split('.')[1]}:{' '.join(a)}" for m, a, _ in PROBES])
def test_one_line_errors(env, tmp_path, module, args, needle):
    r = run(env, module, *args, extra_env={"HOME": str(tmp_path)})
    line = one_line_error(r)
    assert needle in line, line


def test_config_file_without_get_config(env, tmp_path):
    cfg = tmp_path / "bad_config.py"
    cfg.write_text("x = 1\n")
    line = one_line_error(run(env, "experiments.train", f"--config={cfg}",
                              f"--workdir={tmp_path / 'wd'}"))
    assert str(cfg) in line and "get_config()" in line
    assert not (tmp_path / "wd").exists()
