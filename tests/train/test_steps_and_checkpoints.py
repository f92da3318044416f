"""Router-bias rule, schedule, losses, and checkpoint behaviour (round trip, keep-N, crash
mid-save, another model's checkpoint).

~12 s on 2 cores.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.model import build_model
from sparse_lm.model.transformer import ModelOutput
from sparse_lm.train import checkpoint as ckpt_lib
from sparse_lm.train import losses, steps
from sparse_lm.train.schedule import Schedule
from tests.conftest import tiny_config


def test_bias_update_pushes_overloaded_experts_down_and_underloaded_up():
    bias = jnp.asarray([0.0, 0.5, -0.2, 0.1])
    load = jnp.asarray([10.0, 2.0, 4.0, 4.0])            # mean 5
    new = np.asarray(steps.bias_update(bias, load, 0.001))
    np.testing.assert_allclose(new - np.asarray(bias), [-0.001, 0.001, 0.001, 0.001], atol=1e-7)
    even = steps.bias_update(bias, jnp.full((4,), 3.0), 0.001)
    np.testing.assert_array_equal(even, bias)            # balanced: unchanged


def test_router_biases_of_every_score_layer_follow_their_own_rows():
    cfg = tiny_config()                                   # head, stacked cycles, tail, MTP
    model = build_model(cfg, seed=0)
    rows = cfg.num_layers + 1
    e = cfg.n_routed_experts
    counts = np.zeros((rows, e), np.float32)
    for r in range(rows):                                 # layer r overloads expert r % e
        counts[r] = 1.0
        counts[r, r % e] = 10.0
    steps.update_router_biases(model, jnp.asarray(counts), 0.5)

    def expect(r):
        want = np.full(e, 0.5, np.float32)
        want[r % e] = -0.5
        return want
    rows_of = steps.layer_rows(cfg)
    for blk, r in zip(model.head_layers, rows_of["head"]):
        if blk.moe.routing == "hash":
            assert not hasattr(blk.moe, "bias")
        else:
            np.testing.assert_allclose(blk.moe.bias[...], expect(r))
    for blk, rs in zip(model.cycles.blocks, rows_of["cycle"]):
        np.testing.assert_allclose(blk.moe.bias[...], np.stack([expect(r) for r in rs]))
    for blk, r in zip(model.tail_layers, rows_of["tail"]):
        np.testing.assert_allclose(blk.moe.bias[...], expect(r))
    np.testing.assert_allclose(model.mtp.block.moe.bias[...], expect(cfg.num_layers))


def test_schedule_warmup_constant_cosine_and_mtp_weight():
    s = Schedule(peak_lr=1.0, total_steps=100, warmup_steps=10, decay_steps=40, final_lr=0.1)
    lr = lambda t: float(s.lr(t))
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(30) == 1.0 and lr(59) == 1.0
    assert lr(80) == pytest.approx(0.1 + 0.9 * 0.5)                  # half-way down the cosine
    assert lr(100) == pytest.approx(0.1) and lr(150) == pytest.approx(0.1)
    assert float(s.mtp(59)) == pytest.approx(0.3) and float(s.mtp(60)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        Schedule(peak_lr=1.0, total_steps=5, warmup_steps=10)


def test_loss_counts_only_same_document_targets_and_weights_the_terms():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 4, 5)), jnp.float32)
    tokens = jnp.asarray([[1, 2, 3, 4, 0]])
    segs = jnp.asarray([[1, 1, 1, 2, 2]])       # a document boundary between positions 2 and 3

    out = ModelOutput(logits, logits, expert_counts=jnp.zeros((2, 4)),
                      balance_loss=jnp.asarray([0.0, 2.0]), indexer_kl=jnp.asarray([0.5, 0.0]),
                      indexer_recall=jnp.zeros(2))
    loss, m = losses.total_loss(out, {"tokens": tokens, "segment_ids": segs}, mtp_weight=0.3,
                                balance_alpha=1e-4, indexer_weight=2.0)
    logp = jax.nn.log_softmax(logits[0])
    ce = -(logp[0, 2] + logp[1, 3] + logp[3, 0]) / 3        # 2 -> 3 crosses the boundary
    mtp = -logp[0, 3]                                        # only 0 -> 2 stays in a document
    assert float(m["ce"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(m["mtp_ce"]) == pytest.approx(float(mtp), rel=1e-6)
    assert float(loss) == pytest.approx(float(ce + 0.3 * mtp + 1e-4 * 2.0 + 2.0 * 0.5), rel=1e-6)
    assert float(m["bits_per_byte"]) == pytest.approx(float(ce) / np.log(2), rel=1e-6)


def test_loss_counts_only_marked_targets_when_the_batch_has_a_target_mask():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 4, 5)), jnp.float32)
    batch = {"tokens": jnp.asarray([[1, 2, 3, 4, 0]]), "segment_ids": jnp.asarray([[1] * 5]),
             "target_mask": jnp.asarray([[False, False, True, False, True]])}
    out = ModelOutput(logits, logits, expert_counts=jnp.zeros((2, 4)),
                      balance_loss=jnp.zeros(2), indexer_kl=jnp.zeros(2),
                      indexer_recall=jnp.zeros(2))
    _, m = losses.total_loss(out, batch, mtp_weight=0.3, balance_alpha=0.0, indexer_weight=0.0)
    logp = jax.nn.log_softmax(logits[0])
    assert float(m["ce"]) == pytest.approx(float(-(logp[1, 3] + logp[3, 0]) / 2), rel=1e-6)
    assert float(m["target_tokens"]) == 2.0
    assert float(m["mtp_ce"]) == pytest.approx(float(-(logp[0, 3] + logp[2, 0]) / 2), rel=1e-6)


def _small_state():
    cfg = tiny_config(num_layers=3, layer_prefix=("swa",), layer_tail=(), num_hash_layers=1)
    model = build_model(cfg, seed=0)
    from sparse_lm.train import optimizer as opt
    tx = opt.make_optimizer(opt.OptimizerConfig(), lambda s: 1e-3)
    graphdef, state = steps.init_train_state(model, tx)
    return cfg, tx, graphdef, state


def test_checkpoint_round_trip_keep_n_and_crash_mid_save(tmp_path):
    cfg, tx, graphdef, state = _small_state()
    ck = ckpt_lib.Checkpointer(tmp_path, keep=2, async_save=True)
    meta = {"model": cfg.to_dict()}
    for s in (1, 2, 3):
        st = jax.tree.map(lambda x: x + s if x.dtype.kind == "f" else x, state)
        ck.save(s, st, [{"epoch": 0, "cursor": s, "offset": 7}], meta, force=True)
    ck.wait()
    assert ck.all_steps() == [2, 3]
    # A save that died half-way leaves only a temporary directory: it is never "latest".
    (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp").mkdir()
    (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp" / "junk").write_text("partial")
    ck.close()
    ck2 = ckpt_lib.Checkpointer(tmp_path, keep=2)
    assert ck2.latest_step() == 3
    _, abstract = steps.abstract_train_state(lambda: build_model(cfg, seed=0), tx)
    restored, data, meta2 = ck2.restore(3, abstract)
    want = jax.tree.map(lambda x: x + 3 if x.dtype.kind == "f" else x, state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert data == [{"epoch": 0, "cursor": 3, "offset": 7}]
    assert meta2["model"]["hidden_size"] == cfg.hidden_size
    ck2.check_compatible(cfg.to_dict())                        # same model: fine
    ck2.check_compatible(cfg.replace(dtype="bfloat16", remat="full").to_dict())  # execution only
    with pytest.raises(ckpt_lib.CheckpointError, match=r"model\.num_heads: 4 \(checkpoint\) vs 8"):
        ck2.check_compatible(cfg.replace(num_heads=8).to_dict())
    ck2.close()


def test_config_diff_accepts_fields_added_at_their_default():
    saved = {"hidden_size": 64}
    cur = {"hidden_size": 64, "moe_impl": "ragged_dot", "yarn": True}
    assert ckpt_lib.model_config_diff(saved, cur) == []
    assert ckpt_lib.model_config_diff(saved, {"hidden_size": 64, "yarn": False}) != []
