"""Routing and indexer statistics, and the metrics writer.

~3 s on 2 cores.
"""
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from sparse_lm.train import metrics


def test_expert_load_stats():
    counts = np.array([[4, 4, 4, 4], [10, 6, 0, 0]], np.float64)
    st = metrics.expert_load_stats(counts)
    np.testing.assert_allclose(st["load_cv"], [0.0, np.std([10, 6, 0, 0]) / 4])
    np.testing.assert_allclose(st["load_max"], [1.0, 2.5])
    np.testing.assert_allclose(st["load_min"], [1.0, 0.0])
    assert st["dead"].tolist() == [0, 2]
    np.testing.assert_allclose(st["entropy"][0], 1.0)
    p = np.array([10, 6]) / 16
    np.testing.assert_allclose(st["entropy"][1], -(p * np.log(p)).sum() / np.log(4))


def test_recall_at_fraction_against_a_hand_count():
    # One query, 8 visible entries, k = 2: the indexer ranks entries 5 and 1 first.
    mass = jnp.asarray([[[0.05, 0.4, 0.05, 0.05, 0.05, 0.1, 0.2, 0.1]]])
    scores = jnp.asarray([[[0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.5, 0.0]]])
    visible = jnp.ones((1, 1, 8), bool)
    recall, chance, oracle = metrics.recall_at_fraction(scores, mass, visible, 0.25)
    assert float(recall) == pytest.approx(0.5)              # 0.1 + 0.4
    assert float(chance) == pytest.approx(0.25)
    assert float(oracle) == pytest.approx(0.6)              # 0.4 + 0.2
    # Invisible entries never count, and queries with fewer than 4 visible entries are skipped.
    vis2 = jnp.asarray([[[True] * 4 + [False] * 4, [True] * 3 + [False] * 5]])
    s2 = jnp.concatenate([scores, scores], axis=1)
    m2 = jnp.concatenate([mass, mass], axis=1)
    r2, c2, o2 = metrics.recall_at_fraction(s2, m2, vis2, 0.25)
    assert float(r2) == pytest.approx(0.4 / 0.55) and float(o2) == pytest.approx(0.4 / 0.55)


def test_metrics_writer_truncates_after_resume(tmp_path):
    w = metrics.MetricsWriter(tmp_path, tensorboard=True)
    for s in range(1, 6):
        w.write(s, {"loss": float(s)})
    w.write(4, {"bits_per_byte": 1.0}, kind="eval")
    w.close()
    w2 = metrics.MetricsWriter(tmp_path, tensorboard=False)
    w2.truncate_after(3)
    recs = metrics.read_metrics(tmp_path, kind=None)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 1.0


def test_routing_and_indexer_metric_names(tiny_cfg):
    L = tiny_cfg.num_layers + 1
    out = metrics.routing_metrics(tiny_cfg, np.ones((L, tiny_cfg.n_routed_experts)))
    assert out["moe/load_cv_mean"] == 0.0 and out["moe/dead_experts"] == 0.0
    assert "moe/layer1_csa/load_cv" in out and "moe/mtp/load_max" in out
    rec = metrics.indexer_metrics(tiny_cfg, np.arange(L, dtype=float))
    csa = [s.index for s in tiny_cfg.layers if s.kind == "csa"]
    assert rec["indexer/recall"] == pytest.approx(np.mean(csa))


def test_train_flops_count_sparse_below_dense(tiny_cfg):
    cfg = tiny_cfg.replace(index_topk=2)
    assert metrics.train_flops_per_token(cfg, 256, True) < metrics.train_flops_per_token(cfg, 256, False)


def test_non_finite_values_are_written_as_null_and_read_back_as_nan(tmp_path):
    w = metrics.MetricsWriter(tmp_path, tensorboard=False)
    w.write(1, {"loss": float("nan"), "tokens_per_s": float("inf"), "lr": 0.5})
    w.close()
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[0]
    assert "NaN" not in line and "Infinity" not in line
    rec = json.loads(line)
    assert rec["loss"] is None and rec["tokens_per_s"] is None and rec["lr"] == 0.5
    back = metrics.read_metrics(tmp_path)[0]
    assert np.isnan(back["loss"]) and np.isnan(back["tokens_per_s"]) and back["lr"] == 0.5


def _tensorboard_scalars(logdir):
    """{tag: [(step, value)]} from the event files under logdir (TFRecord framing: u64 length,
    u32 crc, the Event proto, u32 crc)."""
    out = {}
    for path in sorted(logdir.rglob("events*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_one_writer_puts_nested_results_in_jsonl_and_tensorboard(tmp_path):
    """Evaluation results are nested (per mode, per needle length): the writer flattens them to
    the same names in metrics.jsonl and TensorBoard ("<kind>/<name>" tags)."""
    res = {"bits_per_byte": {"sparse": 2.5, "dense": 2.25},
           "needle": {"sparse": {256: {"exact": 0.5}}}, "validation_tokens": 96}
    with metrics.MetricsWriter(tmp_path) as w:
        w.write(3, {"loss": 1.5})
        w.write(4, res, kind="evaluate")
    rec = metrics.read_metrics(tmp_path, kind="evaluate")
    assert rec == [{"step": 4, "kind": "evaluate", "bits_per_byte/sparse": 2.5,
                    "bits_per_byte/dense": 2.25, "needle/sparse/256/exact": 0.5,
                    "validation_tokens": 96.0}]
    tb = _tensorboard_scalars(tmp_path / "tensorboard")
    assert tb["train/loss"] == [(3, 1.5)]
    assert tb["evaluate/bits_per_byte/dense"] == [(4, 2.25)]
    assert tb["evaluate/needle/sparse/256/exact"] == [(4, 0.5)]
