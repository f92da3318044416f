"""Analytic accounting of a DeepSeek-V4 config: parameters, FLOPs per token, KV-cache bytes.

Everything here is a pure function of a `ModelConfig`; nothing allocates model weights.

- `param_counts(cfg)` walks `nnx.eval_shape` of the real model (`DeepseekV4`) and counts every
  `nnx.Param` leaf, classified by component and layer kind. `analytic_param_counts(cfg)` derives
  the same numbers from the shape formulas of the spec (§3-§10); the tests check they agree
  exactly, so a change to the model's parameters that the spec does not describe is caught.
- `flops_per_token(cfg, N)`: FLOPs to decode one token at context length N (spec §12.2), raw and
  "FP8-equivalent" weighted; `v32_flops_per_token(N)` is the DeepSeek-V3.2 baseline (spec §2.3).
- `train_flops_per_token(cfg, S)`: model FLOPs per trained token for sequences of length S (for
  MFU), counting only the attention entries the sparse model actually attends.
- `kv_cache_bytes_per_token`, `kv_cache_state_bytes`, `kv_cache_bytes`: the compressed KV cache
  (spec §12.1, §13), in the released FP8/FP4 layout or with every row stored densely (bf16 by
  default), plus the V3.2 and GQA-8 baselines.

Counting conventions (all stated where they are used):
- "activated" = what one token touches: excludes the embedding table (a lookup), includes the
  output head, counts `num_experts_per_tok` routed experts + the shared expert + the router of
  each MoE layer, and all attention / compressor / indexer / mHC / norm parameters.
- The MTP block is reported separately (`mtp`, `total_with_mtp`); `total` and `activated`
  exclude it, which is how the published 284B / 13B and 1.6T / 49B are stated.
- A FLOP is one multiply or one add: a multiply-accumulate is 2 FLOPs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Iterable, Mapping

import numpy as np
from flax import nnx

from sparse_lm.config import LAYER_KINDS, ModelConfig
from sparse_lm.model.transformer import DeepseekV4

COMPONENTS = ("embedding", "head", "attention", "compressor", "indexer", "routed_experts",
              "shared_experts", "router", "mhc", "norms", "mtp_projection")
"""Parameter components. `mtp_projection` (the MTP block's W_e, W_h) is only non-zero inside MTP.

attention = q/kv/out projections, q_norm, kv_norm and sinks; compressor = the attention
compressor (wkv, wgate, ape, its norm); indexer = indexer wq_b, weights_proj and the indexer's own
compressor; norms = the per-block attn/ffn RMSNorms, the final norm and MTP's enorm/hnorm/norm;
mhc = the per-sublayer hyper-connections and the hc_head collapses.
"""

# Parameter names that are not matmul weights (scaled or added, not multiplied by a vector).
_NON_MATMUL = frozenset({"weight", "ape", "base", "scale", "sink"})
_ROUTED = frozenset({"w_gate", "w_up", "w_down"})


# ====================================================================== parameter counts
@dataclasses.dataclass(frozen=True)
class KindCounts:
    """Parameters of all layers of one attention kind (main model only, MTP excluded)."""
    layers: int
    params: int          # summed over the `layers` layers
    activated: int       # summed over the `layers` layers

    @property
    def params_per_layer(self) -> float:
        return self.params / self.layers if self.layers else 0.0

    @property
    def activated_per_layer(self) -> float:
        return self.activated / self.layers if self.layers else 0.0


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Counts of `nnx.Param` elements. Buffers (router bias, hash tables) are in `buffers` only.

    total / activated / activated_matmul: main model (MTP excluded).
    mtp / mtp_activated / mtp_activated_matmul: the MTP block's own parameters (it also reuses the
    embedding and the output head, which are counted once, in the main model).
    activated_matmul: the part of `activated` that multiplies activations (excludes norm weights,
    sinks, compressor `ape`, mHC base/scale): `2 * activated_matmul` is the decode GEMM cost.
    """
    total: int
    activated: int
    activated_matmul: int
    mtp: int
    mtp_activated: int
    mtp_activated_matmul: int
    by_component: Mapping[str, int]            # main model; sums to `total`
    activated_by_component: Mapping[str, int]  # main model; sums to `activated`
    mtp_by_component: Mapping[str, int]        # MTP block; sums to `mtp`
    by_kind: Mapping[str, KindCounts]          # kinds present in the main model's layers
    per_layer: tuple[int, ...]                 # params of layer 0..L-1
    buffers: Mapping[str, int]                 # elements of non-Param state, by variable type

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp


def _dict(keys: Iterable[str]) -> dict[str, int]:
    return {k: 0 for k in keys}


def _component(rel: tuple) -> str:
    """Component of a parameter from its path inside a Block (or MTP/top level)."""
    head = rel[0]
    if head in ("attn_hc", "ffn_hc", "hc_head"):
        return "mhc"
    if head in ("attn_norm", "ffn_norm", "norm", "enorm", "hnorm"):
        return "norms"
    if head in ("w_e", "w_h"):
        return "mtp_projection"
    if head == "attn":
        if len(rel) > 1 and rel[1] == "compressor":
            return "compressor"
        if len(rel) > 1 and rel[1] == "indexer":
            return "indexer"
        return "attention"
    if head == "moe":
        name = rel[-1]
        if name in _ROUTED:
            return "routed_experts"
        if name.startswith("shared_"):
            return "shared_experts"
        if name == "gate":
            return "router"
    raise ValueError(f"accounting: parameter path {rel!r} matches no component of {COMPONENTS}; "
                     "update sparse_lm/analysis/accounting.py for the new parameter")


class _Tally:
    """Accumulates (component, layer, size) records into a ParamCounts."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.main = _dict(COMPONENTS)
        self.main_act = _dict(COMPONENTS)
        self.mtp = _dict(COMPONENTS)
        self.act_matmul = 0
        self.mtp_act = 0
        self.mtp_act_matmul = 0
        self.layer = [0] * cfg.num_layers
        self.layer_act = [0] * cfg.num_layers
        self.buffers: dict[str, int] = {}

    def add(self, component: str, size: int, *, matmul: bool, layer: int | None = None,
            mtp: bool = False):
        cfg = self.cfg
        if component == "embedding":
            act = 0          # a lookup, not a matmul over the table
        elif component == "routed_experts":
            if size % cfg.n_routed_experts:
                raise ValueError(f"routed expert tensor of {size} elements is not a multiple of "
                                 f"n_routed_experts={cfg.n_routed_experts}")
            act = size // cfg.n_routed_experts * cfg.num_experts_per_tok
        else:
            act = size
        if mtp:
            self.mtp[component] += size
            self.mtp_act += act
            self.mtp_act_matmul += act if matmul else 0
            return
        self.main[component] += size
        self.main_act[component] += act
        self.act_matmul += act if matmul else 0
        if layer is not None:
            self.layer[layer] += size
            self.layer_act[layer] += act

    def result(self) -> ParamCounts:
        by_kind = {}
        for spec in self.cfg.layers:
            k = by_kind.setdefault(spec.kind, [0, 0, 0])
            k[0] += 1
            k[1] += self.layer[spec.index]
            k[2] += self.layer_act[spec.index]
        frozen = types.MappingProxyType     # results are cached: hand out read-only views
        kinds = sorted(by_kind.items(), key=lambda kv: LAYER_KINDS.index(kv[0]))
        return ParamCounts(
            total=sum(self.main.values()), activated=sum(self.main_act.values()),
            activated_matmul=self.act_matmul, mtp=sum(self.mtp.values()),
            mtp_activated=self.mtp_act, mtp_activated_matmul=self.mtp_act_matmul,
            by_component=frozen(dict(self.main)),
            activated_by_component=frozen(dict(self.main_act)),
            mtp_by_component=frozen(dict(self.mtp)),
            by_kind=frozen({k: KindCounts(*v) for k, v in kinds}),
            per_layer=tuple(self.layer), buffers=frozen(dict(sorted(self.buffers.items()))))


@functools.lru_cache(maxsize=32)
def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count the real model's `nnx.Param`s from `nnx.eval_shape` (no weights are allocated).

    Paths are mapped to layers through `cfg.layer_groups`: the stacked cycle parameters (leading
    axis = num_cycles) are split evenly over the layers they stand for.
    """
    model = nnx.eval_shape(lambda: DeepseekV4(cfg, rngs=nnx.Rngs(0)))
    groups = cfg.layer_groups
    tally = _Tally(cfg)
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Variable):
            continue
        size = math.prod(node.shape)
        if not isinstance(node, nnx.Param):
            name = type(node).__name__
            tally.buffers[name] = tally.buffers.get(name, 0) + size
            continue
        matmul = path[-1] not in _NON_MATMUL
        top = path[0]
        if top == "embed":
            tally.add("embedding", size, matmul=False)
        elif top == "lm_head":
            tally.add("head", size, matmul=True)
        elif top in ("norm", "hc_head"):
            tally.add(_component(path), size, matmul=matmul)
        elif top == "mtp":
            rel = path[2:] if path[1] == "block" else path[1:]
            tally.add(_component(rel), size, matmul=matmul, mtp=True)
        elif top in ("head_layers", "tail_layers"):
            spec = (groups.head if top == "head_layers" else groups.tail)[path[1]]
            tally.add(_component(path[2:]), size, matmul=matmul, layer=spec.index)
        elif top == "cycles":
            # ('cycles', 'blocks', j, ...): leading axis of size num_cycles.
            j, n, p = path[2], groups.num_cycles, len(groups.cycle)
            if size % n:
                raise ValueError(f"stacked parameter {path} has {size} elements, not a multiple "
                                 f"of num_cycles={n}")
            for r in range(n):
                tally.add(_component(path[3:]), size // n, matmul=matmul,
                          layer=groups.cycle[j].index + r * p)
        else:
            raise ValueError(f"accounting: unexpected top-level parameter path {path!r}")
    return tally.result()


