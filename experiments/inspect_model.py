"""Print what a model config costs: parameters, per-layer-kind table, FLOPs and KV cache.

    python -m experiments.inspect_model --config=configs/v4_flash.py [--context=1048576]
        [--train_seq_len=4096] [--config.model.num_layers=4] [--nomeasure_cache]

Parameters come from `nnx.eval_shape` of the real model (nothing is allocated), so this runs in
seconds on a CPU for the full V4-Flash and V4-Pro shapes. The numbers and their conventions are
documented in `sparse_lm/analysis/accounting.py` and `docs/inspect_model.md`.
A bad flag, config file or model field is one line, exit status 2 (--verbose: traceback).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from sparse_lm.analysis import accounting as acc
from sparse_lm.config import ModelConfig
from sparse_lm.inference.cache import cache_bytes, init_cache, measured_bytes_per_token
from sparse_lm.train.config_check import run_main

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "config file whose `model` field holds ModelConfig values", lock_config=True)
_CONTEXT = flags.DEFINE_integer(
    "context", 1 << 20, "context length N (tokens) for decode FLOPs, KV cache and entries/query")
_TRAIN_SEQ = flags.DEFINE_integer(
    "train_seq_len", 4096, "sequence length S for the training FLOPs per token")
_MEASURE_CACHE = flags.DEFINE_bool(
    "measure_cache", True, "also print the cache bytes per token measured on the decoder's cache "
    "arrays (jax.eval_shape: nothing is allocated, so it is cheap for the full-size configs)")


def _si(x: float, unit: str = "") -> str:
    """Fixed-precision human number: 284.33 B, 13.27 G, 871.1 K."""
    for div, suffix in ((1e12, "T"), (1e9, "B" if unit == "" else "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:,.2f} {suffix}{unit}"
    return f"{x:,.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for div, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:,.2f} {suffix}"
    return f"{n:,.0f} B"


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.2f}%" if b else "n/a"


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Fixed-width table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def fmt(r):
        cells = [str(r[0]).ljust(widths[0])] + [str(c).rjust(w) for c, w in zip(r[1:], widths[1:])]
        return indent + "  ".join(cells)
    return [fmt(header), indent + "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def inspect(cfg: ModelConfig, context: int = 1 << 20, train_seq_len: int = 4096, *,
            measure_cache: bool = True) -> str:
    """The full report for `cfg` at context length `context`, as text. measure_cache adds the
    cache bytes per token measured on the decoder's cache arrays (abstract: nothing allocated)."""
    pc = acc.param_counts(cfg)
    kinds = list(pc.by_kind)
    out = []
    out.append("== Model ==")
    out.append(f"  layers {cfg.num_layers} (+{cfg.mtp_depth} MTP)  hidden {cfg.hidden_size}  "
               f"heads {cfg.num_heads} x {cfg.head_dim}  vocab {cfg.vocab_size}  "
               f"experts {cfg.n_routed_experts} (top-{cfg.num_experts_per_tok} + "
               f"{cfg.n_shared_experts} shared)")
    out.append(f"  schedule " + ", ".join(f"{pc.by_kind[k].layers} {k}" for k in kinds)
               + f"  |  window {cfg.sliding_window}, CSA ratio {cfg.compress_ratio_csa} "
               f"top-{cfg.index_topk}, HCA ratio {cfg.compress_ratio_hca}, "
               f"{cfg.num_hash_layers} hash-routed layers")
    out.append("  compress_ratios " + str(list(cfg.compress_ratios)))

    out.append("")
    out.append("== Parameters (nnx.Param, from nnx.eval_shape: nothing allocated) ==")
    rows = [
        ["total (excl. MTP)", _si(pc.total), f"{pc.total:,}"],
        ["total (incl. MTP)", _si(pc.total_with_mtp), f"{pc.total_with_mtp:,}"],
        ["activated per token", _si(pc.activated), f"{pc.activated:,}"],
        ["MTP block (own params)", _si(pc.mtp), f"{pc.mtp:,}"],
        ["MTP block activated", _si(pc.mtp_activated), f"{pc.mtp_activated:,}"],
    ]
    out += _table(["", "count", "exact"], rows)
    out.append("  activated = excl. embedding, incl. output head, "
               f"{cfg.num_experts_per_tok} of {cfg.n_routed_experts} routed experts + shared; "
               "MTP excluded")
    out.append("  buffers (not parameters): " + ", ".join(f"{k} {v:,} elements"
                                                         for k, v in pc.buffers.items()))

    out.append("")
    out.append(f"== Per layer kind (context N = {context:,}) ==")
    main_b, idx_b = acc.kv_entry_bytes(cfg, "released")
    rows = []
    for k in kinds:
        kc = pc.by_kind[k]
        w, c = acc.entries_per_query(cfg, k, context)
        ratio = cfg.ratio_of(k)
        kv = 0.0 if k == "swa" else (main_b + (idx_b if k == "csa" else 0)) / ratio
        rows.append([k, kc.layers, ratio, _si(kc.params_per_layer), _si(kc.activated_per_layer),
                     f"{w:,}", f"{c:,}", f"{w + c:,}", f"{kv:,.2f}"])
    out += _table(["kind", "layers", "ratio", "params/layer", "activated/layer", "window",
                   "compressed", "entries/query", "KV B/token/layer"], rows)
    out.append("  entries/query = keys attended by the query at position N-1 (CSA: top-k of the "
               "visible entries); KV in the released layout")

    out.append("")
    out.append("== Components ==")
    rows = []
    for comp in acc.COMPONENTS:
        t, a, m = pc.by_component[comp], pc.activated_by_component[comp], pc.mtp_by_component[comp]
        if t or m:
            rows.append([comp, _si(t), _pct(t, pc.total), _si(a), _pct(a, pc.activated), _si(m)])
    rows.append(["total", _si(pc.total), "100.00%", _si(pc.activated), "100.00%", _si(pc.mtp)])
    out += _table(["component", "params", "share", "activated", "share", "in MTP"], rows)

    out.append("")
    out.append(f"== FLOPs per decoded token at N = {context:,} (2 FLOPs per multiply-add) ==")
    f = acc.flops_per_token(cfg, context)
    v = acc.v32_flops_per_token(context)
    rows = [
        ["linear (2 x activated matmul params)", _si(f.linear, "F"), _si(v.linear, "F"),
         _pct(f.linear, v.linear)],
        ["core attention", _si(f.attention, "F"), _si(v.attention, "F"),
         _pct(f.attention, v.attention)],
        ["indexer scoring", _si(f.indexer, "F"), _si(v.indexer, "F"), _pct(f.indexer, v.indexer)],
        ["total", _si(f.total, "F"), _si(v.total, "F"), _pct(f.total, v.total)],
        ["FP8-equivalent (reconstructed weighting)", _si(f.weighted, "F"), _si(v.weighted, "F"),
         _pct(f.weighted, v.weighted)],
    ]
    out += _table(["", "this model", "DeepSeek-V3.2", "ratio"], rows)
    out.append("  attention by kind: " + ", ".join(f"{k} {_si(x, 'F')}"
                                                   for k, x in f.attention_by_kind.items()))
    out.append(f"  FP8-equivalent weights: GEMM x{f.weights.gemm:g}, BF16 attention "
               f"x{f.weights.attention:g}, indexer x{f.weights.indexer:g} (FP4; V3.2 FP8 "
               f"x{v.weights.indexer:g})")
    out.append("  this weighting was reconstructed to reproduce the published ratios (~27% Pro, "
               "~10% Flash; spec §12.2);")
    out.append("  the report gives only the ratios, so matching them is not an independent check")

    t = acc.train_flops_per_token(cfg, train_seq_len)
    out.append("")
    out.append(f"== Training FLOPs per token at S = {train_seq_len:,} (model FLOPs, incl. MTP) ==")
    rows = [["linear", _si(t.linear, "F")],
            ["attention", _si(t.attention, "F")],
            ["indexer", _si(t.indexer, "F")],
            ["indexer KL target (fwd only)", _si(t.indexer_target, "F")],
            ["forward", _si(t.forward, "F")],
            ["backward (2 x fwd, no KL target)", _si(t.backward, "F")],
            ["total", _si(t.total, "F")]]
    out += _table(["", "per token"], rows)

    out.append("")
    out.append(f"== KV cache (one sequence; N = {context:,}) ==")
    v32_tok = acc.v32_kv_bytes_per_token()
    gqa_tok = acc.gqa_kv_bytes_per_token(cfg.num_layers)
    rows = []
    for name, layout in (("released (FP8 + BF16 RoPE, FP4 indexer)", "released"),
                         ("bf16 rows", "bf16")):
        tok = acc.kv_cache_bytes_per_token(cfg, layout)
        at_n = acc.kv_cache_bytes(cfg, context, layout)
        rows.append([name, f"{tok:,.2f}", _bytes(acc.kv_cache_state_bytes(cfg, layout)),
                     _bytes(at_n), _pct(at_n, v32_tok * context), _pct(at_n, gqa_tok * context)])
    rows.append(["DeepSeek-V3.2 (61 layers)", f"{v32_tok:,}", "0 B", _bytes(v32_tok * context),
                 "100.00%", _pct(v32_tok, gqa_tok)])
    rows.append([f"GQA-8 BF16, head 128, {cfg.num_layers} layers", f"{gqa_tok:,}", "0 B",
                 _bytes(gqa_tok * context), _pct(gqa_tok, v32_tok), "100.00%"])
    out += _table(["layout", "bytes/token", "fixed state", "total at N", "vs V3.2", "vs GQA-8"],
                  rows)
    out.append(f"  released rows: main {main_b} B, indexer key {idx_b} B; fixed state = windows "
               "+ compressor tails (fp32 tails for released)")
    if measure_cache:
        out += _measured_cache(cfg)
    return "\n".join(out)


