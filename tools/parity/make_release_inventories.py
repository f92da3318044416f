#!/usr/bin/env python
"""Write the tensor inventories (name, safetensors dtype, shape) of the DeepSeek-V4-Flash and
DeepSeek-V4-Pro releases to tests/convert/release_inventories/{v4_flash,v4_pro}.json.

DERIVED, NOT COPIED: no network is available here (package indexes only), so the releases'
`model.safetensors.index.json` and shard headers could not be read. Every entry is derived from
/work/shared/spec/deepseek_v4.md:
  * sizes and the layer schedule: §2.1 (the published config.json fields) and §2.2;
  * per-layer parameters and their [out, in] shapes: §3 (mHC fn/base/scale), §4.1 (attention),
    §5 (compressor: width (1+overlap)*c, ape [m, width]), §6 (indexer), §8 (MoE: gate, bias or
    tid2eid, experts, shared expert), §9 (MTP block), §10 (embedding, head, norms);
  * names: the official inference code's names (§14a.10: `layers.{l}.attn.wq_a.weight`, ...),
    exactly as sparse_lm.convert.mapping.OFFICIAL reads them (per-expert `ffn.experts.{e}.w1`,
    `.scale` companions, `mtp.0.*`);
  * storage dtypes: §10 ("most linears FP8 e4m3 with 128x128 ue8m0 scales, routed experts FP4
    packed I8 with per-32 scales, gate.weight BF16, tid2eid I64, norm weights BF16"), §5
    (compressor wkv/wgate BF16, ape fp32), §6 (weights_proj BF16), §3/§4.1 (mHC, sinks fp32).
    Which linears are FP8 is an [assumption] beyond the spec's examples: every attention,
    indexer-query, shared-expert and MTP projection matrix; BF16 for compressor projections,
    indexer weights_proj and the router gate.
Routed experts are written compactly: an entry with "experts": E stands for E tensors with "{e}"
replaced by 0..E-1 (`expand` does that). The parameter counts of the result reproduce the
spec's derived totals (Flash 284.3B without MTP; Pro 1573B without / 1599B with MTP), which the
tests check.

    .venv/bin/python tools/parity/make_release_inventories.py [--out tests/convert/release_inventories]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

YARN = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
        "beta_fast": 32, "beta_slow": 1}
COMMON = dict(
    architectures=["DeepseekV4ForCausalLM"], model_type="deepseek_v4", vocab_size=129280,
    num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, o_lora_rank=1024,
    sliding_window=128, index_n_heads=64, index_head_dim=128, n_shared_experts=1,
    num_experts_per_tok=6, num_hash_layers=3, scoring_func="sqrtsoftplus", topk_method="noaux_tc",
    norm_topk_prob=True, swiglu_limit=10.0, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    rms_norm_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0, rope_scaling=YARN,
    max_position_embeddings=1048576, num_nextn_predict_layers=1, hidden_act="silu",
    attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1, initializer_range=0.02, torch_dtype="bfloat16", expert_dtype="fp4",
    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                         "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
)
RELEASES = {
    "v4_flash": dict(
        release="deepseek-ai/DeepSeek-V4-Flash",
        config=dict(COMMON, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
                    q_lora_rank=1024, o_groups=8, index_topk=512, n_routed_experts=256,
                    moe_intermediate_size=2048, routed_scaling_factor=1.5,
                    compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [0])),
    "v4_pro": dict(
        release="deepseek-ai/DeepSeek-V4-Pro",
        config=dict(COMMON, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                    q_lora_rank=1536, o_groups=16, index_topk=1024, n_routed_experts=384,
                    moe_intermediate_size=3072, routed_scaling_factor=2.5,
                    compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0])),
}
FP8, BF16, F32, I8, I64, E8M0 = "F8_E4M3", "BF16", "F32", "I8", "I64", "F8_E8M0"


def _cdiv(a, b):
    return -(-a // b)


def inventory(cfg: dict) -> list:
    """[[name, dtype, shape] or [name, dtype, shape, experts]] of a release described by `cfg`."""
    d, H, c = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    dc, g, dg = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"]
    nI, cI = cfg["index_n_heads"], cfg["index_head_dim"]
    E, I, V, K = (cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["vocab_size"],
                  cfg["num_experts_per_tok"])
    n = cfg["hc_mult"]
    out = []

    def fp8(name, rows, cols):
        out.append([name + ".weight", FP8, [rows, cols]])
        out.append([name + ".scale", E8M0, [_cdiv(rows, 128), _cdiv(cols, 128)]])

    def block(p, ratio, hash_routed):
        out.extend([[p + "attn_norm.weight", BF16, [d]], [p + "ffn_norm.weight", BF16, [d]]])
        for site in ("attn", "ffn"):
            out.extend([[f"{p}hc_{site}_fn", F32, [(2 + n) * n, n * d]],
                        [f"{p}hc_{site}_base", F32, [(2 + n) * n]],
                        [f"{p}hc_{site}_scale", F32, [3]]])
        out.append([p + "attn.attn_sink", F32, [H]])
        fp8(p + "attn.wq_a", dc, d)
        out.append([p + "attn.q_norm.weight", BF16, [dc]])
        fp8(p + "attn.wq_b", H * c, dc)
        fp8(p + "attn.wkv", c, d)
        out.append([p + "attn.kv_norm.weight", BF16, [c]])
        fp8(p + "attn.wo_a", g * dg, H * c // g)
        fp8(p + "attn.wo_b", d, g * dg)
        if ratio:
            w = (2 if ratio == 4 else 1) * c
            q = p + "attn.compressor."
            out.extend([[q + "wkv.weight", BF16, [w, d]], [q + "wgate.weight", BF16, [w, d]],
                        [q + "ape", F32, [ratio, w]], [q + "norm.weight", BF16, [c]]])
        if ratio == 4:
            x = p + "attn.indexer."
            fp8(x + "wq_b", nI * cI, dc)
            out.append([x + "weights_proj.weight", BF16, [nI, d]])
            q = x + "compressor."
            out.extend([[q + "wkv.weight", BF16, [2 * cI, d]],
                        [q + "wgate.weight", BF16, [2 * cI, d]],
                        [q + "ape", F32, [4, 2 * cI]], [q + "norm.weight", BF16, [cI]]])
        out.append([p + "ffn.gate.weight", BF16, [E, d]])
        out.append([p + "ffn.gate.tid2eid", I64, [V, K]] if hash_routed
                   else [p + "ffn.gate.bias", F32, [E]])
        e = p + "ffn.experts.{e}."
        for part, (rows, cols) in (("w1", (I, d)), ("w3", (I, d)), ("w2", (d, I))):
            out.append([e + part + ".weight", I8, [rows, cols // 2], E])
            out.append([e + part + ".scale", E8M0, [rows, _cdiv(cols, 32)], E])
        for part, (rows, cols) in (("w1", (I, d)), ("w3", (I, d)), ("w2", (d, I))):
            fp8(p + "ffn.shared_experts." + part, rows, cols)

    out.extend([["embed.weight", BF16, [V, d]], ["head.weight", BF16, [V, d]],
                ["norm.weight", BF16, [d]], ["hc_head_fn", F32, [n, n * d]],
                ["hc_head_base", F32, [n]], ["hc_head_scale", F32, [1]]])
    L = cfg["num_hidden_layers"]
    ratios = cfg["compress_ratios"]
    for l in range(L):
        block(f"layers.{l}.", ratios[l], l < cfg["num_hash_layers"])
    for j in range(cfg["num_nextn_predict_layers"]):
        p = f"mtp.{j}."
        fp8(p + "e_proj", d, d)
        fp8(p + "h_proj", d, d)
        out.extend([[p + "enorm.weight", BF16, [d]], [p + "hnorm.weight", BF16, [d]],
                    [p + "norm.weight", BF16, [d]], [p + "hc_head_fn", F32, [n, n * d]],
                    [p + "hc_head_base", F32, [n]], [p + "hc_head_scale", F32, [1]]])
        block(p, ratios[L + j], False)
    return out


def expand(entries: list) -> dict:
    """{name: (dtype, shape)} with every expert entry expanded."""
    inv = {}
    for entry in entries:
        name, dtype, shape = entry[:3]
        names = [name.replace("{e}", str(e)) for e in range(entry[3])] if len(entry) > 3 else [name]
        for nm in names:
            if nm in inv:
                raise ValueError(f"{nm} listed twice")
            inv[nm] = (dtype, tuple(shape))
    return inv


def document(key: str) -> dict:
    rel = RELEASES[key]
    return {
        "release": rel["release"],
        "derivation": "derived from /work/shared/spec/deepseek_v4.md sections 2.1-10 and 14a.10 by "
                      "tools/parity/make_release_inventories.py; NOT read from the release's "
                      "index file (no network). Storage dtypes of individual linears are an "
                      "assumption where the spec gives only examples (see the script).",
        "format": "tensors: [name, safetensors dtype, shape] or [name, dtype, shape, E] for E "
                  "routed experts, '{e}' = 0..E-1",
        "config": rel["config"],
        "tensors": inventory(rel["config"]),
    }


def dumps(doc: dict) -> str:
    """One tensor per line (reviewable diffs), the rest as indented JSON."""
    head = {k: v for k, v in doc.items() if k != "tensors"}
    text = json.dumps(head, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(t) for t in doc["tensors"])
    return text + ',\n "tensors": [\n' + rows + "\n ]\n}\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/convert/release_inventories")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key in RELEASES:
        doc = document(key)
        text = dumps(doc)
        assert json.loads(text) == json.loads(json.dumps(doc))
        (out / f"{key}.json").write_text(text)
        print(f"{key}.json: {len(doc['tensors'])} entries, {len(expand(doc['tensors']))} tensors,"
              f" {len(text) / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
