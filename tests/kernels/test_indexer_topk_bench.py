"""experiments/bench_indexer.py: its FLOP accounting counts exactly the visible (query, entry)
pairs of the indexer's rule, and the `--tiny` CPU run (interpreted kernels) prints its table and
writes the JSON with every arm, the top-k overhead and the agreement with the naive form.
About 30-60 s on 2 CPU cores (the kernels' interpret-mode compiles dominate)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_indexer as bench
from sparse_lm.ops import masks


def visibility(s, n, m, key_valid=None, segment_ids=None):
    """[B or 1, S, N] entry visibility of a packed row (`sparse_lm.ops.masks`)."""
    seg_e = None if segment_ids is None else masks.entry_segments(segment_ids, n, m)
    vis = masks.entry_visible(jnp.arange(s), n, m, key_valid, segment_ids, seg_e)
    return vis if vis.ndim == 3 else vis[None]


@pytest.mark.parametrize("s", [1, 7, 40])
def test_flop_accounting_counts_visible_pairs(s):
    sh = bench.Shapes(batch=2, index_heads=4, index_dim=16, ratio=4, topk=2, heads=4,
                      head_dim=32, window=8)
    vis = np.asarray(visibility(s, s // sh.ratio, sh.ratio))[0]
    assert bench.visible_pairs(s, sh) == int(vis.sum())
    assert bench.scoring_flops(s, sh) == 2 * 4 * 16 * 2 * int(vis.sum())


@pytest.mark.slow
def test_bench_runs_tiny_and_writes_json(tmp_path, capsys):
    out = tmp_path / "indexer.json"
    arms = ["naive", "fused", "scores_only"]
    bench.main(["--tiny", "--seq", "64", "--arms", ",".join(arms), "--runs", "2",
                "--warmup", "1", "--json", str(out)])
    table = capsys.readouterr().out
    assert "fused" in table and "wrote" in table
    result = json.loads(out.read_text())
    meta = result["meta"]
    for key in ("device_kind", "platform", "jax", "git_commit", "shapes", "runs", "interpret"):
        assert key in meta, key
    assert meta["interpret"] is True
    rows = result["rows"]
    assert [r["arm"] for r in rows] == arms
    for r in rows:
        assert "error" not in r, r
        assert len(r["runs_ms"]) == 2 and r["median_ms"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
    (summary,) = result["summary"]
    assert summary["agree"] == 1.0          # the fused kernel picks the naive form's sets
    assert summary["topk_overhead"] == pytest.approx(
        rows[1]["median_ms"] / rows[2]["median_ms"] - 1)
    assert jnp.dtype(meta["dtype"]) == jnp.bfloat16
