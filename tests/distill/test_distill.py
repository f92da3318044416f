"""The distillation run (sparse_lm/distill/loop.py): on-policy by construction, teachers read
only, the loss equal to NumPy on the step's rows, exact resume, and bad input refused before
any compute."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.config import ConfigError
from sparse_lm.data.tfds_source import DataError
from sparse_lm.data.tokenizer import ByteTokenizer
from sparse_lm.distill.loop import Distiller, distill, load_teachers, plan_run, update_key
from sparse_lm.model import build_model
from sparse_lm.train.checkpoint import CheckpointError
from sparse_lm.train.loop import loss_config, make_schedule, make_tx
from sparse_lm.train.steps import init_train_state
from tests.distill.common import STUDENT, TEACHER, distill_config, model_config, save_run


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Teacher workdirs: domain a a deeper, narrower model than the student, b the student's."""
    root = tmp_path_factory.mktemp("teachers")
    save_run(root / "a", model_config(TEACHER), seed=11)
    save_run(root / "b", model_config(STUDENT), seed=12)
    return {"a": str(root / "a"), "b": str(root / "b")}


def _forward(graphdef):
    return jax.jit(lambda params, buffers, tokens: nnx.merge(graphdef, params, buffers)(tokens))


def _greedy(forward, params, buffers, rows, prompt_len):
    """Greedy completions from full forwards (no cache, no Decoder): rows [B, P + N] whose
    completion part is overwritten one token at a time (causal: later tokens do not matter)."""
    rows = np.array(rows)
    for j in range(prompt_len, rows.shape[1]):
        logits = np.asarray(forward(params, buffers, jnp.asarray(rows)))
        rows[:, j] = logits[:, j - 1].argmax(-1)
    return rows


def test_each_step_trains_on_the_current_students_samples_and_leaves_teachers_unchanged(teachers):
    config = distill_config(teachers)                  # greedy sampling: temperature 0
    cfg = model_config(STUDENT)
    plan = plan_run(config, cfg, ByteTokenizer())
    loaded = load_teachers(plan)
    before = {d: jax.tree.map(np.array, (t.params, t.buffers)) for d, t in loaded.items()}
    tx = make_tx(config)
    graphdef, state = init_train_state(build_model(cfg, seed=0), tx)
    state = jax.device_put(state, jax.devices()[0])
    # the update compiled here is the one the resume test's runs use (same settings)
    run = Distiller(plan, loaded, graphdef, tx, make_schedule(config), loss_config(config), seed=0,
                    update_key=update_key(config))
    p, n = plan.prompt_len, plan.new_tokens
    forwards = {}                   # teacher b has the student's architecture: one compilation
    for g in [graphdef] + [t.graphdef for t in loaded.values()]:
        forwards.setdefault(g, _forward(g))
    student_fwd = forwards[graphdef]
    teacher_fwd = {d: forwards[t.graphdef] for d, t in loaded.items()}
    for step in range(2):
        weights = jax.tree.map(jnp.array, (state.params, state.buffers))    # before the step
        state, host = run(state, step)
        tokens = np.asarray(host["tokens"])
        # the completions are the student's own greedy samples at this step's weights
        np.testing.assert_array_equal(tokens, _greedy(student_fwd, *weights, tokens, p))
        # and the loss was computed on them: per-row reverse KL from NumPy
        s = np.asarray(student_fwd(*weights, jnp.asarray(tokens)))[:, p - 1:p + n - 1]
        t = np.concatenate([np.asarray(teacher_fwd[d](loaded[d].params, loaded[d].buffers,
                                                      jnp.asarray(tokens[i * 2:i * 2 + 2])))
                            for i, d in enumerate(plan.domains)])[:, p - 1:p + n - 1]
        ls, lt = _log_softmax(s.astype(np.float64)), _log_softmax(t.astype(np.float64))
        kl = (np.exp(ls) * (ls - lt)).sum(-1).mean(-1)
        np.testing.assert_allclose(host["objective_row"], kl, rtol=2e-4, atol=1e-6)
    assert int(state.step) == 2
    for d, t in loaded.items():            # bitwise the same parameters and buffers
        after = jax.tree.map(np.array, (t.params, t.buffers))
        assert all(np.array_equal(x, y) for x, y in
                   zip(jax.tree.leaves(before[d]), jax.tree.leaves(after), strict=True))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, teachers):
    config = distill_config(teachers, temperature=1.0)     # sampled: the keys must resume too
    # (the temperature is an argument of the compiled sampler: the programs of the test above)
    full = distill(config, tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "2")     # as if killed after step 1
    resumed = distill(config, tmp_path / "resumed")
    assert resumed["resumed_from"] == 1
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(full["state"].params),
                                                    jax.tree.leaves(resumed["state"].params)))
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [__import__("json").loads(l)["step"] for l in lines] == [1, 2]
    assert "kl/a" in lines[-1] and "sample_len/b" in lines[-1] and "teacher_logprob/a" in lines[-1]
    config.distill.mode = "sft"            # the workdir's rows were the student's samples
    with pytest.raises(CheckpointError, match=r"distill.mode: 'on_policy' \(checkpoint\) vs 'sft'"):
        distill(config, tmp_path / "resumed")


@pytest.mark.parametrize("change, error, match", [
    (dict(teachers={"a": "T/a"}), ConfigError, "no teacher for domain 'b'"),
    (dict(teacher_vocab=300), ConfigError, "vocab_size=300, the student 256"),
    (dict(prompts={"a": "synthetic:repeat", "b": "files:EMPTY/*.txt"}), DataError,
     r"distill.prompts.b=.* is empty: no document has the 8 tokens"),
    (dict(init_from="T/a"), CheckpointError, r"model.num_layers: 2 \(checkpoint\) vs 1"),
])
def test_bad_input_is_refused_before_any_compute(tmp_path, teachers, change, error, match):
    config = distill_config(teachers)
    root = str(tmp_path)
    (tmp_path / "short.txt").write_text("tiny")            # 4 bytes: shorter than a prompt
    if "teachers" in change:
        config.distill.teachers = {k: v.replace("T/", teachers["a"][:-1]) for k, v in
                                   change["teachers"].items()}
    if "teacher_vocab" in change:
        save_run(tmp_path / "big_vocab", model_config(dict(STUDENT, vocab_size=300)), seed=0)
        config.distill.teachers.b = str(tmp_path / "big_vocab")
    if "prompts" in change:
        config.distill.prompts = {k: v.replace("EMPTY", root) for k, v in change["prompts"].items()}
    if "init_from" in change:
        config.train.init_from = teachers["a"]
    with pytest.raises(error, match=match):
        distill(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
