"""Analytic accounting: parameter counts vs the published models, FLOP and KV-cache ratios vs
DeepSeek-V3.2 (spec §2.1, §12), and the `inspect_model` command line.

Reference figures are the published ones (DeepSeek-V4 report / model cards) and the spec's own
derivations; every count under test is computed from the configs and the real model's shapes.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import model_presets
from sparse_lm.analysis import accounting as acc
from sparse_lm.config import LayerSpec, ModelConfig
from sparse_lm.model import build_model
from sparse_lm.ops.masks import sequence_entry_visible
from sparse_lm.ops.indexer import select_topk

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MILLION = 1 << 20


def _cfg(name, **overrides) -> ModelConfig:
    return ModelConfig.from_dict(getattr(model_presets, name)()).replace(**overrides)


FLASH, PRO = _cfg("v4_flash"), _cfg("v4_pro")


def _rel(x, ref):
    return abs(x / ref - 1.0)


# ---------------------------------------------------------------------------- parameters
def test_total_parameters_within_2pct_of_published():
    # Published totals (no MTP): V4-Flash 284B, V4-Pro 1.6T.
    assert _rel(acc.param_counts(FLASH).total, 284e9) <= 0.02
    assert _rel(acc.param_counts(PRO).total, 1.6e12) <= 0.02
    # The spec's own derivation (§2.1): Pro 1599B with MTP.
    assert _rel(acc.param_counts(PRO).total_with_mtp, 1599e9) <= 0.005


def test_activated_parameters_match_published():
    # Published: Flash 13B, Pro 49B activated. Pro is within 2%. Flash's count (excl. embedding,
    # incl. head) is 13.27B, 2.1% above the rounded "13B": check it rounds to the published
    # figure and agrees with the spec's derivation (13.3B; Pro 48.9B) to 0.5%.
    flash, pro = acc.param_counts(FLASH).activated, acc.param_counts(PRO).activated
    assert _rel(pro, 49e9) <= 0.02
    assert round(flash / 1e9) == 13 and round(pro / 1e9) == 49
    assert _rel(flash, 13.3e9) <= 0.005 and _rel(pro, 48.9e9) <= 0.005


VARIANTS = [
    ("tiny", {}), ("tiny", {"num_layers": 4}), ("tiny", {"mtp_depth": 0, "n_shared_experts": 0}),
    ("tiny", {"num_layers": 3, "num_hash_layers": 0}),
    ("tiny", {"layer_prefix": ("hca",), "layer_cycle": ("csa",), "num_layers": 6}),
    ("v4_flash", {}), ("v4_pro", {}),
]


@pytest.mark.parametrize("name,overrides", VARIANTS)
def test_eval_shape_count_equals_spec_formula(name, overrides):
    """The walk over the real model's eval_shape and the spec's shape formulas agree exactly,
    component by component, layer by layer, buffers included."""
    cfg = _cfg(name, **overrides)
    walked, formula = acc.param_counts(cfg), acc.analytic_param_counts(cfg)
    assert walked == formula
    assert sum(walked.by_component.values()) == walked.total
    assert sum(walked.activated_by_component.values()) == walked.activated
    assert sum(walked.mtp_by_component.values()) == walked.mtp
    assert sum(k.layers for k in walked.by_kind.values()) == cfg.num_layers
    assert sum(k.params for k in walked.by_kind.values()) == sum(walked.per_layer)


def test_counts_only_params_of_the_allocated_model():
    """On a small model, the count equals the nnx.Param leaves of a really built model, and the
    buffers (router bias, hash tables) are exactly the non-Param variables."""
    cfg = _cfg("tiny")
    model = build_model(cfg, seed=0)
    params = nnx.state(model, nnx.Param)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    others = nnx.state(model, nnx.Not(nnx.Param))
    n_buffers = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(others))
    pc = acc.param_counts(cfg)
    assert pc.total_with_mtp == n_params
    assert sum(pc.buffers.values()) == n_buffers
    emb = int(np.prod(model.embed.shape))
    assert pc.by_component["embedding"] == emb and pc.activated_by_component["embedding"] == 0


def test_activated_counts_only_the_chosen_experts():
    cfg = _cfg("tiny")
    pc = acc.param_counts(cfg)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    assert pc.activated_by_component["routed_experts"] * e == pc.by_component["routed_experts"] * k
    assert pc.activated == pc.total - pc.by_component["embedding"] \
        - pc.by_component["routed_experts"] + pc.activated_by_component["routed_experts"]
    more = acc.param_counts(cfg.replace(num_experts_per_tok=k + 1))
    assert more.total == pc.total and more.activated > pc.activated


def test_v32_baseline_parameters_match_published():
    v = acc.v32_param_counts()
    assert _rel(v.total, 671e9) <= 0.02 and _rel(v.activated, 37e9) <= 0.02


# ---------------------------------------------------------------------------- KV cache
def test_kv_cache_ratios_vs_v32_and_gqa8_at_1m():
    v32 = acc.v32_kv_bytes_per_token()
    for cfg, published in ((FLASH, 0.073), (PRO, 0.105)):
        per_token = acc.kv_cache_bytes_per_token(cfg, "released")
        assert abs(per_token / v32 - published) <= 0.01
        at_1m = acc.kv_cache_bytes(cfg, MILLION, "released")           # incl. fixed state
        assert abs(at_1m / (v32 * MILLION) - published) <= 0.01
        # ~2% of a BF16 GQA-8 model of the same depth (61 layers for Pro, as in the report).
        gqa = acc.gqa_kv_bytes_per_token(cfg.num_layers)
        assert abs(at_1m / (gqa * MILLION) - 0.02) <= 0.005
    assert acc.gqa_kv_bytes_per_token(PRO.num_layers) == acc.gqa_kv_bytes_per_token()


def test_kv_entry_layouts():
    # Released layouts (spec §12.1): 584 B main row, 68 B FP4 indexer key; V3.2: 656 + 132 B.
    assert acc.kv_entry_bytes(FLASH, "released") == (584, 68)
    v = acc.V32Config()
    assert (v.mla_entry_bytes, v.indexer_key_bytes) == (656, 132)
    # bf16 rows: 2 bytes per value; dtype_bytes=4 for fp32 caches doubles everything.
    assert acc.kv_entry_bytes(FLASH, "bf16") == (2 * FLASH.head_dim, 2 * FLASH.index_head_dim)
    assert acc.kv_cache_bytes_per_token(FLASH, "bf16", dtype_bytes=4) == \
        2 * acc.kv_cache_bytes_per_token(FLASH, "bf16")
    # Spec cross-check: Pro with everything in BF16 is about 9.6 GiB at 1M tokens.
    assert abs(acc.kv_cache_bytes_per_token(PRO, "bf16") * MILLION / 2**30 - 9.6) <= 0.1


@pytest.mark.parametrize("name", ["tiny", "v4_flash", "v4_pro"])
def test_kv_cache_grows_by_the_per_token_rate(name):
    """Over any span of lcm(ratios) tokens the cache grows by exactly span x per-token bytes;
    the state does not depend on the context length."""
    cfg = _cfg(name)
    span = int(np.lcm(cfg.compress_ratio_csa, cfg.compress_ratio_hca))
    for layout in acc.KV_LAYOUTS:
        rate = acc.kv_cache_bytes_per_token(cfg, layout)
        for n in (1, span - 1, 5 * span + 3):
            grow = acc.kv_cache_bytes(cfg, n + span, layout) - acc.kv_cache_bytes(cfg, n, layout)
            assert grow == pytest.approx(rate * span, abs=1e-9)
        state = acc.kv_cache_state_bytes(cfg, layout)
        assert acc.kv_cache_bytes(cfg, 1, layout) == state   # nothing compressed yet
        # An SWA-only model keeps only its windows.
    swa = _cfg("tiny", layer_prefix=(), layer_cycle=("swa",), layer_tail=())
    assert acc.kv_cache_bytes_per_token(swa, "bf16") == 0
    assert acc.kv_cache_state_bytes(swa, "bf16") == \
        swa.num_layers * swa.sliding_window * 2 * swa.head_dim


def test_kv_errors_name_the_argument():
    with pytest.raises(ValueError, match="layout"):
        acc.kv_cache_bytes_per_token(FLASH, "fp8")
    with pytest.raises(ValueError, match="dtype_bytes"):
        acc.kv_cache_bytes_per_token(FLASH, "released", dtype_bytes=2)
    with pytest.raises(ValueError, match="dtype_bytes"):
        acc.kv_cache_bytes_per_token(FLASH, "bf16", dtype_bytes=3)
    with pytest.raises(ValueError, match="context_len"):
        acc.kv_cache_bytes(FLASH, 0)


# ---------------------------------------------------------------------------- FLOPs
def test_decode_flop_ratios_vs_v32_at_1m():
    """FP8-equivalent FLOPs per token at 1M context: Pro ~27% (spec: 26.5%), Flash ~10% (9.9%)."""
    v32 = acc.v32_flops_per_token(MILLION)
    pro, flash = acc.flops_per_token(PRO, MILLION), acc.flops_per_token(FLASH, MILLION)
    assert abs(pro.weighted / v32.weighted - 0.265) <= 0.015
    assert abs(flash.weighted / v32.weighted - 0.099) <= 0.015
    # Unweighted (spec §12.2): Pro ~26%, Flash ~12%.
    assert abs(pro.total / v32.total - 0.26) <= 0.015
    assert abs(flash.total / v32.total - 0.12) <= 0.015
    # At 1M the V3.2 indexer dominates its cost (spec: ~88%).
    assert 0.85 <= v32.indexer / v32.total <= 0.92


def test_decode_flops_follow_the_entries_attended():
    cfg = _cfg("tiny")
    h, c = cfg.num_heads, cfg.head_dim
    for n in (1, 3, cfg.sliding_window, 50, 333):
        f = acc.flops_per_token(cfg, n)
        entries = sum(sum(acc.entries_per_query(cfg, s.kind, n)) for s in cfg.layers)
        assert f.attention == h * 4 * c * entries
        n_csa = sum(s.kind == "csa" for s in cfg.layers)
        assert f.indexer == n_csa * 2 * cfg.index_n_heads * cfg.index_head_dim * (n // 4)
        assert f.linear == 2 * acc.param_counts(cfg).activated_matmul
    # Dense CSA (indexer warm-up) attends every visible entry: never fewer.
    dense = acc.flops_per_token(cfg, 333, sparse=False)
    assert dense.attention > acc.flops_per_token(cfg, 333).attention
    assert acc.entries_per_query(cfg, "csa", 5) == (5, 1)
    with pytest.raises(ValueError, match="kind"):
        acc.entries_per_query(cfg, "mla", 5)


def test_train_flops_count_the_entries_the_model_attends():
    """Mean attended entries per query, from the model's own visibility rule and top-k (-1 =
    none), equal what train_flops_per_token charges."""
    cfg = _cfg("tiny")
    s = 45                                   # not a multiple of either ratio
    h, c = cfg.num_heads, cfg.head_dim
    attended = 0.0
    visible_csa = None
    for spec in cfg.layers + (LayerSpec(cfg.num_layers, "swa", "score"),):   # + MTP (SWA)
        window = np.minimum(np.arange(1, s + 1), cfg.sliding_window).mean()
        comp = 0.0
        if spec.kind != "swa":
            m = cfg.ratio_of(spec.kind)
            vis = sequence_entry_visible(s, m, jnp.ones((1, s // m), bool))
            if spec.kind == "csa":
                visible_csa = np.asarray(vis).sum(-1).mean()
                scores = jnp.where(vis, jax.random.normal(jax.random.key(0), vis.shape), -jnp.inf)
                comp = (np.asarray(select_topk(scores, cfg.index_topk)) >= 0).sum(-1).mean()
            else:
                comp = np.asarray(vis).sum(-1).mean()
        attended += window + comp
    t = acc.train_flops_per_token(cfg, s)
    assert t.attention == pytest.approx(h * 4 * c * attended, rel=1e-12)
    n_csa = sum(sp.kind == "csa" for sp in cfg.layers)
    assert t.indexer == pytest.approx(n_csa * 2 * cfg.index_n_heads * cfg.index_head_dim
                                      * visible_csa, rel=1e-12)
    pc = acc.param_counts(cfg)
    assert t.linear == 2 * (pc.activated_matmul + pc.mtp_activated_matmul + pc.by_component["head"])
    assert t.backward == 2 * (t.linear + t.attention + t.indexer)
    assert t.total == t.forward + t.backward
    no_mtp = acc.train_flops_per_token(cfg, s, include_mtp=False, indexer_target=False)
    assert no_mtp.linear == 2 * pc.activated_matmul and no_mtp.indexer_target == 0
    assert acc.train_flops_per_token(cfg, s, sparse=False).attention > t.attention


# ---------------------------------------------------------------------------- inspect_model
HEADINGS = ("== Model ==", "== Parameters", "== Per layer kind", "== Components ==",
            "== FLOPs per decoded token", "== Training FLOPs", "== KV cache")


def test_inspect_reports_flash_counts_and_ratios():
    from experiments.inspect_model import inspect
    text = inspect(FLASH, MILLION)
    for head in HEADINGS:
        assert head in text
    pc = acc.param_counts(FLASH)
    assert f"{pc.total:,}" in text and f"{pc.activated:,}" in text
    ratio = acc.flops_per_token(FLASH, MILLION).weighted / acc.v32_flops_per_token(MILLION).weighted
    assert f"{100 * ratio:.2f}%" in text


def test_cli_runs_on_tiny_with_overridden_layers():
    cmd = [sys.executable, "-m", "experiments.inspect_model", "--config=configs/tiny.py",
           "--config.model.num_layers=4", "--context=300"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    for head in HEADINGS:
        assert head in res.stdout
    cfg = _cfg("tiny", num_layers=4)
    assert f"{acc.param_counts(cfg).total:,}" in res.stdout
    # The per-kind table lists exactly the 4 layers of the overridden schedule.
    lines = res.stdout.split("== Per layer kind")[1].splitlines()
    rows = {ln.split()[0]: int(ln.split()[1]) for ln in lines
            if ln.strip() and ln.split()[0] in ("swa", "csa", "hca")}
    assert rows == {k: cfg.layer_kinds.count(k) for k in set(cfg.layer_kinds)}
    assert sum(rows.values()) == 4
