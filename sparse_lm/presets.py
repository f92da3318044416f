"""Model presets as ConfigDicts of `sparse_lm.config.ModelConfig` fields.

`v4_flash` and `v4_pro` are the published shapes (spec §2.1); `tiny` keeps every layer type (SWA,
CSA, HCA, hash- and score-routed MoE, MTP) at a size the CPU tests and the demo can afford.

    cfg = ModelConfig.from_dict(presets.tiny())          # or v4_flash(), v4_pro()

Every field is present, so every field can be overridden from the command line
(`--config.model.FIELD=VALUE`); fields whose value may be None (`attention_impl`) are typed
placeholders, which accept a string as well as None.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from sparse_lm.config import ModelConfig

MODEL_PRESETS = ("tiny", "v4_flash", "v4_pro")

# ModelConfig fields that may be None, with the type a command-line value is parsed as.
OPTIONAL_FIELDS = {"attention_impl": str, "selector_temperature": tuple}


def model_config_dict(fields: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """ConfigDict of ModelConfig fields; None-valued optional fields become typed placeholders
    (ml_collections cannot parse an override of a plain None field)."""
    d = dict(fields)
    for name, kind in OPTIONAL_FIELDS.items():
        if name in d and d[name] is None:
            d[name] = config_dict.placeholder(kind)
    return ml_collections.ConfigDict(d)


def _all_fields(**overrides) -> ml_collections.ConfigDict:
    d = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - set(d)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
    d.update(overrides)
    return model_config_dict(d)


def v4_flash() -> ml_collections.ConfigDict:
    # ModelConfig's defaults are the V4-Flash release values.
    return _all_fields()


def v4_pro() -> ml_collections.ConfigDict:
    return _all_fields(
        hidden_size=7168, num_layers=61, num_heads=128, q_lora_rank=1536, o_groups=16,
        layer_prefix=("hca", "hca"), layer_cycle=("csa", "hca"), layer_tail=("csa",),
        index_topk=1024, n_routed_experts=384, moe_intermediate_size=3072,
        routed_scaling_factor=2.5)


def tiny() -> ml_collections.ConfigDict:
    return _all_fields(
        vocab_size=256, hidden_size=64, num_layers=8, num_heads=4, head_dim=32, rope_head_dim=16,
        q_lora_rank=32, o_groups=2, o_lora_rank=32, sliding_window=8,
        layer_prefix=("swa",), layer_cycle=("csa", "hca"), layer_tail=(),
        compress_ratio_csa=4, compress_ratio_hca=8,
        index_n_heads=4, index_head_dim=16, index_topk=2,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=2,
        yarn_original_max_position=64, init_std=0.02)


def lc_small() -> ml_collections.ConfigDict:
    """`lc_small`, the long-context model (experiments/long_context.py, configs/needle_lc.py):
    3 layers (SWA, CSA, HCA), width 64, 4 heads x 32 over one K=V head, window 128; CSA ratio 4
    with top-16 over an indexer of 4 heads x 16; HCA ratio 128; MoE 4 experts top-2 (the first
    layer hash-routed; the platform's expert matmuls, `moe_impl=None`); mHC 4 streams; fp32.
    YaRN factor 16 over 64K original positions, so max_context = 1M (16 x 65536)."""
    return _all_fields(
        vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, head_dim=32, rope_head_dim=16,
        q_lora_rank=64, o_groups=1, o_lora_rank=32, sliding_window=128,
        layer_prefix=("swa",), layer_cycle=("csa", "hca"), layer_tail=(),
        compress_ratio_csa=4, compress_ratio_hca=128, index_n_heads=4, index_head_dim=16,
        index_topk=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        num_hash_layers=1, yarn=True, yarn_factor=16.0, yarn_original_max_position=65536,
        max_context=1 << 20, mtp_depth=0, moe_impl=None, dtype="float32", param_dtype="float32")


def four_layer(*, hidden_size: int, head_dim: int, q_lora_rank: int, sliding_window: int,
               compress_ratio_hca: int, index_head_dim: int, index_topk: int,
               moe_intermediate_size: int, yarn_original_max_position: int
               ) -> ml_collections.ConfigDict:
    """A 4-layer byte-level model with every layer kind: [swa (hash-routed), csa, hca, csa] +
    MTP, 4 heads, CSA ratio 4, 4 indexer heads, 8 experts top-2 in the blocked XLA form (the
    fast one on CPU). The demo and the notebooks' quick model are two sizes of it."""
    m = tiny()
    m.update(dict(
        vocab_size=256, hidden_size=hidden_size, num_layers=4, num_heads=4, head_dim=head_dim,
        rope_head_dim=16, q_lora_rank=q_lora_rank, o_groups=2, o_lora_rank=q_lora_rank,
        sliding_window=sliding_window, layer_prefix=("swa",), layer_cycle=("csa", "hca"),
        layer_tail=("csa",), compress_ratio_csa=4, compress_ratio_hca=compress_ratio_hca,
        index_n_heads=4, index_head_dim=index_head_dim, index_topk=index_topk,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=moe_intermediate_size,
        num_hash_layers=1, yarn_original_max_position=yarn_original_max_position,
        moe_impl="xla"))
    return m


def model_preset(name: str) -> ml_collections.ConfigDict:
    """The named model preset ("tiny", "v4_flash", "v4_pro")."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {list(MODEL_PRESETS)}")
    return {"tiny": tiny, "v4_flash": v4_flash, "v4_pro": v4_pro}[name]()
