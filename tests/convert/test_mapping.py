"""Name/shape mapping between the HF state dict and our NNX state."""
import numpy as np
import pytest

from sparse_lm.convert import mapping
from sparse_lm.convert.core import abstract_model
from tests.conftest import tiny_config


def test_every_leaf_of_the_model_is_mapped_exactly_once_and_hf_names_are_unique():
    """tiny: SWA/CSA/HCA, hash + score layers, a scanned cycle, a tail and MTP."""
    cfg = tiny_config()
    assert cfg.layer_groups.num_cycles >= 2 and cfg.mtp_depth == 1
    _, _, flat = abstract_model(cfg)
    groups = mapping.build_groups(cfg)
    ours = [p for g in groups for p in g.ours]
    assert sorted(map(str, ours)) == sorted(map(str, flat)) and len(ours) == len(set(ours))
    names = [n for g in groups for n in g.hf_names]
    assert len(names) == len(set(names))
    # Each HF layer index 0..L-1 appears, and the stacked groups list one prefix per repeat.
    layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
    assert layers == set(range(cfg.num_layers))
    for g in groups:
        assert len(g.hf) == (cfg.layer_groups.num_cycles if g.stacked else 1)


def _random(shape, rng):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("transform,our_shapes", [
    (mapping.Transpose(), [(6, 5)]),
    (mapping.GroupedOutA(3), [(3, 8, 4)]),
    (mapping.ExpertsGateUp(), [(4, 6, 5), (4, 6, 5)]),
    (mapping.ExpertsDown(), [(4, 5, 6)]),
    (mapping.Identity(), [(7,)]),
])
def test_transforms_are_exact_inverses_and_report_the_hf_shapes(transform, our_shapes):
    rng = np.random.default_rng(0)
    ours = [_random(s, rng) for s in our_shapes]
    hf = transform.to_hf(ours)
    assert [a.shape for a in hf] == transform.hf_shapes(our_shapes)
    back = transform.to_ours(hf)
    assert all(np.array_equal(a, b) for a, b in zip(back, ours))
    assert all(np.array_equal(a, b) for a, b in zip(transform.to_hf(back), hf))


def test_grouped_output_layout_matches_transformers_block_rows():
    """Group i of o_a_proj is rows i*o .. (i+1)*o of the HF [g*o, H/g*D] weight (NOTES §7)."""
    rng = np.random.default_rng(1)
    g, o, hgd = 3, 4, 8
    hf = _random((g * o, hgd), rng)
    x = _random((2, g, hgd), rng)                          # per-group attention outputs
    want = np.stack([x[:, i] @ hf[i * o:(i + 1) * o].T for i in range(g)], axis=1)
    (ours,) = mapping.GroupedOutA(g).to_ours([hf])
    np.testing.assert_allclose(np.einsum("bgi,gio->bgo", x, ours), want, rtol=1e-6)


def test_expert_layouts_match_transformers_gate_then_up_rows():
    """h = u @ gate_up[e].T: the first I outputs are the gate (W1), the rest the up (W3)."""
    rng = np.random.default_rng(2)
    e, i, d = 3, 5, 4
    gu, down = _random((e, 2 * i, d), rng), _random((e, d, i), rng)
    u = _random((7, d), rng)
    w_gate, w_up = mapping.ExpertsGateUp().to_ours([gu])
    (w_down,) = mapping.ExpertsDown().to_ours([down])
    for k in range(e):
        h = u @ gu[k].T
        np.testing.assert_allclose(u @ w_gate[k], h[:, :i], rtol=1e-6)
        np.testing.assert_allclose(u @ w_up[k], h[:, i:], rtol=1e-6)
        np.testing.assert_allclose(h[:, :i] @ w_down[k], h[:, :i] @ down[k].T, rtol=1e-6)


def test_hash_table_values_must_be_expert_ids():
    t = mapping.HashIds(8)
    (ours,) = t.to_ours([np.array([[0, 7], [3, 1]], np.int64)])
    assert ours.dtype == np.int32 and t.to_hf([ours])[0].dtype == np.int64
    with pytest.raises(mapping.MappingError, match="outside"):
        t.to_ours([np.array([[0, 8]], np.int64)])