def _measured_cache(cfg: ModelConfig) -> list[str]:
    """Bytes per token measured on the decoder's real cache structure beside the analytic
    bf16 figures. The arrays are `jax.eval_shape` results of `init_cache`: nothing allocated."""
    lo, hi = 1 << 16, 1 << 17
    measured = measured_bytes_per_token(cfg, max_lens=(lo, hi), dtype=jnp.bfloat16)
    main, idx = acc.kv_entry_bytes(cfg, "bf16")
    analytic = {"csa": (main + idx) / cfg.compress_ratio_csa,
                "hca": main / cfg.compress_ratio_hca, "swa": 0.0}
    layers = acc.param_counts(cfg).by_kind
    rows = [[k, layers[k].layers, f"{measured[k]:,.2f}", f"{analytic[k]:,.2f}"]
            for k in layers if k in measured]
    rows.append(["total", cfg.num_layers, f"{measured['total']:,.2f}",
                 f"{acc.kv_cache_bytes_per_token(cfg, 'bf16'):,.2f}"])
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, lo, jnp.bfloat16))
    state = sum(d["state"] for d in cache_bytes(cfg, shapes).values())
    out = ["", "  measured on the decoder's cache (sparse_lm.inference.cache; bf16 rows, fp32 "
               f"tails; slope between max_len {lo:,} and {hi:,}; jax.eval_shape, nothing "
               "allocated):"]
    out += _table(["kind", "layers", "measured B/token/layer", "analytic bf16"], rows, "    ")
    out.append(f"    fixed state per sequence: measured {_bytes(state)}, analytic "
               f"{_bytes(acc.kv_cache_state_bytes(cfg, 'bf16', state_dtype_bytes=4))}; the "
               "released FP8/FP4 layout is analytic only (not implemented as cache storage)")
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/v4_flash.py")
    if "model" not in _CONFIG.value:
        raise app.UsageError("the config has no `model` field (expected get_config() with a "
                             "`model` section of ModelConfig values)")
    if _CONTEXT.value < 1:
        raise app.UsageError(f"--context={_CONTEXT.value} is invalid: must be >= 1")
    if _TRAIN_SEQ.value < 1:
        raise app.UsageError(f"--train_seq_len={_TRAIN_SEQ.value} is invalid: must be >= 1")
    cfg = ModelConfig.from_dict(_CONFIG.value.model)
    print(inspect(cfg, _CONTEXT.value, _TRAIN_SEQ.value, measure_cache=_MEASURE_CACHE.value))


if __name__ == "__main__":
    run_main(main)
