"""HF config.json <-> ModelConfig: the published configs, transformers' saved form, and errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from configs import model_presets
from sparse_lm.config import ConfigError, ModelConfig
from sparse_lm.convert.hf_config import (config_differences, from_hf_config, read_hf_config,
                                         to_hf_config)
from sparse_lm.model.attention import rope_table

DATA = Path(__file__).resolve().parents[1] / "parity_data"
CASES = ["flash_like", "pro_like", "topk_covers_all", "small_window"]


def published(**over):
    """The released V4-Flash config.json fields (spec §2.1), as the hub ships them."""
    d = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43,
        "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
        "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
        "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0],
        "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6,
        "moe_intermediate_size": 2048, "num_hash_layers": 3, "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "num_nextn_predict_layers": 1, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02,
        "torch_dtype": "bfloat16", "expert_dtype": "fp4",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    }
    d.update(over)
    return d


def test_published_flash_and_pro_configs_give_our_presets():
    flash = from_hf_config(published())
    assert config_differences(flash, ModelConfig.from_dict(model_presets.v4_flash())) == []
    pro = from_hf_config(published(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        o_groups=16, compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0], index_topk=1024,
        n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5))
    assert config_differences(pro, ModelConfig.from_dict(model_presets.v4_pro())) == []
    assert pro.layer_kinds[:3] == ("hca", "hca", "csa") and pro.mtp_depth == 1


@pytest.mark.parametrize("case", CASES)
def test_transformers_saved_configs_match_their_recorded_schedule_and_rope_tables(case):
    """config.json files written by transformers (layer_types, mlp_layer_types, nested
    rope_parameters): the layer kinds, hash layers and both RoPE tables (bit-exact inverse
    frequencies recorded by transformers in meta.json) must come out as transformers built them."""
    meta = json.loads((DATA / case / "meta.json").read_text())
    cfg = from_hf_config(read_hf_config(DATA / case))
    kinds = {"sliding_attention": "swa", "compressed_sparse_attention": "csa",
             "heavily_compressed_attention": "hca"}
    assert list(cfg.layer_kinds) == [kinds[t] for t in meta["layer_types"]]
    assert cfg.num_hash_layers == meta["mlp_layer_types"].count("hash_moe")
    assert cfg.yarn == (meta["rope_parameters"]["compress"]["rope_type"] == "yarn")
    np.testing.assert_array_equal(rope_table(cfg, "swa"),
                                  np.array(meta["inv_freq"]["main"], np.float32))
    np.testing.assert_array_equal(rope_table(cfg, "csa"),
                                  np.array(meta["inv_freq"]["compress"], np.float32))


@pytest.mark.parametrize("preset", ["tiny", "v4_flash", "v4_pro"])
def test_to_hf_then_from_hf_reproduces_the_config(preset):
    cfg = ModelConfig.from_dict(getattr(model_presets, preset)())
    d = json.loads(json.dumps(to_hf_config(cfg)))          # through JSON, as written to disk
    assert config_differences(from_hf_config(d), cfg) == []
    # The compress_ratios form alone (what other readers use) gives the same schedule.
    d.pop("layer_types")
    assert from_hf_config(d).layer_kinds == cfg.layer_kinds


def test_without_layer_types_or_ratios_the_transformers_default_schedule_is_used():
    """Spec §14.13: transformers' default is HCA, HCA, then HCA/CSA alternating (one layer off
    from the real Pro schedule); a config that omits both must mean what transformers builds."""
    d = published(num_hidden_layers=6)
    d.pop("compress_ratios")
    assert from_hf_config(d).layer_kinds == ("hca", "hca", "hca", "csa", "hca", "csa")


def test_mtp_entry_of_compress_ratios_is_dropped_and_layer_types_must_agree():
    d = published(num_hidden_layers=4, compress_ratios=[0, 0, 4, 128, 0],
                  layer_types=["sliding_attention"] * 2 + ["compressed_sparse_attention",
                                                           "heavily_compressed_attention"])
    assert from_hf_config(d).layer_kinds == ("swa", "swa", "csa", "hca")
    d["layer_types"][3] = "compressed_sparse_attention"
    with pytest.raises(ConfigError, match="compress_ratios.*disagrees with layer_types"):
        from_hf_config(d)


@pytest.mark.parametrize("field,value,match", [
    ("scoring_func", "sigmoid", "'scoring_func'='sigmoid'"),
    ("num_key_value_heads", 8, "'num_key_value_heads'=8"),
    ("n_shared_experts", 2, "'n_shared_experts'=2"),
    ("tie_word_embeddings", True, "'tie_word_embeddings'=True"),
    ("compress_ratios", [0, 0] + [4, 64] * 20 + [4] + [0], r"'compress_ratios\[3\]'=64"),
    ("layer_types", ["sliding_attention"] * 42 + ["linear_attention"], "'layer_types'"),
    ("mlp_layer_types", ["moe", "hash_moe"] + ["moe"] * 41, "'mlp_layer_types'.*prefix"),
    ("rope_scaling", {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                      "attention_factor": 1.277}, "attention_factor"),
    ("rope_scaling", {"type": "longrope", "factor": 4}, "'longrope'"),
    ("num_nextn_predict_layers", 2, "'num_nextn_predict_layers'=2"),
    ("o_groups", 5, "'o_groups'"),
    ("sparse_mode", "dense", r"\['sparse_mode'\]"),
])
def test_configs_we_cannot_represent_are_errors_naming_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        from_hf_config(published(**{field: value}))


def test_configs_hf_file_builds_the_model_config_from_a_checkpoint_directory():
    from configs import hf
    cd = hf.get_config(str(DATA / "flash_like"))
    cfg = ModelConfig.from_dict(cd.model)
    assert config_differences(cfg, from_hf_config(read_hf_config(DATA / "flash_like"))) == []
    assert ModelConfig.from_dict(hf.get_config(str(DATA / "pro_like" / "config.json")).model) \
        .layer_kinds == ("hca", "hca", "csa", "hca")
    with pytest.raises(ValueError, match="needs a path"):
        hf.get_config()


def test_only_fields_a_config_json_determines_are_compared():
    """Execution choices (dtype, attention implementation, remat, ...) may differ freely from a
    checkpoint; architecture may not."""
    cfg = from_hf_config(published())
    assert config_differences(cfg, cfg.replace(dtype="bfloat16", remat="full", init_std=0.1,
                                               attention_impl="reference")) == []
    assert config_differences(cfg, cfg.replace(yarn=False)) == ["yarn: True vs False"]
    assert config_differences(cfg.replace(yarn=False), cfg.replace(yarn=False, yarn_factor=4.0)) \
        == []
    assert config_differences(cfg, cfg.replace(index_topk=7)) == ["index_topk: 512 vs 7"]