def _attention_params(cfg: ModelConfig, kind: str, tally: _Tally, layer: int | None, mtp: bool):
    """Spec §4.1, §5, §6 shapes (independent of the module code)."""
    d, h, c, dc = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank
    g, dg = cfg.o_groups, cfg.o_lora_rank
    add = functools.partial(tally.add, layer=layer, mtp=mtp)
    add("attention", d * dc + dc * h * c + d * c + g * (h // g * c) * dg + g * dg * d, matmul=True)
    add("attention", dc + c, matmul=False)      # q_norm, kv_norm
    add("attention", h, matmul=False)           # sinks

    def compressor(component, out, ratio, overlap):
        w = (2 if overlap else 1) * out
        add(component, 2 * d * w, matmul=True)  # wkv, wgate
        add(component, ratio * w + out, matmul=False)  # ape, norm

    if kind == "csa":
        compressor("compressor", c, cfg.compress_ratio_csa, True)
        ni, ci = cfg.index_n_heads, cfg.index_head_dim
        add("indexer", dc * ni * ci + d * ni, matmul=True)
        compressor("indexer", ci, cfg.compress_ratio_csa, True)
    elif kind == "hca":
        compressor("compressor", c, cfg.compress_ratio_hca, False)


def _block_params(cfg: ModelConfig, kind: str, tally: _Tally, layer: int | None, mtp: bool):
    d, n, e, i = cfg.hidden_size, cfg.hc_mult, cfg.n_routed_experts, cfg.moe_intermediate_size
    add = functools.partial(tally.add, layer=layer, mtp=mtp)
    for _ in range(2):                                  # attn_hc, ffn_hc
        add("mhc", n * d * (2 + n) * n, matmul=True)
        add("mhc", (2 + n) * n + 3, matmul=False)
    add("norms", 2 * d, matmul=False)                   # attn_norm, ffn_norm
    _attention_params(cfg, kind, tally, layer, mtp)
    add("router", d * e, matmul=True)
    add("routed_experts", e * 3 * d * i, matmul=True)
    if cfg.n_shared_experts:
        add("shared_experts", 3 * d * i, matmul=True)


def _hc_head_params(cfg: ModelConfig, tally: _Tally, mtp: bool):
    n, d = cfg.hc_mult, cfg.hidden_size
    tally.add("mhc", n * d * n, matmul=True, mtp=mtp)
    tally.add("mhc", n + 1, matmul=False, mtp=mtp)


@functools.lru_cache(maxsize=32)
def analytic_param_counts(cfg: ModelConfig) -> ParamCounts:
    """The same counts as `param_counts`, from the spec's shape formulas (§3-§10) alone.

    Buffers: each score-routed layer has a bias [E]; each hash layer a table [vocab, k].
    """
    d, v = cfg.hidden_size, cfg.vocab_size
    tally = _Tally(cfg)
    tally.add("embedding", v * d, matmul=False)
    tally.add("head", d * v, matmul=True)
    tally.add("norms", d, matmul=False)
    _hc_head_params(cfg, tally, mtp=False)
    for spec in cfg.layers:
        _block_params(cfg, spec.kind, tally, spec.index, mtp=False)
    n_hash = sum(1 for s in cfg.layers if s.routing == "hash")
    n_score = cfg.num_layers - n_hash
    if cfg.mtp_depth:
        tally.add("norms", 3 * d, matmul=False, mtp=True)          # enorm, hnorm, norm
        tally.add("mtp_projection", 2 * d * d, matmul=True, mtp=True)
        _block_params(cfg, "swa", tally, None, mtp=True)
        _hc_head_params(cfg, tally, mtp=True)
        n_score += 1
    buffers = {}
    if n_hash:
        buffers["HashTable"] = n_hash * v * cfg.num_experts_per_tok
    if n_score:
        buffers["RouterBias"] = n_score * cfg.n_routed_experts
    tally.buffers = dict(sorted(buffers.items()))
    return tally.result()


# ====================================================================== DeepSeek-V3.2 baseline
@dataclasses.dataclass(frozen=True)
class V32Config:
    """DeepSeek-V3.2 (spec §2.3): MLA + DSA token-level indexer; DeepSeekMoE, 3 dense layers."""
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_layers: int = 61
    num_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048               # tokens, not compressed entries
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    first_k_dense: int = 3
    dense_intermediate_size: int = 18432
    # Cache layout (spec §2.3): MLA entry = kv_lora FP8 + one fp32 scale per 128 + rope BF16;
    # indexer key = index_head_dim FP8 + one fp32 scale.
    kv_scale_block: int = 128

    @property
    def mla_entry_bytes(self) -> int:
        scales = 4 * (self.kv_lora_rank // self.kv_scale_block)
        return self.kv_lora_rank + scales + 2 * self.qk_rope_head_dim

    @property
    def indexer_key_bytes(self) -> int:
        return self.index_head_dim + 4


@dataclasses.dataclass(frozen=True)
class V32Params:
    total: int
    activated: int
    activated_matmul: int


def v32_param_counts(v: V32Config = V32Config()) -> V32Params:
    """V3.2 parameters (main model, no MTP) from its shapes; published 671B total, 37B active."""
    d, h = v.hidden_size, v.num_heads
    attn_mm = (d * v.q_lora_rank + v.q_lora_rank * h * (v.qk_nope_head_dim + v.qk_rope_head_dim)
               + d * (v.kv_lora_rank + v.qk_rope_head_dim)
               + v.kv_lora_rank * h * (v.qk_nope_head_dim + v.v_head_dim) + h * v.v_head_dim * d)
    attn_vec = v.q_lora_rank + v.kv_lora_rank
    idx_mm = v.q_lora_rank * v.index_n_heads * v.index_head_dim + d * v.index_head_dim \
        + d * v.index_n_heads
    idx_vec = 2 * v.index_head_dim                      # LayerNorm on the indexer key
    per_layer_vec = attn_vec + idx_vec + 2 * d
    dense_mm = 3 * d * v.dense_intermediate_size
    n_moe = v.num_layers - v.first_k_dense
    expert = 3 * d * v.moe_intermediate_size
    moe_total = d * v.n_routed_experts + (v.n_routed_experts + v.n_shared_experts) * expert
    moe_act = d * v.n_routed_experts + (v.num_experts_per_tok + v.n_shared_experts) * expert
    head = d * v.vocab_size
    common_mm = v.num_layers * (attn_mm + idx_mm) + v.first_k_dense * dense_mm + head
    vec = v.num_layers * per_layer_vec + d
    total = common_mm + n_moe * moe_total + vec + v.vocab_size * d
    act_mm = common_mm + n_moe * moe_act
    return V32Params(total=total, activated=act_mm + vec, activated_matmul=act_mm)


# ====================================================================== FLOPs
@dataclasses.dataclass(frozen=True)
class PrecisionWeights:
    """Multipliers turning raw FLOPs into "FP8-equivalent" FLOPs (spec §12.2).

    GEMMs in FP8 (or FP4 weights x FP8, same peak today) x1; the BF16 attention core x2; an FP8
    indexer x1; an FP4 x FP4 indexer x0.5.
    """
    gemm: float = 1.0
    attention: float = 2.0
    indexer: float = 1.0


V4_WEIGHTS = PrecisionWeights(indexer=0.5)   # FP4 indexer QK path
V32_WEIGHTS = PrecisionWeights(indexer=1.0)  # FP8 indexer


@dataclasses.dataclass(frozen=True)
class DecodeFlops:
    """FLOPs to decode one token whose context (itself included) is `context_len` tokens.

    linear = 2 x activated matmul parameters (projections, router, experts, mHC, head);
    attention = core attention over the entries each layer attends (QK and PV);
    indexer = lightning-indexer scoring of every visible key. `weighted` applies `weights`.
    """
    context_len: int
    linear: float
    attention: float
    indexer: float
    attention_by_kind: Mapping[str, float]
    weights: PrecisionWeights

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.indexer

    @property
    def weighted(self) -> float:
        w = self.weights
        return w.gemm * self.linear + w.attention * self.attention + w.indexer * self.indexer


def _check_len(name: str, n: int):
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name}={n!r} is invalid: must be an integer >= 1")


def entries_per_query(cfg: ModelConfig, kind: str, context_len: int, *,
                      sparse: bool = True) -> tuple[int, int]:
    """(window keys, compressed entries) attended by the query whose context is `context_len`.

    The query sits at position t = context_len - 1: the window holds min(n_win, t+1) raw keys;
    compressed entries w < floor((t+1)/m) are visible; CSA keeps min(index_topk, visible) of them
    (all visible when sparse=False), HCA keeps all, SWA-only layers none.
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"kind={kind!r} is invalid: allowed values {LAYER_KINDS}")
    _check_len("context_len", context_len)
    window = min(cfg.sliding_window, context_len)
    if kind == "swa":
        return window, 0
    visible = context_len // cfg.ratio_of(kind)
    if kind == "csa" and sparse:
        return window, min(cfg.index_topk, visible)
    return window, visible


def _attention_flops_per_entry(cfg: ModelConfig) -> int:
    """Per (query, head, entry): q.k over head_dim and p*v over head_dim, 2 FLOPs per MAC."""
    return 2 * (cfg.head_dim + cfg.head_dim)


def _indexer_flops_per_key(cfg: ModelConfig) -> int:
    return 2 * cfg.index_n_heads * cfg.index_head_dim


def flops_per_token(cfg: ModelConfig, context_len: int, *, sparse: bool = True,
                    include_mtp: bool = False,
                    weights: PrecisionWeights = V4_WEIGHTS) -> DecodeFlops:
    """Decode FLOPs for one token at context N = `context_len` (spec §12.2).

    Counted: 2 x activated matmul params; per layer, H x (entries attended) x 2 x (d_qk + d_v)
    with d_qk = d_v = head_dim; per CSA layer, 2 x n_I x c_I x floor(N/m) for indexer scoring.
    Not counted: softmax, norms, RoPE, compressor pooling, top-k (all O(entries) or O(d), small).
    include_mtp adds the MTP block (its layer and a second pass through the head), which the
    published comparison leaves out.
    """
    pc = param_counts(cfg)
    linear = 2.0 * pc.activated_matmul
    per_entry = _attention_flops_per_entry(cfg) * cfg.num_heads
    by_kind = {k: 0.0 for k in pc.by_kind}
    indexer = 0.0
    for spec in cfg.layers:
        w, c = entries_per_query(cfg, spec.kind, context_len, sparse=sparse)
        by_kind[spec.kind] += per_entry * (w + c)
        if spec.kind == "csa":
            indexer += _indexer_flops_per_key(cfg) * (context_len // cfg.compress_ratio_csa)
    if include_mtp and cfg.mtp_depth:
        linear += 2.0 * (pc.mtp_activated_matmul + pc.by_component["head"])
        w, _ = entries_per_query(cfg, "swa", context_len)
        by_kind["mtp"] = per_entry * w
    return DecodeFlops(context_len=context_len, linear=linear, attention=sum(by_kind.values()),
                       indexer=indexer, attention_by_kind=by_kind, weights=weights)


def v32_flops_per_token(context_len: int, v: V32Config = V32Config(), *,
                        weights: PrecisionWeights = V32_WEIGHTS) -> DecodeFlops:
    """V3.2 decode FLOPs at context N: 2 x activated matmul params; absorbed MLA over the
    min(index_topk, N) selected tokens, H x 2 x (d_qk = kv_lora + rope, d_v = kv_lora) per entry;
    the DSA indexer scores all N tokens in every layer."""
    _check_len("context_len", context_len)
    linear = 2.0 * v32_param_counts(v).activated_matmul
    entries = min(v.index_topk, context_len)
    d_qk, d_v = v.kv_lora_rank + v.qk_rope_head_dim, v.kv_lora_rank
    attn = v.num_layers * v.num_heads * entries * 2 * (d_qk + d_v)
    indexer = v.num_layers * 2 * v.index_n_heads * v.index_head_dim * context_len
    return DecodeFlops(context_len=context_len, linear=linear, attention=float(attn),
                       indexer=float(indexer), attention_by_kind={"mla": float(attn)},
                       weights=weights)


@dataclasses.dataclass(frozen=True)
class TrainFlops:
    """Model FLOPs per trained token, averaged over the positions of a length-`seq_len` sequence.

    forward = linear + attention + indexer (+ indexer_target); backward = 2 x (linear + attention
    + indexer): the gradient of every matmul costs two matmuls of the same size, and the indexer
    is trained through its KL loss. indexer_target (the dense attention mass on compressed
    entries that the KL loss needs) is computed under stop_gradient: forward only.
    Recomputation by remat is not counted (these are model FLOPs, the MFU convention).
    """
    seq_len: int
    linear: float
    attention: float
    indexer: float
    indexer_target: float

    @property
    def forward(self) -> float:
        return self.linear + self.attention + self.indexer + self.indexer_target

    @property
    def backward(self) -> float:
        return 2.0 * (self.linear + self.attention + self.indexer)

    @property
    def total(self) -> float:
        return self.forward + self.backward


def _mean_entries(cfg: ModelConfig, kind: str, seq_len: int, sparse: bool) -> tuple[float, float]:
    """Mean over t = 0..S-1 of (window keys, compressed entries) attended by query t."""
    t1 = np.arange(1, seq_len + 1, dtype=np.int64)          # t + 1
    window = float(np.minimum(t1, cfg.sliding_window).mean())
    if kind == "swa":
        return window, 0.0
    visible = t1 // cfg.ratio_of(kind)
    if kind == "csa" and sparse:
        visible = np.minimum(visible, cfg.index_topk)
    return window, float(visible.mean())


def train_flops_per_token(cfg: ModelConfig, seq_len: int, *, sparse: bool = True,
                          include_mtp: bool = True, indexer_target: bool = True) -> TrainFlops:
    """Training FLOPs per token for one document of `seq_len` tokens per row (see TrainFlops).

    linear: 2 x activated matmul params (+ the MTP block and its second head pass when
    include_mtp, as the training step computes MTP logits). attention: per layer, H x 2 x
    (2 x head_dim) x the mean number of entries a query attends: window min(n_win, t+1), CSA
    min(k, floor((t+1)/m)) (all visible when sparse=False, the indexer warm-up), HCA
    floor((t+1)/m'); the computation on padded or masked slots is not counted. indexer: per CSA
    layer 2 x n_I x c_I x the mean visible keys floor((t+1)/m). indexer_target: per CSA layer
    H x 2 x head_dim x mean visible entries (q.k against every visible entry).
    Packed documents shorter than seq_len attend fewer entries; pass their length instead.
    """
    _check_len("seq_len", seq_len)
    pc = param_counts(cfg)
    linear = 2.0 * pc.activated_matmul
    per_entry = _attention_flops_per_entry(cfg) * cfg.num_heads
    attention = indexer = target = 0.0
    means = {k: _mean_entries(cfg, k, seq_len, sparse) for k in pc.by_kind}
    _, vis = _mean_entries(cfg, "csa", seq_len, sparse=False)      # visible CSA entries
    for spec in cfg.layers:
        w, c = means[spec.kind]
        attention += per_entry * (w + c)
        if spec.kind == "csa":
            indexer += _indexer_flops_per_key(cfg) * vis
            if indexer_target:
                target += cfg.num_heads * 2 * cfg.head_dim * vis
    if include_mtp and cfg.mtp_depth:
        linear += 2.0 * (pc.mtp_activated_matmul + pc.by_component["head"])
        attention += per_entry * _mean_entries(cfg, "swa", seq_len, sparse)[0]
    return TrainFlops(seq_len=seq_len, linear=linear, attention=attention, indexer=indexer,
                      indexer_target=target)


# ====================================================================== KV cache
KV_LAYOUTS = ("bf16", "released")


def _layout_bytes(layout: str, dtype_bytes: int | None) -> int | None:
    if layout not in KV_LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: allowed values {KV_LAYOUTS}")
    if layout == "released":
        if dtype_bytes is not None:
            raise ValueError("dtype_bytes applies only to layout='bf16' (dense rows); the "
                             "'released' layout fixes its own FP8/FP4/BF16 formats")
        return None
    if dtype_bytes is None:
        return 2
    if dtype_bytes not in (1, 2, 4):
        raise ValueError(f"dtype_bytes={dtype_bytes!r} is invalid: allowed values (1, 2, 4)")
    return dtype_bytes


def kv_entry_bytes(cfg: ModelConfig, layout: str = "bf16", *,
                   dtype_bytes: int | None = None) -> tuple[int, int]:
    """(main KV row, indexer key row) in bytes.

    bf16: head_dim x dtype_bytes and index_head_dim x dtype_bytes (dtype_bytes 2 by default,
    4 for fp32 caches). released (spec §12.1, FlashMLA MODEL1_FP8Sparse): main row = the
    non-RoPE dims in FP8 + the RoPE dims in BF16 + one ue8m0 scale byte per 64 FP8 values, padded
    to a multiple of 8 bytes (584 B for 512/64); indexer key = FP4 (half a byte per value) + one
    scale byte per 32 values (68 B for 128). The padding rule is our assumption beyond 512/64.
    """
    b = _layout_bytes(layout, dtype_bytes)
    if b is not None:
        return cfg.head_dim * b, cfg.index_head_dim * b
    nope, rope = cfg.head_dim - cfg.rope_head_dim, cfg.rope_head_dim
    main = nope + 2 * rope + math.ceil(nope / 64)
    main = -(-main // 8) * 8
    idx = math.ceil(cfg.index_head_dim / 2) + math.ceil(cfg.index_head_dim / 32)
    return main, idx


def _cached_rows(cfg: ModelConfig, kind: str, main: int, idx: int):
    """(bytes per cached row, tokens per row, compressor tails [(c, m, overlap)]) of one
    layer's cache (`inference.cache.layer_cache`): HCA an entry per m' tokens; CSA by its
    selector: lightning an entry and an indexer key per m tokens, dense / fixed / mlp_router
    the entry only, dsa_tokens a raw row and a key per token (V3.2: nothing compressed)."""
    m = cfg.compress_ratio_csa
    if kind == "hca":
        return main, cfg.compress_ratio_hca, ((cfg.head_dim, cfg.compress_ratio_hca, False),)
    if kind != "csa":
        return 0, 1, ()
    if cfg.selector == "dsa_tokens":
        return main + idx, 1, ()
    if cfg.selector == "lightning":
        return main + idx, m, ((cfg.head_dim, m, True), (cfg.index_head_dim, m, True))
    return main, m, ((cfg.head_dim, m, True),)


def kv_cache_bytes_per_token(cfg: ModelConfig, layout: str = "bf16", *,
                             dtype_bytes: int | None = None) -> float:
    """Bytes the growing cache adds per token of context, summed over the main model's layers.

    CSA layer: (main row + indexer key) / m; HCA layer: main row / m'; SWA-only layers: 0 (their
    window is fixed-size state, see `kv_cache_state_bytes`). CSA layers with another selector
    than lightning cache what it reads (`_cached_rows`). The MTP block is an SWA-only layer
    and adds nothing per token. Exactly: `kv_cache_bytes(cfg, N)` = sum over layers of
    floor(N / m) rows + the state.
    """
    main, idx = kv_entry_bytes(cfg, layout, dtype_bytes=dtype_bytes)
    total = 0.0
    for spec in cfg.layers:
        row, tokens, _ = _cached_rows(cfg, spec.kind, main, idx)
        total += row / tokens
    return total


def kv_cache_state_bytes(cfg: ModelConfig, layout: str = "bf16", *,
                         dtype_bytes: int | None = None, state_dtype_bytes: int | None = None,
                         include_mtp: bool = False) -> int:
    """Fixed-size per-sequence state (spec §13.1): what does not grow with context.

    - window ring buffer, every attention layer: sliding_window main rows (layout's row size);
    - compressor tails (the official fixed-size buffers): per compressor a kv and a score
      buffer of (1+ov)*m slots x (1+ov)*c channels, ov = 1 for the CSA kind; CSA layers have two
      compressors (main, c = head_dim, and the indexer's, c = index_head_dim), HCA one (CSA
      with another selector: `_cached_rows`).
    state_dtype_bytes is the tail element size: default 4 (fp32, as the official reference)
    for 'released' and dtype_bytes for 'bf16' (every row in that dtype).
    include_mtp adds the MTP block's window.
    """
    b = _layout_bytes(layout, dtype_bytes)
    if state_dtype_bytes is None:
        state_dtype_bytes = 4 if b is None else b
    if state_dtype_bytes not in (1, 2, 4):
        raise ValueError(f"state_dtype_bytes={state_dtype_bytes!r} is invalid: allowed values "
                         "(1, 2, 4)")
    main, _ = kv_entry_bytes(cfg, layout, dtype_bytes=dtype_bytes)

    def tail(c, m, overlap):
        f = 2 if overlap else 1
        return 2 * (f * m) * (f * c) * state_dtype_bytes

    total = 0
    n_windows = cfg.num_layers + (1 if include_mtp and cfg.mtp_depth else 0)
    total += n_windows * cfg.sliding_window * main
    for spec in cfg.layers:
        total += sum(tail(*t) for t in _cached_rows(cfg, spec.kind, main, 0)[2])
    return total


def kv_cache_bytes(cfg: ModelConfig, context_len: int, layout: str = "bf16", *,
                   dtype_bytes: int | None = None, state_dtype_bytes: int | None = None,
                   include_mtp: bool = False) -> int:
    """Whole cache of one sequence of `context_len` tokens: floor(N/m) complete compressed rows
    per compressed layer (+ indexer keys for CSA) plus the fixed-size state."""
    _check_len("context_len", context_len)
    main, idx = kv_entry_bytes(cfg, layout, dtype_bytes=dtype_bytes)
    total = 0
    for spec in cfg.layers:
        row, tokens, _ = _cached_rows(cfg, spec.kind, main, idx)
        total += (context_len // tokens) * row
    return total + kv_cache_state_bytes(cfg, layout, dtype_bytes=dtype_bytes,
                                        state_dtype_bytes=state_dtype_bytes,
                                        include_mtp=include_mtp)


def v32_kv_bytes_per_token(v: V32Config = V32Config()) -> int:
    """V3.2: every layer caches one MLA row (656 B) and one indexer key (132 B) per token."""
    return v.num_layers * (v.mla_entry_bytes + v.indexer_key_bytes)


def gqa_kv_bytes_per_token(num_layers: int = 61, kv_heads: int = 8, head_dim: int = 128,
                           dtype_bytes: int = 2) -> int:
    """A dense GQA baseline: K and V rows for kv_heads heads per layer (BF16 by default)."""
    return num_layers * 2 * kv_heads * head_dim * dtype_bytes
