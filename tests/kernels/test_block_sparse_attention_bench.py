"""experiments/bench_attention.py: it runs end to end on CPU (`--tiny`, interpreted kernels),
prints its table and writes the JSON the README documents, and its FLOP accounting counts
exactly the attended (query, key) pairs of the attention rule. About 20-40 s on 2 CPU cores
(the interpreted kernels' compiles dominate)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import model_presets
from experiments import bench_attention as bench
from sparse_lm.config import ModelConfig
from sparse_lm.ops.masks import sequence_entry_visible


@pytest.fixture(scope="module")
def tiny_shapes():
    return bench.Shapes.from_config(ModelConfig.from_dict(model_presets.tiny()), batch=1)


@pytest.mark.parametrize("s", [1, 9, 40])
def test_flop_accounting_counts_attended_pairs(tiny_shapes, s):
    sh = tiny_shapes
    t = np.arange(s)
    band = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < sh.window)
    assert bench.attended(s, sh, "dense") == int((t[None, :] <= t[:, None]).sum())
    for arm, ratio in (("hca", sh.ratio_hca), ("csa", sh.ratio_csa)):
        n = s // ratio
        vis = np.asarray(sequence_entry_visible(s, ratio, jnp.ones((1, n), bool)))[0]
        per_query = vis.sum(axis=1)
        if arm == "csa":
            per_query = np.minimum(per_query, sh.topk)
        assert bench.attended(s, sh, arm) == int(band.sum() + per_query.sum())
    fwd = bench.arm_flops("hca_core", s, sh, backward=False)
    assert fwd == 4 * sh.head_dim * sh.heads * bench.attended(s, sh, "hca")
    assert bench.arm_flops("hca_core", s, sh, backward=True) == pytest.approx(3.5 * fwd)


def test_spread_topk_lists_distinct_visible_entries():
    s, ratio, k = 200, 4, 16
    idx = np.asarray(bench.spread_topk(s, s // ratio, k, 2, seed=0, ratio=ratio))
    for b in range(2):
        for t in range(s):
            row = idx[b, t]
            picked = row[row >= 0]
            assert len(picked) == min(k, (t + 1) // ratio)
            assert len(set(picked.tolist())) == len(picked)
            assert np.all(picked < (t + 1) // ratio)


@pytest.mark.slow
def test_bench_runs_tiny_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    arms = ["dense_core", "hca_layer", "csa_layer"]
    bench.main(["--tiny", "--seq", "32", "--arms", ",".join(arms), "--runs", "2", "--warmup", "1",
                "--json", str(out)])
    table = capsys.readouterr().out
    assert "dense_core" in table and "csa_layer" in table and "wrote" in table
    result = json.loads(out.read_text())
    meta = result["meta"]
    for key in ("device_kind", "platform", "jax", "git_commit", "shapes", "runs",
                "peak_bf16_tflops", "interpret"):
        assert key in meta, key
    assert meta["interpret"] is True and meta["runs"] == 2
    rows = result["rows"]
    assert {(r["arm"], r["pass"]) for r in rows} == {(a, p) for a in arms
                                                     for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert "error" not in r, r
        assert len(r["runs_ms"]) == 2 and r["median_ms"] > 0 and r["flops"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["speedup_vs_dense"] > 0
    assert set(result["crossover"]) == {f"{a} {p}" for a in arms[1:] for p in ("fwd", "fwd+bwd")}
