"""`experiments.bench_decode`: the decode benchmark measures what it says it measures.

Specifications checked:
  * `fill_cache` (random contents instead of a prefill) occupies exactly the ring slots,
    compressor-tail slots, entries and indexer keys that a real prefill of the same length
    leaves occupied, with the same tree, shapes and dtypes;
  * each arm's cache is allocated for the length measured: it grows with L at the analytic rate
    (sparse: `kv_cache_bytes_per_token`; dense: layers x head_dim x bytes per token);
  * the per-part FLOPs, summed over the layers, equal the accounting module's decode FLOPs;
  * `--tiny` runs end to end (both arms, every part) and writes a consistent JSON and a PNG;
  * bad flags exit 2 naming the flag.

Runs in about 25-60 s on a loaded 2-core CPU (compilation of the tiny steps dominates).
"""
import json

import jax
import numpy as np
import pytest

from experiments import bench_decode as bd
from sparse_lm.analysis import accounting as acc
from sparse_lm.inference import Decoder
from sparse_lm.inference.cache import init_cache
from sparse_lm.inference.dense import full_attention_config
from sparse_lm.model import build_model

TINY = bd.bench_config(tiny=True)


def _occupancy(cache):
    """Per leaf: which rows/slots hold data (gates: finite; other arrays: any nonzero value)."""
    def occ(path, a):
        a = np.asarray(a)
        name = getattr(path[-1], "name", None)
        if a.dtype == np.int32:
            return a
        if name == "gate":
            return np.isfinite(a).all(axis=-1)
        return (a != 0).any(axis=-1)
    return jax.tree_util.tree_map_with_path(occ, cache)


def test_fill_cache_occupies_what_a_prefill_leaves():
    dec = Decoder(build_model(TINY, seed=1))
    rng = np.random.default_rng(0)
    # CSA ratio 4 and HCA ratio 16: inside, at and past window boundaries, and past the ring (8)
    for n in (5, 8, 9, 16, 17, 33):
        prompt = rng.integers(0, 256, n)
        _, real = dec.prefill(dec.init_cache(1, 64), [prompt], chunk_size=4, logits="none")
        filled = bd.fill_cache(TINY, init_cache(TINY, 1, 64), n, seed=n)
        assert jax.tree.structure(real) == jax.tree.structure(filled)
        for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(filled)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
        for a, b in zip(jax.tree.leaves(_occupancy(real)), jax.tree.leaves(_occupancy(filled))):
            np.testing.assert_array_equal(a, b, err_msg=f"length {n}")


@pytest.mark.parametrize("cfg", [TINY, bd.bench_config()], ids=["tiny", "bench"])
def test_each_arm_cache_grows_with_the_measured_length(cfg):
    a = 2 * max(cfg.compress_ratio_csa, cfg.compress_ratio_hca)
    sizes = {arm: [bd.arm_cache_bytes(arm, cfg, 2, n) for n in (a, 2 * a)]
             for arm in ("sparse", "dense")}
    per_tok = {arm: (big - small) / a / 2 for arm, (small, big) in sizes.items()}
    assert per_tok["sparse"] == acc.kv_cache_bytes_per_token(cfg, "bf16", dtype_bytes=4)
    assert per_tok["dense"] == cfg.num_layers * cfg.head_dim * 4
    assert per_tok["sparse"] < per_tok["dense"]


@pytest.mark.parametrize("cfg,length", [(TINY, 64), (bd.bench_config(), 4096)],
                         ids=["tiny", "bench"])
def test_part_flops_add_up_to_the_decode_accounting(cfg, length):
    flops = {p: bd.part_cost(p, cfg, length, batch=1)[0] for p in bd.PARTS}
    n = bd.layer_counts(cfg)
    sparse = acc.flops_per_token(cfg, length)
    assert (n["swa"] * flops["window"] + n["csa"] * flops["csa_attn"]
            + n["hca"] * flops["hca_attn"]) == pytest.approx(sparse.attention, rel=1e-12)
    assert n["csa"] * flops["indexer"] == pytest.approx(sparse.indexer, rel=1e-12)
    dense = acc.flops_per_token(full_attention_config(cfg, window=length), length)
    assert cfg.num_layers * flops["dense_attn"] == pytest.approx(dense.attention, rel=1e-12)
    assert dense.indexer == 0


@pytest.mark.slow
def test_tiny_run_writes_a_consistent_report(tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = bd.main(["--tiny", "--lengths", "64", "--runs", "2", "--warmup", "0", "--json", str(out),
                  "--no-progress", "--markdown"])
    assert rc == 0
    res = json.loads(out.read_text())
    meta = res["meta"]
    for key in ("device_kind", "jax", "git_commit", "load_avg_start", "load_avg_end", "config",
                "cache_fill", "dense_arm"):
        assert key in meta
    rows = {r["arm"]: r for r in res["rows"]}
    assert set(rows) == {"sparse", "dense"}
    for r in rows.values():
        assert len(r["runs_ms"]) == 2 and r["logits_finite"]
        assert min(r["runs_ms"]) <= r["median_ms"] <= max(r["runs_ms"])
        assert r["positions"][1] == 63                      # the last step fills the cache
    assert {p["part"] for p in res["parts"]} == set(bd.PARTS)
    s = res["summary"]["per_length"]["64"]
    assert s["speedup_vs_dense"] == pytest.approx(
        rows["dense"]["median_ms"] / rows["sparse"]["median_ms"])
    assert (tmp_path / "decode.png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "speedup" in text and "| L |" in text


@pytest.mark.parametrize("argv,flag", [
    (["--arms", "sparse,bogus"], "--arms"),
    (["--lengths", "1000"], "--lengths"),            # not a multiple of the HCA ratio 128
    (["--lengths", "128", "--runs", "200"], "--lengths"),     # too short for the steps
    (["--runs", "0"], "--runs"),
    (["--lengths", "1k"], "--lengths"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    assert bd.main(argv + ["--json", "-"]) == 2
    assert flag in capsys.readouterr().err
