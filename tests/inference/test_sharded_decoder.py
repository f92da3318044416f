"""Sharded inference: chunked prefill + decode under every sharding preset on 8 fake CPU devices
equal the unsharded full forward (fp32, 1e-5), with parameters and caches laid out as the
preset says; the layout's pieces on their own (stacked-slice names, bad arguments)."""
from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparse_lm.inference import Decoder, InferenceError
from sparse_lm.model import build_model
from sparse_lm.sharding import partition
from sparse_lm.sharding.mesh import ShardingError
from sparse_lm.sharding.presets import PRESETS, load_preset
from tests.sharding.helpers import ROOT, run_worker, worker_env
from tests.sharding.workers import small_config

RUN = [p + (":moe_dispatch=a2a_padded" if p in ("fsdp_ep", "ep_as_cp") else "") for p in PRESETS]


def _worker(task: str, args: dict) -> dict:
    return run_worker(task, args, module="tests.inference.sharded_worker", timeout=1800)


@pytest.fixture(scope="module")
def decoded():
    return _worker("decode", {"layers": 3, "presets": RUN})


@pytest.mark.parametrize("preset", RUN)
def test_sharded_prefill_and_decode_equal_the_unsharded_full_forward(decoded, preset):
    r = decoded["presets"][preset]
    assert r["prefill_max_abs_err"] < 1e-5, r
    assert max(r["decode_max_abs_err"]) < 1e-5, r


def test_each_preset_places_parameters_and_caches_as_its_rules_say(decoded):
    p = decoded["presets"]
    dp, fsdp, tp, ep, epcp, cp = (p[name] for name in RUN)
    # dp: parameters replicated, batch rows (and so every cache) split over data
    assert dp["params_sharded"][0] == 0 and dp["entries_spec"] == "P('data',)"
    # FSDP stores every layer parameter it can split; experts split over `expert` in the EP presets
    assert fsdp["block_params_sharded"][0] > 0.7 * fsdp["block_params_sharded"][1], fsdp
    assert fsdp["params_sharded"][0] >= fsdp["params_sharded"][1] // 2, fsdp
    assert ep["expert_spec"].startswith("P('expert'") and ep["moe_dispatch"] == "a2a_padded"
    # tensor parallelism: query heads (wq_b's output) over `tensor`
    assert "'tensor'" in tp["wq_b_spec"] and tp["mesh"]["tensor"] == 4
    # sequence-sharded presets split the compressed entries' length
    assert cp["entries_spec"] == "P('fsdp', 'context')", cp
    assert epcp["entries_spec"] == "P(None, 'expert')", epcp
    # every cache array is split over the batch axes; in ep_as_cp (batch axes of size 1) only
    # the three entries arrays (CSA compressor, CSA indexer, HCA), over `expert`
    for name, r in p.items():
        want = 3 if name.startswith("ep_as_cp") else r["cache_sharded"][1]
        assert r["cache_sharded"][0] == want, (name, r)


def test_expert_dispatch_pads_rows_that_do_not_split_over_the_devices():
    r = _worker("ep_padding", {})
    assert r["shape"] == [r["rows"], 16] and r["max_abs_err"] < 1e-5 * max(1.0, r["scale"]), r
    assert "moe_capacity_factor=0" in r["capacity_refusal"], r


def test_slices_of_stacked_parameters_take_their_layer_layout():
    """`layer_blocks` slices keep the stacked metadata ('layers', ...): each slice's spec is the
    stacked parameter's without its leading (unsplit) layer entry."""
    model = nnx.eval_shape(lambda: build_model(small_config(num_layers=5)))   # 2 scanned cycles
    sizes = {"data": 1, "fsdp": 2, "tensor": 4, "expert": 1, "context": 1}
    rules = load_preset("fsdp_tp").rules

    def specs(state):
        leaves = jax.tree_util.tree_leaves_with_path(
            partition.state_specs(state, sizes, rules),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        shapes = [x.shape for x in jax.tree.leaves(state)]
        return {partition.path_str(p): tuple(s) + (None,) * (len(shape) - len(s))
                for (p, s), shape in zip(leaves, shapes)}

    full = specs(nnx.split(model)[1])
    blocks = model.layer_blocks()
    assert len(blocks) == 5
    checked = 0
    for i, block in enumerate(blocks[1:]):          # the cycle's layers, cycle slot i % 2
        for path, spec in specs(nnx.split(block)[1]).items():
            stacked = full[f"cycles/blocks/{i % 2}/{path}"]
            assert stacked[0] is None and spec == stacked[1:], path
            checked += any(a is not None for a in spec)
    assert checked > 40
    assert partition.leaf_names(("layers", "embed", "kv"), (4, 8)) == ("embed", "kv")
    with pytest.raises(ShardingError, match="logical names"):
        partition.leaf_names(("embed", "kv", "heads"), (4, 8))


def test_mesh_without_a_preset_is_an_error(tiny_cfg):
    model = nnx.eval_shape(lambda: build_model(tiny_cfg))
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(InferenceError, match="without sharding="):
        Decoder(model, mesh=mesh)
    with pytest.raises(ShardingError, match="unknown sharding preset"):
        Decoder(model, sharding="no_such_preset")


def test_one_device_layout_decodes_like_the_plain_decoder(tiny_cfg):
    """A preset on a 1-device mesh changes nothing: same logits as the decoder without one."""
    cfg = tiny_cfg.replace(num_layers=3, layer_prefix=("swa",), layer_cycle=("csa", "hca"),
                           layer_tail=(), num_hash_layers=1)
    model = build_model(cfg, seed=0)
    prompt = [np.arange(1, 19) % cfg.vocab_size]
    plain, sharded = Decoder(model), Decoder(model, sharding="fsdp")
    a, _ = plain.prefill(plain.init_cache(1, 32), prompt, chunk_size=8)
    b, cache = sharded.prefill(sharded.init_cache(1, 32), prompt, chunk_size=8)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(cache))


def test_generate_under_a_preset_gives_the_unsharded_text(tiny_cfg):
    from experiments.generate import generate_text
    model = build_model(tiny_cfg.replace(num_layers=3, layer_prefix=("swa",),
                                         layer_cycle=("csa", "hca"), layer_tail=(),
                                         num_hash_layers=1), seed=3)
    kw = dict(max_new_tokens=5, temperature=0.0, chunk_size=4)
    assert generate_text(model, "def f(", sharding="fsdp_tp:tensor=1", **kw) == \
        generate_text(model, "def f(", **kw)


def test_generate_cli_refuses_an_unknown_preset_before_loading():
    p = subprocess.run([sys.executable, "-m", "experiments.generate", "--config=configs/tiny.py",
                        "--prompt=hi", "--sharding=fsdp_xx"], cwd=ROOT, env=worker_env(1),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "unknown sharding preset 'fsdp_xx'" in p.stderr, p.stderr[-2000:]
    assert "untrained" not in p.stderr
