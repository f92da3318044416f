"""`ModelConfig` from / to a Hugging Face DeepSeek-V4 `config.json`.

Reads what transformers 5.23.0 writes (`layer_types`, `mlp_layer_types`, `compress_rates`, nested
`rope_parameters`) and what the released checkpoints ship (`compress_ratios` of length L+1 with
the MTP entry last, `num_hash_layers`, `qk_rope_head_dim`, flat `rope_scaling`), with the same
precedence rules as transformers (tools/parity/NOTES.md §1-2):

* layer kinds: `layer_types` > `compress_ratios` (cut to L; 0 -> SWA, 4 -> CSA, 128 -> HCA, or
  the configured rates) > transformers' default. Both given: they must agree.
* compression rates: `compress_rates` dict, legacy `compress_rate_csa/hca`, default 4 / 128.
* hash layers: `mlp_layer_types` (a prefix of "hash_moe") > `num_hash_layers` > 3.
* RoPE: the `main` table (rope_theta) never has YaRN; the `compress` table uses YaRN iff its type
  is "yarn" (factor, original length, beta_fast/beta_slow falling back to 32/1 when missing or 0).

Every field transformers reads either maps to a `ModelConfig` field, is checked against the only
value this model can represent, or is listed as informational. Anything else is a `ConfigError`
naming the field: a config we cannot represent is never loaded approximately.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from sparse_lm.config import ConfigError, ModelConfig, schedule_from_ratios

LAYER_TYPE_TO_KIND = {"sliding_attention": "swa", "compressed_sparse_attention": "csa",
                      "heavily_compressed_attention": "hca"}
KIND_TO_LAYER_TYPE = {v: k for k, v in LAYER_TYPE_TO_KIND.items()}
RATIO_LABELS = {0: "swa", 4: "csa", 128: "hca"}   # transformers' meaning of compress_ratios values

# Direct one-to-one fields: HF name -> ModelConfig name.
_DIRECT = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "head_dim": "head_dim", "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups", "o_lora_rank": "o_lora_rank", "sliding_window": "sliding_window",
    "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim",
    "index_topk": "index_topk", "n_routed_experts": "n_routed_experts",
    "num_experts_per_tok": "num_experts_per_tok", "moe_intermediate_size": "moe_intermediate_size",
    "routed_scaling_factor": "routed_scaling_factor", "swiglu_limit": "swiglu_limit",
    "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
    "rms_norm_eps": "rms_norm_eps",
}
# Fields with exactly one representable value (value transformers/the release use).
_REQUIRED = {
    "num_key_value_heads": 1,        # one shared K=V head
    "n_shared_experts": 1,           # transformers always builds exactly one shared expert
    "scoring_func": "sqrtsoftplus",
    "hidden_act": "silu",
    "norm_topk_prob": True,          # top-k weights are always normalised
    "topk_method": "noaux_tc",
    "tie_word_embeddings": False,    # our lm_head is its own matrix
    "attention_bias": False,
    "mlp_bias": False,
    "model_type": "deepseek_v4",
}
# Fields that do not change the forward function (bookkeeping, generation, training knobs).
_INFORMATIONAL = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "bos_token_id",
    "eos_token_id", "pad_token_id", "initializer_range", "max_position_embeddings",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "attention_dropout",
    "auto_map", "quantization_config", "expert_dtype", "_name_or_path", "name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "tokenizer_class", "generation_config",
}
_HANDLED = {"layer_types", "compress_ratios", "compress_rates", "compress_rate_csa",
            "compress_rate_hca", "mlp_layer_types", "num_hash_layers", "qk_rope_head_dim",
            "partial_rotary_factor", "rope_theta", "compress_rope_theta", "rope_parameters",
            "rope_scaling", "num_nextn_predict_layers"}


def _err(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config.json field {field!r}={value!r} cannot be represented: {why}")


def _kinds_from_ratios(ratios, rates: Mapping[str, int], n: int) -> list[str]:
    by_value = {0: "swa", rates["csa"]: "csa", rates["hca"]: "hca"}
    kinds = []
    for i, r in enumerate(list(ratios)[:n]):
        if r in RATIO_LABELS:
            kinds.append(RATIO_LABELS[r])
        elif r in by_value:
            kinds.append(by_value[r])
        else:
            raise _err(f"compress_ratios[{i}]", r,
                       f"allowed values are 0 (SWA), 4 (CSA), 128 (HCA) or the configured rates "
                       f"{rates['csa']}/{rates['hca']}")
    if len(kinds) != n:
        raise _err("compress_ratios", list(ratios),
                   f"needs at least num_hidden_layers={n} entries (L, or L+1 with the MTP layer)")
    return kinds


def _rope(d: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE fields: rope_theta, compress_rope_theta, yarn*, and the rotary dim."""
    rp = d.get("rope_parameters")
    if isinstance(rp, Mapping) and isinstance(rp.get("main"), Mapping) and \
            isinstance(rp.get("compress"), Mapping):
        main, comp = dict(rp["main"]), dict(rp["compress"])
        if "rope_theta" not in main:
            main["rope_theta"] = d.get("rope_theta", 10000.0)
        if "rope_theta" not in comp:
            comp["rope_theta"] = d.get("compress_rope_theta", 160000.0)
    else:
        flat = dict(rp) if isinstance(rp, Mapping) else dict(d.get("rope_scaling") or {})
        main = {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)}
        comp = {**flat, "rope_theta": d.get("compress_rope_theta", 160000.0)}
    mtype = main.get("rope_type", main.get("type", "default"))
    if mtype != "default":
        raise _err("rope_parameters.main.rope_type", mtype,
                   "SWA-only layers use plain RoPE; only 'default' is supported")
    ctype = comp.get("rope_type", comp.get("type", "default"))
    out = {"rope_theta": float(main["rope_theta"]),
           "compress_rope_theta": float(comp["rope_theta"])}
    if ctype == "default":
        out["yarn"] = False
    elif ctype == "yarn":
        orig = comp.get("original_max_position_embeddings")
        if not orig:
            raise _err("rope_parameters.compress.original_max_position_embeddings", orig,
                       "YaRN needs the original context length")
        factor = comp.get("factor")
        if factor is None:
            factor = d.get("max_position_embeddings", 1048576) / orig
        af = comp.get("attention_factor", 1.0)
        if af is not None and float(af) != 1.0:
            raise _err("rope_parameters.compress.attention_factor", af,
                       "DeepSeek-V4 applies no YaRN attention temperature; only 1.0 is supported")
        if comp.get("truncate", True) is not True:
            raise _err("rope_parameters.compress.truncate", comp.get("truncate"),
                       "only the truncated (floor/ceil) YaRN ramp bounds are supported")
        out.update(yarn=True, yarn_factor=float(factor), yarn_original_max_position=int(orig),
                   yarn_beta_fast=float(comp.get("beta_fast") or 32.0),
                   yarn_beta_slow=float(comp.get("beta_slow") or 1.0))
    else:
        raise _err("rope_parameters.compress.rope_type", ctype, "allowed values: 'default', 'yarn'")
    # Rotary dim: qk_rope_head_dim, or head_dim * partial_rotary_factor (both: must agree).
    head_dim = d.get("head_dim", 512)
    prfs = {p.get("partial_rotary_factor") for p in (main, comp)} | {d.get("partial_rotary_factor")}
    prfs.discard(None)
    if len(prfs) > 1:
        raise _err("partial_rotary_factor", sorted(prfs),
                   "the main and compress tables must rotate the same number of dims")
    r_given = d.get("qk_rope_head_dim")
    if prfs:
        r = int(head_dim * prfs.pop())
        if r_given is not None and r_given != r:
            raise _err("qk_rope_head_dim", r_given,
                       f"disagrees with head_dim * partial_rotary_factor = {r}")
    else:
        r = r_given if r_given is not None else int(head_dim * 64 / 512)
    out["rope_head_dim"] = r
    return out