def test_official_names_translate_both_ways_for_every_tensor_of_the_model():
    cfg = tiny_config()
    for g in mapping.build_groups(cfg):
        for name in g.hf_names:
            if ".mlp.experts." in name:
                parts = mapping.official_expert_names(name, cfg.n_routed_experts)
                assert len(parts) == cfg.n_routed_experts * (1 if "down" in name else 2)
                for e, part, official in parts:
                    assert mapping.official_to_logical(official) == \
                        mapping.ExpertPart(name, e, part)
            else:
                official = mapping.logical_to_official(name)
                assert not official.startswith("model.") and mapping.official_to_logical(
                    official) == name
    assert mapping.official_to_logical("layers.3.attn.compressor.norm.weight") == \
        "model.layers.3.self_attn.compressor.kv_norm.weight"
    assert mapping.official_to_logical("mtp.0.norm.weight") == "mtp.0.norm.weight"
    assert mapping.official_to_logical("layers.0.attn.not_a_tensor") is None


def test_release_shapes_of_v4_flash_follow_the_spec_tables():
    """Expected HF shapes for the V4-Flash preset (spec §2.1, §4.1, §5, §9, §10), from the
    abstract model only (nothing allocated)."""
    from configs import model_presets
    from sparse_lm.config import ModelConfig
    from sparse_lm.convert.core import _expected_hf_shapes
    cfg = ModelConfig.from_dict(model_presets.v4_flash())
    _, _, flat = abstract_model(cfg)
    shapes = _expected_hf_shapes(mapping.build_groups(cfg), flat)
    L = "model.layers."
    want = {
        L + "0.self_attn.q_a_proj.weight": (1024, 4096),             # SWA layer
        L + "2.self_attn.q_b_proj.weight": (64 * 512, 1024),
        L + "2.self_attn.kv_proj.weight": (512, 4096),
        L + "2.self_attn.o_a_proj.weight": (8 * 1024, 4096),          # g*o_lora, H*D/g
        L + "2.self_attn.o_b_proj.weight": (4096, 8 * 1024),
        L + "2.self_attn.compressor.kv_proj.weight": (1024, 4096),     # CSA: 2c
        L + "2.self_attn.compressor.position_bias": (4, 1024),
        L + "3.self_attn.compressor.kv_proj.weight": (512, 4096),      # HCA: c
        L + "3.self_attn.compressor.position_bias": (128, 512),
        L + "42.self_attn.compressor.indexer.kv_proj.weight": (256, 4096),
        L + "42.self_attn.compressor.indexer.position_bias": (4, 256),
        L + "42.self_attn.compressor.indexer.kv_norm.weight": (128,),
        L + "42.self_attn.compressor.indexer.q_b_proj.weight": (64 * 128, 1024),
        L + "42.self_attn.compressor.indexer.scorer.weights_proj.weight": (64, 4096),
        L + "1.mlp.gate.tid2eid": (129280, 6),
        L + "3.mlp.gate.e_score_correction_bias": (256,),
        L + "17.mlp.experts.gate_up_proj": (256, 2 * 2048, 4096),
        L + "17.mlp.experts.down_proj": (256, 4096, 2048),
        L + "17.mlp.shared_experts.down_proj.weight": (4096, 2048),
        L + "40.attn_hc.fn": (24, 4 * 4096),
        "model.hc_head.hc_fn": (4, 4 * 4096),
        "lm_head.weight": (129280, 4096),
        "mtp.0.e_proj.weight": (4096, 4096),
        "mtp.0.self_attn.kv_proj.weight": (512, 4096),
    }
    assert {k: shapes.get(k) for k in want} == want
    assert L + "0.self_attn.compressor.kv_proj.weight" not in shapes      # SWA: no compressor
    assert L + "3.self_attn.compressor.indexer.kv_proj.weight" not in shapes  # HCA: no indexer
    assert L + "3.mlp.gate.tid2eid" not in shapes                          # score-routed
    assert not any(k.startswith("mtp.0.self_attn.compressor") for k in shapes)  # MTP is SWA


def test_every_naming_scheme_names_every_tensor_once_and_is_detected_as_itself():
    """Each scheme's table renders every logical tensor of a model with every layer kind (hash
    and score routing, MTP where the scheme has it) to distinct physical names that map back,
    and a checkpoint written that way is detected as that scheme and no other."""
    from sparse_lm.convert.mapping import SCHEMES, ExpertPart, detect_scheme
    cfg = tiny_config()
    for scheme in SCHEMES:
        c = cfg if scheme.mtp_prefix is not None else cfg.replace(mtp_depth=0)
        logical = [n for g in mapping.build_groups(c) for n in g.hf_names]
        physical = {}
        for name in logical:
            for p in scheme.to_physical(name, c.n_routed_experts):
                assert p not in physical, (scheme.name, p)
                back = scheme.to_logical(p)
                physical[p] = back.logical if isinstance(back, ExpertPart) else back
                assert physical[p] == name, (scheme.name, p, back)
        found = detect_scheme(physical)
        assert found.scheme.name == scheme.name and found.unmatched == ()
