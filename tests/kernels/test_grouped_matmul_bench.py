"""experiments/bench_moe.py: its routing distributions give sizes that sum to the row count
(the skewed one with empty experts and one large expert), and the `--tiny` CPU run prints its
table and writes the JSON with every implementation, tokamax reported (not hidden) when it is
not importable, and the dense ratio. About 20-40 s on 2 CPU cores."""
import json

import numpy as np
import pytest

from experiments import bench_moe as bench
from kernels_pallas.grouped_matmul import tokamax_available


@pytest.mark.parametrize("dist", ["balanced", "skewed"])
@pytest.mark.parametrize("total,experts", [(1000, 8), (4096, 256), (7, 16)])
def test_group_sizes_sum_to_rows(dist, total, experts):
    sizes = bench.group_sizes(total, experts, dist)
    assert sizes.dtype == np.int32 and sizes.shape == (experts,)
    assert int(sizes.sum()) == total and sizes.min() >= 0
    if dist == "balanced":
        assert sizes.max() - sizes.min() <= 1
    elif total >= experts:
        assert (sizes == 0).sum() >= experts // 8 and sizes.max() > total / experts


@pytest.mark.slow
def test_bench_runs_tiny_and_writes_json(tmp_path, capsys):
    out = tmp_path / "moe.json"
    bench.main(["--tiny", "--tokens-per-expert", "16", "--distribution", "skewed", "--runs", "2",
                "--warmup", "1", "--json", str(out)])
    assert "wrote" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["meta"]["interpret"] is True
    rows = {(r["impl"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {(i, p) for i in bench.IMPLS for p in ("fwd", "fwd+bwd")}
    for (impl, _), r in rows.items():
        if impl == "tokamax" and not tokamax_available():
            assert "not importable" in r["error"]
            continue
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["vs_dense"] > 0 and r["empty_experts"] >= 1
    assert rows[("dense", "fwd")]["vs_dense"] == 1.0