def from_hf_config(d: Mapping[str, Any], **overrides) -> ModelConfig:
    """Hugging Face config.json dict -> ModelConfig (`overrides` set non-architectural fields,
    e.g. dtype, or mtp_depth when the checkpoint has no MTP weights)."""
    d = dict(d)
    unknown = sorted(set(d) - set(_DIRECT) - set(_REQUIRED) - _INFORMATIONAL - _HANDLED)
    if unknown:
        raise ConfigError(f"config.json has field(s) {unknown} that this converter does not know; "
                          "they may change the model, so it refuses to guess. Known fields: "
                          f"{sorted(set(_DIRECT) | set(_REQUIRED) | _INFORMATIONAL | _HANDLED)}")
    for field, want in _REQUIRED.items():
        if field in d and d[field] != want:
            raise _err(field, d[field], f"the only supported value is {want!r}")
    n = d.get("num_hidden_layers", 43)
    kw: dict[str, Any] = {ours: d[hf] for hf, ours in _DIRECT.items() if hf in d}
    # Compression rates.
    rates = {"csa": 4, "hca": 128}
    cr = d.get("compress_rates") or {}
    for key in cr:
        if key not in ("compressed_sparse_attention", "heavily_compressed_attention"):
            raise _err(f"compress_rates.{key}", cr[key],
                       "keys must be compressed_sparse_attention / heavily_compressed_attention")
    rates["csa"] = cr.get("compressed_sparse_attention", d.get("compress_rate_csa", rates["csa"]))
    rates["hca"] = cr.get("heavily_compressed_attention", d.get("compress_rate_hca", rates["hca"]))
    if rates["csa"] == rates["hca"]:
        raise _err("compress_rates", cr, "CSA and HCA rates must differ")
    kw.update(compress_ratio_csa=int(rates["csa"]), compress_ratio_hca=int(rates["hca"]))
    # Layer kinds.
    kinds = None
    if d.get("layer_types") is not None:
        lt = list(d["layer_types"])
        bad = [t for t in lt if t not in LAYER_TYPE_TO_KIND]
        if bad:
            raise _err("layer_types", bad, f"allowed values: {sorted(LAYER_TYPE_TO_KIND)}")
        if len(lt) < n:
            raise _err("layer_types", lt, f"needs num_hidden_layers={n} entries")
        kinds = [LAYER_TYPE_TO_KIND[t] for t in lt[:n]]
    if d.get("compress_ratios") is not None:
        from_ratios = _kinds_from_ratios(d["compress_ratios"], rates, n)
        if kinds is not None and kinds != from_ratios:
            raise _err("compress_ratios", d["compress_ratios"],
                       f"disagrees with layer_types {d['layer_types']}")
        kinds = from_ratios
    if kinds is None:  # transformers' default (spec §14.13: one layer off from the real Pro one)
        kinds = ["hca"] * min(n, 2) + ["csa" if i % 2 else "hca" for i in range(max(n - 2, 0))]
    prefix, cycle, tail = schedule_from_ratios([{"swa": 0, "csa": 4, "hca": 128}[k] for k in kinds])
    kw.update(layer_prefix=prefix, layer_cycle=cycle, layer_tail=tail)
    # Hash layers.
    if d.get("mlp_layer_types") is not None:
        mt = list(d["mlp_layer_types"])[:n]
        bad = [t for t in mt if t not in ("hash_moe", "moe")]
        if bad:
            raise _err("mlp_layer_types", bad, "allowed values: 'hash_moe', 'moe'")
        n_hash = sum(1 for t in mt if t == "hash_moe")
        if mt != ["hash_moe"] * n_hash + ["moe"] * (len(mt) - n_hash):
            raise _err("mlp_layer_types", mt, "hash-routed layers must come first (a prefix)")
        if "num_hash_layers" in d and d["num_hash_layers"] != n_hash:
            raise _err("num_hash_layers", d["num_hash_layers"],
                       f"disagrees with mlp_layer_types ({n_hash} hash layers)")
    else:
        n_hash = min(n, d.get("num_hash_layers", 3))
    kw["num_hash_layers"] = n_hash
    kw.update(_rope(d))
    mtp = d.get("num_nextn_predict_layers", 1)
    if mtp not in (0, 1):
        raise _err("num_nextn_predict_layers", mtp, "allowed values: 0, 1")
    kw["mtp_depth"] = mtp
    if "swiglu_limit" in d and (d["swiglu_limit"] is None or d["swiglu_limit"] <= 0):
        raise _err("swiglu_limit", d.get("swiglu_limit"),
                   "must be > 0 (transformers always clamps the SwiGLU inputs)")
    kw.update(overrides)
    try:
        cfg = ModelConfig(**kw)
    except ConfigError as e:
        back = {v: k for k, v in _DIRECT.items()}
        field = str(e).split("=")[0].removeprefix("model.")
        raise ConfigError(f"{e} (config.json field {back.get(field, field)!r})") from None
    if list(cfg.layer_kinds) != kinds:
        raise ConfigError(f"layer schedule {kinds} could not be expressed as prefix/cycle/tail "
                          f"(got {list(cfg.layer_kinds)})")
    return cfg


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> a config.json that transformers 5.23.0 loads as the same function.

    Writes both `layer_types` (what transformers reads) and `compress_ratios` (length L+1 with the
    MTP entry, what the released configs and other readers use; transformers ignores it when
    `layer_types` is present).
    """
    kinds = list(cfg.layer_kinds)
    rope_main = {"rope_type": "default", "rope_theta": cfg.rope_theta,
                 "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim}
    rope_comp = {"rope_type": "default", "rope_theta": cfg.compress_rope_theta,
                 "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim}
    if cfg.yarn:
        rope_comp.update(rope_type="yarn", factor=cfg.yarn_factor,
                         original_max_position_embeddings=cfg.yarn_original_max_position,
                         beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow,
                         attention_factor=1.0)
    out = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
    out.update({hf: getattr(cfg, ours) for hf, ours in _DIRECT.items()})
    out.update({
        "num_key_value_heads": 1, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
        "hidden_act": "silu", "norm_topk_prob": True, "tie_word_embeddings": False,
        "attention_bias": False, "layer_types": [KIND_TO_LAYER_TYPE[k] for k in kinds],
        "compress_ratios": list(cfg.compress_ratios),
        "compress_rates": {"compressed_sparse_attention": cfg.compress_ratio_csa,
                           "heavily_compressed_attention": cfg.compress_ratio_hca},
        "mlp_layer_types": ["hash_moe" if l.routing == "hash" else "moe" for l in cfg.layers],
        "qk_rope_head_dim": cfg.rope_head_dim,
        "partial_rotary_factor": cfg.rope_head_dim / cfg.head_dim,
        "rope_theta": cfg.rope_theta, "compress_rope_theta": cfg.compress_rope_theta,
        "rope_parameters": {"main": rope_main, "compress": rope_comp},
        "num_nextn_predict_layers": cfg.mtp_depth,
        "max_position_embeddings": max(1048576, cfg.yarn_original_max_position),
    })
    if cfg.n_shared_experts != 1:
        raise ConfigError(f"model.n_shared_experts={cfg.n_shared_experts} cannot be exported: "
                          "transformers always builds exactly one shared expert")
    if not math.isfinite(cfg.swiglu_limit) or cfg.swiglu_limit <= 0:
        raise ConfigError(f"model.swiglu_limit={cfg.swiglu_limit} cannot be exported: "
                          "transformers always clamps with a finite positive limit")
    return out


# The fields a config.json determines (what makes two models the same function). Everything else
# in ModelConfig (dtype, attention/MoE implementation, remat, init, ...) is how we execute or train
# it, so it is never compared against a checkpoint.
ARCHITECTURAL_FIELDS = tuple(_DIRECT.values()) + (
    "n_shared_experts", "compress_ratio_csa", "compress_ratio_hca", "num_hash_layers",
    "rope_head_dim", "rope_theta", "compress_rope_theta", "yarn", "yarn_factor",
    "yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow", "mtp_depth")
_YARN_DETAILS = ("yarn_factor", "yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow")


def config_differences(a: ModelConfig, b: ModelConfig, fields=ARCHITECTURAL_FIELDS) -> list[str]:
    """Fields (by our names) whose value differs between two configs, as 'name: a vs b'.

    The layer schedule is compared as the resolved per-layer kinds, not as the pattern; YaRN
    details only matter when YaRN is on.
    """
    diffs = []
    for f in fields:
        if f in _YARN_DETAILS and not (a.yarn or b.yarn):
            continue
        va, vb = getattr(a, f), getattr(b, f)
        if isinstance(va, float) or isinstance(vb, float):
            same = float(va) == float(vb)
        else:
            same = va == vb
        if not same:
            diffs.append(f"{f}: {va!r} vs {vb!r}")
    if a.layer_kinds != b.layer_kinds:
        diffs.append(f"layer kinds: {list(a.layer_kinds)} vs {list(b.layer_kinds)}")
    return diffs


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist (pass the model config with --config)")
    with open(path) as f:
        return json.load(f)
