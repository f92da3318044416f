"""A training run refused before it starts (bad override, another model, other data settings,
an unreadable data source, a checkpoint step that does not exist) prints one line naming the
field, exits with status 2, and leaves the workdir byte-identical (checkpoints, config.json,
metrics.jsonl); a fresh workdir is not even created."""
import pytest

from tests.faults.conftest import one_line_error, snapshot, train

# (probe, overrides, what the one line must name)
ON_RESUME = [
    ("negative steps", ["--config.train.steps=-5"], "train.steps=-5"),
    ("steps below the checkpoint", ["--config.train.steps=4", "--config.schedule.decay_steps=2"],
     "train.steps=4 is below the checkpoint step 8"),
    ("another model", ["--config.model.hidden_size=48"], "model.hidden_size: 32 (checkpoint) vs 48"),
    ("other batch size", ["--config.train.batch_size=4"], "train.batch_size: 2 (checkpoint) vs 4"),
    ("other sequence length", ["--config.train.seq_len=64"], "train.seq_len: 32 (checkpoint) vs 64"),
    ("other data seed", ["--config.data.seed=3"], "data.seed: 0 (checkpoint) vs 3"),
    ("other data source", ["--config.data.source=synthetic:repeat"], "data.source"),
    ("unknown key", ["--config.train.no_such_key=1"], "no key 'no_such_key' under train"),
    ("bad value type", ["--config.train.steps=abc"], "--config.train.steps=abc"),
    ("restore step that does not exist", ["--config.train.restore_step=5"],
     "steps there: [4, 8]"),
    ("bad warmup schedule", ["--config.schedule.warmup_steps=100"], "schedule.warmup_steps=100"),
    ("indexer warm-up longer than the dense stage", ["--config.train.indexer_warmup_steps=3"],
     "train.indexer_warmup_steps=3"),
    ("invalid attention implementation", ["--config.model.attention_impl=bogus"],
     "attention_impl"),
    ("keep_checkpoints=0", ["--config.train.keep_checkpoints=0"], "train.keep_checkpoints=0"),
    ("missing data root", ["--config.data.stdlib_root=/no/such/dir"], "/no/such/dir"),
    ("empty validation split", ["--config.train.eval_every=2", "--config.data.eval_split=validation",
                                "--config.data.val_fraction=0.000001"], "validation"),
    ("missing config file", ["--config=configs/no_such_config.py"], "get_config()"),
]


@pytest.mark.parametrize("probe,overrides,needle", ON_RESUME, ids=[p[0] for p in ON_RESUME])
def test_refused_on_resume_leaves_the_workdir_byte_identical(env, copy, probe, overrides, needle):
    before = snapshot(copy)
    r = train(env, copy, *overrides)
    line = one_line_error(r)
    assert needle in line, line
    assert snapshot(copy) == before


def test_refused_on_a_fresh_workdir_creates_nothing(env, tmp_path):
    wd = tmp_path / "fresh"
    for overrides in (["--config.train.steps=-5"], ["--config.data.stdlib_root=/no/such/dir"],
                      ["--config.train.eval_every=2", "--config.data.val_fraction=0.000001"]):
        one_line_error(train(env, wd, *overrides))
        assert not wd.exists(), overrides


def test_allow_data_change_is_the_explicit_override(env, copy):
    """With --config.train.allow_data_change=true the run resumes, says so, and the earlier
    config stays on record in config_history/."""
    r = train(env, copy, "--config.data.seed=3", "--config.train.restore_step=4",
              "--config.train.allow_data_change=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "allow_data_change" in r.stdout and "data.seed: 0 (checkpoint) vs 3" in r.stdout
    hist = sorted((copy / "config_history").iterdir())
    assert len(hist) == 2                      # the original start and this one
    assert r.stdout.strip().splitlines()[-1].startswith("[done]")


def test_verbose_shows_the_traceback(env, copy):
    r = train(env, copy, "--config.train.steps=-5", "--verbose")
    assert r.returncode == 2 and "Traceback" in r.stderr and "train.steps=-5" in r.stderr
