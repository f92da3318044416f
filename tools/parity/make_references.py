#!/usr/bin/env python
"""Build tiny random transformers `DeepseekV4ForCausalLM` models and write logit-parity reference data.

Run through `bash tools/parity/refresh.sh` (it sets up `.venv-parity` with torch + transformers).
For every case in CASES this (re)writes `tests/parity_data/<case>/`:

  config.json        the HF config, as `PreTrainedConfig.save_pretrained` writes it
  model.safetensors  the full state dict with transformers' own names (float tensors fp32, `tid2eid` int64)
  io.npz             input_ids int32 [B,S]; logits float32 [B,S,V] (fp32, eval, use_cache=False);
                     debug extras: indexer_topk_l{l} int32 [B,S,k] (per CSA layer, transformers' order, -1 = invalid),
                     router_topk_l{l} int32 [B,S,K] (per score-routed MoE layer, sorted ascending)
  meta.json          versions, seed, description, exact layer types, margins, notes

Every parameter and buffer is re-randomised (including those transformers initialises to zero / one / constants),
so every code path contributes. Seeds are fixed; a seed is skipped (next one tried) when a discrete selection is
near a tie: the indexer's k-th vs (k+1)-th visible score, or the router's K-th vs (K+1)-th biased score.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdv4

YARN = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32,
    "beta_slow": 1,
}

# Fields shared by every case (tiny model). Cases override what they vary.
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    moe_intermediate_size=12,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    qk_rope_head_dim=16,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    index_n_heads=16,
    index_head_dim=32,
    sliding_window=128,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    max_position_embeddings=1048576,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    rms_norm_eps=1e-6,
    scoring_func="sqrtsoftplus",
    norm_topk_prob=True,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
)

CASES = {
    "flash_like": dict(
        description=(
            "V4-Flash-like schedule: SWA, SWA, CSA, HCA, CSA (compress_ratios incl. MTP entry), hash routing in "
            "layers 0-2 then score routing, S=299 (74 CSA entries + 3-token tail, 2 HCA entries + 43-token tail), "
            "index_topk=16 < visible entries for t>=67 with 16 indexer heads, YaRN on the compressed table, "
            "swiglu_limit=1.0 so the clamp is active in routed and shared experts."
        ),
        seed=1000,
        batch=2,
        seq_len=299,
        config=dict(
            num_hidden_layers=5,
            compress_ratios=[0, 0, 4, 128, 4, 0],
            num_hash_layers=3,
            index_topk=16,
            routed_scaling_factor=1.5,
            swiglu_limit=1.0,
            rope_scaling=dict(YARN),
        ),
    ),
    "pro_like": dict(
        description=(
            "V4-Pro-like schedule: HCA, HCA, CSA, HCA (compress_ratios incl. MTP entry), score routing only, "
            "S=270 (67 CSA entries + 2-token tail, 2 HCA entries + 14-token tail), 8 heads in 4 output groups, "
            "index_topk=24 with 16 indexer heads, YaRN, routed_scaling_factor=2.5, swiglu_limit=2.0."
        ),
        seed=2000,
        batch=2,
        seq_len=270,
        config=dict(
            num_hidden_layers=4,
            compress_ratios=[128, 128, 4, 128, 0],
            num_hash_layers=0,
            num_attention_heads=8,
            o_groups=4,
            o_lora_rank=8,
            index_topk=24,
            routed_scaling_factor=2.5,
            swiglu_limit=2.0,
            rope_scaling=dict(YARN),
        ),
    ),
    "topk_covers_all": dict(
        description=(
            "CSA, HCA, CSA with index_topk=64 >= the 37 compressed entries (every visible entry selected; indexer "
            "score ties are harmless, so only 4 indexer heads), S=150 (1 HCA entry), plain RoPE on the compressed "
            "table (no rope_scaling), hash routing in layer 0, and non-default epsilons / Sinkhorn count "
            "(rms_norm_eps=1e-3, hc_eps=1e-2, hc_sinkhorn_iters=7) so eps placement is visible at 1e-4."
        ),
        seed=3000,
        batch=2,
        seq_len=150,
        config=dict(
            num_hidden_layers=3,
            compress_ratios=[4, 128, 4, 0],
            num_hash_layers=1,
            index_n_heads=4,
            index_topk=64,
            routed_scaling_factor=1.5,
            swiglu_limit=10.0,
            rms_norm_eps=1e-3,
            hc_eps=1e-2,
            hc_sinkhorn_iters=7,
        ),
    ),
    "small_window": dict(
        description=(
            "sliding_window=16 (< the CSA/HCA ratios 4/128 still selected by their labels): HCA, CSA, SWA with "
            "S=200 (1 HCA entry + 72-token tail, 50 CSA entries), index_topk=8 with 16 indexer heads, YaRN, "
            "hash routing in layer 0. Tokens of incomplete HCA blocks outside the 16-token window are invisible."
        ),
        seed=4000,
        batch=2,
        seq_len=200,
        config=dict(
            num_hidden_layers=3,
            compress_ratios=[128, 4, 0, 0],
            num_hash_layers=1,
            sliding_window=16,
            index_topk=8,
            routed_scaling_factor=1.5,
            swiglu_limit=3.0,
            rope_scaling=dict(YARN),
        ),
    ),
}

# Written by tools/parity/make_saved_checkpoints.py (run after this script by refresh.sh).
SAVED_README = (
    "\nWritten by `tools/parity/make_saved_checkpoints.py` (transformers' own `save_pretrained`; each folder holds "
    "what it wrote plus names.json and meta.json; the reference logits are small_window/io.npz):\n\n"
    "- `saved_fresh`: small_window's weights in a freshly built `DeepseekV4ForCausalLM`, saved in 4 shards "
    "(scheme `transformers-saved`: `model.layers.{i}.attn.wq_a.weight`, per-expert `ffn.experts.{e}.w1.weight`, "
    "`head.weight`, ...).\n"
    "- `saved_reloaded`: small_window loaded with `from_pretrained` and saved (scheme `transformers-resaved`: "
    "state-dict names, KV norms as `self_attn.norm.weight` etc.).\n"
    "- `small_window/short_inputs.npz`: transformers' logits for the first S = 1, 2, 3, 5 tokens of io.npz's "
    "input_ids (`input_ids_s{S}`, `logits_s{S}`).\n"
)

# Selection margins: a reference is accepted only if every discrete top-k boundary is this far from a tie,
# relative to the largest |score| among that query's candidates (fp32 implementations differ by ~1e-6 relative).
INDEXER_MARGIN_REL = 1e-4
ROUTER_MARGIN_REL = 1e-4
MAX_TRIES = 400


# --------------------------------------------------------------------------------------------------------------
# randomisation
# --------------------------------------------------------------------------------------------------------------
def randomize_(model: DeepseekV4ForCausalLM, gen: torch.Generator) -> dict:
    """Overwrite every parameter and persistent buffer with random values (in place). Returns a name -> rule map."""
    cfg = model.config
    d = cfg.hidden_size
    rules = {}

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64).mul_(std).add_(mean).float()

    def uniform(shape, lo, hi):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo).float()

    with torch.no_grad():
        state = model.state_dict()  # shares storage with params / persistent buffers
        for name, t in state.items():
            shape = tuple(t.shape)
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("embed_tokens.weight"):
                new, rule = normal(shape, 1.0), "N(0,1)"
            elif name == "lm_head.weight":
                new, rule = normal(shape, 1.0 / math.sqrt(shape[1])), "N(0,1/in)"
            elif name.endswith("mlp.gate.tid2eid"):
                n_exp = cfg.n_routed_experts
                perm = torch.argsort(torch.rand((shape[0], n_exp), generator=gen), dim=-1)
                new, rule = perm[:, : shape[1]].to(t.dtype).contiguous(), "distinct random experts per token"
            elif name.endswith("e_score_correction_bias"):
                new, rule = normal(shape, 0.2), "N(0,0.2^2)"
            elif name.endswith(("attn_hc.fn", "ffn_hc.fn", "hc_head.hc_fn")):
                new, rule = normal(shape, 1.0 / math.sqrt(shape[1])), "N(0,1/(hc*d))"
            elif name.endswith(("attn_hc.base", "ffn_hc.base", "hc_head.hc_base")):
                new, rule = normal(shape, 0.3), "N(0,0.3^2)"
            elif name.endswith(("attn_hc.scale", "ffn_hc.scale", "hc_head.hc_scale")):
                new, rule = uniform(shape, 0.5, 1.5), "U(0.5,1.5)"
            elif leaf == "sinks":
                new, rule = normal(shape, 1.0), "N(0,1)"
            elif leaf == "position_bias":
                new, rule = normal(shape, 0.5), "N(0,0.5^2)"
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                new, rule = uniform(shape, 0.7, 1.3), "U(0.7,1.3)"
            elif name.endswith("experts.gate_up_proj"):
                new, rule = normal(shape, 1.0 / math.sqrt(d)), "N(0,1/d)"
            elif name.endswith("experts.down_proj"):
                new, rule = normal(shape, 1.0 / math.sqrt(shape[2])), "N(0,1/I)"
            elif leaf == "weight" and t.dim() == 2:
                new, rule = normal(shape, 1.0 / math.sqrt(shape[1])), "N(0,1/in)"
            else:
                raise RuntimeError(f"no randomisation rule for {name} {shape} {t.dtype}")
            assert new.shape == t.shape and new.dtype == t.dtype, (name, new.shape, new.dtype)
            t.copy_(new)
            rules[name] = rule
    return rules


# --------------------------------------------------------------------------------------------------------------
# forward with hooks
# --------------------------------------------------------------------------------------------------------------
def run_forward(model, input_ids):
    """fp32 eval forward without cache. Returns logits and hooked selection data per layer."""
    captured = {"index_scores": {}, "index_topk": {}, "router": {}}
    handles = []
    for l, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        if isinstance(attn.compressor, mdv4.DeepseekV4CSACompressor):
            idx = attn.compressor.indexer

            def scorer_hook(mod, inp, out, l=l):
                captured["index_scores"][l] = out.detach().clone()

            def indexer_hook(mod, inp, out, l=l):
                captured["index_topk"][l] = out.detach().clone()

            handles.append(idx.scorer.register_forward_hook(scorer_hook))
            handles.append(idx.register_forward_hook(indexer_hook))
        gate = layer.mlp.gate
        if isinstance(gate, mdv4.DeepseekV4TopKRouter):

            def router_hook(mod, inp, out, l=l):
                x = inp[0].reshape(-1, mod.hidden_dim)
                scores = mod.score_fn(F.linear(x, mod.weight))
                captured["router"][l] = (
                    (scores + mod.e_score_correction_bias).detach().clone(),
                    out[2].detach().clone(),
                )

            handles.append(gate.register_forward_hook(router_hook))
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out.logits.float(), captured


def indexer_margins(cfg, captured, seq_len):
    """Min relative gap between the k-th and (k+1)-th visible indexer score over queries that really select."""
    m = cfg.compress_rates["compressed_sparse_attention"]
    k = cfg.index_topk
    result = {}
    for l, scores in captured["index_scores"].items():
        s = scores.double()  # [B,S,T]
        B, S, T = s.shape
        worst = math.inf
        n_selecting = 0
        for t in range(S):
            vis = (t + 1) // m
            if vis <= k:
                continue
            n_selecting += B
            row = s[:, t, :vis]
            top = torch.topk(row, k + 1, dim=-1).values  # [B,k+1], descending
            gap = top[:, k - 1] - top[:, k]
            scale = row.abs().amax(dim=-1).clamp_min(1e-30)
            worst = min(worst, float((gap / scale).min()))
        result[l] = {"entries": T, "queries_selecting": n_selecting, "min_rel_gap": worst}
    return result


def router_margins(cfg, captured):
    K = cfg.num_experts_per_tok
    result = {}
    for l, (biased, _) in captured["router"].items():
        top = torch.topk(biased.double(), K + 1, dim=-1).values
        gap = top[:, K - 1] - top[:, K]
        scale = biased.double().abs().amax(dim=-1).clamp_min(1e-30)
        result[l] = {"min_rel_gap": float((gap / scale).min())}
    return result


# --------------------------------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------------------------------
def build(case, seed):
    kwargs = dict(BASE)
    kwargs.update(case["config"])
    kwargs["rope_scaling"] = dict(kwargs["rope_scaling"]) if kwargs.get("rope_scaling") else None
    if kwargs["rope_scaling"] is None:
        kwargs.pop("rope_scaling")
    cfg = DeepseekV4Config(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    rules = randomize_(model, gen)
    input_ids = torch.randint(0, cfg.vocab_size, (case["batch"], case["seq_len"]), generator=gen)
    return cfg, model, rules, input_ids


def make_case(name, case, out_dir: Path, verbose=True):
    tries = 0
    seed = case["seed"]
    while True:
        tries += 1
        cfg, model, rules, input_ids = build(case, seed)
        logits, captured = run_forward(model, input_ids)
        assert torch.isfinite(logits).all(), f"{name}: non-finite logits (seed {seed})"
        im = indexer_margins(cfg, captured, case["seq_len"])
        rm = router_margins(cfg, captured)
        worst_i = min([v["min_rel_gap"] for v in im.values() if v["queries_selecting"]] or [math.inf])
        worst_r = min([v["min_rel_gap"] for v in rm.values()] or [math.inf])
        ok = worst_i >= INDEXER_MARGIN_REL and worst_r >= ROUTER_MARGIN_REL
        if verbose:
            print(f"  {name}: seed {seed}: indexer min rel gap {worst_i:.3g}, router min rel gap {worst_r:.3g}"
                  f" -> {'ok' if ok else 'reseed'}", flush=True)
        if ok:
            break
        if tries >= MAX_TRIES:
            raise RuntimeError(f"{name}: no seed with clear selection margins in {MAX_TRIES} tries")
        seed += 1

    std = float(logits.std())
    assert 0.05 < std < 100.0, f"{name}: badly conditioned logits (std {std})"

    # ---- write
    case_dir = out_dir / name
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    cfg.save_pretrained(case_dir)  # writes config.json only
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
    save_file(state, str(case_dir / "model.safetensors"), metadata={"format": "pt"})

    arrays = {
        "input_ids": input_ids.numpy().astype(np.int32),
        "logits": logits.numpy().astype(np.float32),
    }
    for l, topk in captured["index_topk"].items():
        arrays[f"indexer_topk_l{l}"] = topk.numpy().astype(np.int32)
    for l, (_, idx) in captured["router"].items():
        arrays[f"router_topk_l{l}"] = (
            torch.sort(idx, dim=-1).values.reshape(case["batch"], case["seq_len"], -1).numpy().astype(np.int32)
        )
    np.savez_compressed(case_dir / "io.npz", **arrays)

    # ---- verify: reload from disk with from_pretrained and recompute
    reloaded = DeepseekV4ForCausalLM.from_pretrained(str(case_dir), dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    sd_re = reloaded.state_dict()
    sd_disk = load_file(str(case_dir / "model.safetensors"))
    assert set(sd_re) == set(sd_disk), f"{name}: reload key mismatch {set(sd_re) ^ set(sd_disk)}"
    for k in sd_disk:
        assert torch.equal(sd_re[k], sd_disk[k]), f"{name}: reload changed {k}"
    logits_re, _ = run_forward(reloaded, input_ids)
    reload_diff = float((logits_re - logits).abs().max())
    assert reload_diff == 0.0, f"{name}: reloaded model differs by {reload_diff}"

    # ---- eager vs transformers' default experts backend (grouped_mm): same math, other summation order
    alt = DeepseekV4ForCausalLM.from_pretrained(str(case_dir), dtype=torch.float32).eval()
    alt.config._attn_implementation = "eager"
    backend_before = getattr(alt.config, "_experts_implementation", None)
    alt.config._experts_implementation = "eager" if backend_before != "eager" else "grouped_mm"
    logits_alt, _ = run_forward(alt, input_ids)
    backend_diff = float((logits_alt - logits).abs().max())

    layer_types = list(model.config.layer_types)
    assert layer_types == [layer.self_attn.layer_type for layer in model.model.layers]
    S = case["seq_len"]
    per_layer = []
    for l, lt in enumerate(layer_types):
        entry = {"layer": l, "layer_type": lt, "mlp_layer_type": model.config.mlp_layer_types[l]}
        if lt == "compressed_sparse_attention":
            mrate = cfg.compress_rates[lt]
            entry.update(
                compress_rate=mrate,
                compressed_entries=S // mrate,
                index_topk=cfg.index_topk,
                effective_topk=min(cfg.index_topk, S // mrate),
                queries_selecting_subset=im[l]["queries_selecting"],
                indexer_min_rel_gap=None if math.isinf(im[l]["min_rel_gap"]) else im[l]["min_rel_gap"],
            )
        elif lt == "heavily_compressed_attention":
            mrate = cfg.compress_rates[lt]
            entry.update(compress_rate=mrate, compressed_entries=S // mrate)
        if l in rm:
            entry["router_min_rel_gap"] = rm[l]["min_rel_gap"]
        per_layer.append(entry)

    meta = {
        "case": name,
        "description": case["description"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "seed": seed,
        "seed_tries": tries,
        "batch": case["batch"],
        "seq_len": S,
        "vocab_size": cfg.vocab_size,
        "config_kwargs_passed": {k: v for k, v in {**BASE, **case["config"]}.items()},
        "layer_types": layer_types,
        "mlp_layer_types": list(model.config.mlp_layer_types),
        "compress_ratios_given": case["config"]["compress_ratios"],
        "compress_rates": dict(cfg.compress_rates),
        "rope_parameters": cfg.rope_parameters,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "inv_freq": {
            "main": model.model.rotary_emb.main_inv_freq.tolist(),
            "compress": model.model.rotary_emb.compress_inv_freq.tolist(),
        },
        "attention_scaling": {
            "main": model.model.rotary_emb.main_attention_scaling,
            "compress": model.model.rotary_emb.compress_attention_scaling,
        },
        "per_layer": per_layer,
        "logits_std": std,
        "logits_absmax": float(logits.abs().max()),
        "selection_margin_threshold_rel": {"indexer": INDEXER_MARGIN_REL, "router": ROUTER_MARGIN_REL},
        "reload_max_abs_diff": reload_diff,
        "experts_backend_default": backend_before,
        "experts_backend_alt": alt.config._experts_implementation,
        "experts_backend_max_abs_diff": backend_diff,
        "randomisation": sorted(set(f"{k.split('.')[-1] if 'layers' in k else k}: {r}" for k, r in rules.items())),
        "notes": [
            "Logits: fp32, model.eval(), use_cache=False, attn_implementation=eager, default position_ids arange(S), "
            "no attention_mask (unpadded).",
            "config.json holds layer_types (derived by transformers from compress_ratios, cut to num_hidden_layers, "
            "MTP entry dropped); compress_ratios itself is not saved by transformers (see compress_ratios_given).",
            "Every parameter/buffer is random (see randomisation), incl. sinks, position_bias, mHC base/scale, "
            "e_score_correction_bias and tid2eid (distinct experts per token).",
            "Seeds whose indexer or router top-k boundary is closer than the margin threshold to a tie were skipped.",
            "io.npz debug extras: indexer_topk_l{l} = transformers' selected compressed-entry indices [B,S,k] in its "
            "order (descending score; -1 = not visible); router_topk_l{l} = selected experts, sorted ascending.",
        ],
    }
    with open(case_dir / "meta.json", "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
    size = sum(p.stat().st_size for p in case_dir.iterdir())
    print(f"{name}: seed {seed} ({tries} tries), layers {layer_types}, S={S}, logits std {std:.3f}, "
          f"reload diff {reload_diff}, backend diff {backend_diff:.2e}, {size / 1024:.0f} KiB", flush=True)
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/parity_data", help="output folder")
    ap.add_argument("--cases", nargs="*", default=list(CASES), help="subset of cases")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    assert transformers.__version__ == "5.23.0", transformers.__version__
    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.use_deterministic_algorithms(True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {}
    for name in args.cases:
        meta = make_case(name, CASES[name], out_dir, verbose=not args.quiet)
        index[name] = {
            "description": meta["description"],
            "layer_types": meta["layer_types"],
            "seq_len": meta["seq_len"],
            "seed": meta["seed"],
        }
    if set(args.cases) == set(CASES):
        with open(out_dir / "README.md", "w") as f:
            f.write(
                "# parity_data\n\nGenerated by `bash tools/parity/refresh.sh` (tools/parity/make_references.py) with "
                f"transformers {transformers.__version__} / torch {torch.__version__}. Do not edit by hand.\n"
                "Each folder: config.json (HF config), model.safetensors (HF state dict, fp32; tid2eid int64), "
                "io.npz (input_ids int32 [B,S], logits float32 [B,S,V], debug top-k indices), meta.json.\n"
                "See tools/parity/NOTES.md for what an implementation must match.\n\n"
            )
            for name, m in index.items():
                f.write(f"- `{name}` (S={m['seq_len']}, seed {m['seed']}): {m['description']}\n")
            f.write(SAVED_README)
    return 0


if __name__ == "__main__":
    sys.exit(main())
