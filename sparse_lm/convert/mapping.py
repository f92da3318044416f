"""Tensor names and layouts: Hugging Face (transformers) state dict <-> our NNX state.

The mapping is a list of `Group`s. A group ties one or more of our state leaves (flat paths in
`nnx.state(model)`) to one or more HF tensors through an exact, invertible `Transform`:

* HF linear weights are [out, in]; ours are [in, out] (`Transpose`), likewise mHC `fn`
  (HF [(2+n)n, n*d] vs ours [n*d, (2+n)n]) and the router gate.
* `o_a_proj` [g*o_lora, H/g*D] (viewed [g, o_lora, H/g*D]) vs our `wo_a` [g, H/g*D, o_lora].
* Experts: HF `gate_up_proj` [E, 2I, d] (gate rows first) vs our w_gate/w_up [E, d, I];
  HF `down_proj` [E, d, I] vs our w_down [E, I, d].
* `tid2eid` int64 [V, K] vs our int32 hash table.

Layers are located through `cfg.layer_groups`: HF layer i lives in `head_layers[i]`, in
`cycles.blocks[j]` at slice r of the stacked (leading) axis, or in `tail_layers[i]`. A group of a
scanned layer lists the HF names of every cycle repeat (`hf[r]`).

Names are transformers' (`model.layers.{i}.self_attn.q_a_proj.weight`, spec §14a.10). MTP weights,
which transformers drops, are named `mtp.0.` + the same per-layer names, plus `mtp.0.{e_proj,
h_proj}.weight`, `mtp.0.{enorm,hnorm,norm}.weight`, `mtp.0.hc_head.{hc_fn,hc_base,hc_scale}`.
The official checkpoint names (`layers.{i}.attn.wq_a.weight`, per-expert `w1/w2/w3`, `.scale`
companions) are translated by `official_to_logical` / `logical_to_official`.

Reading: every naming scheme a DeepSeek-V4 checkpoint comes in has one `NameScheme` table here
(`SCHEMES`: transformers' state-dict names = what sparse_lm writes, transformers 5.x
`save_pretrained` of a loaded model, `save_pretrained` of a freshly built model, the official
release); `detect_scheme` picks the one scheme of a checkpoint (mixed or unknown: an error).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from sparse_lm.config import ModelConfig


class MappingError(ValueError):
    """A tensor does not fit the mapping; the message names the tensor."""


# ------------------------------------------------------------------------------------ transforms
class Transform:
    """Exact conversion between HF arrays (one list) and our arrays (one list) of one layer."""
    n_ours = 1
    n_hf = 1

    def to_ours(self, hf: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def to_hf(self, ours: Sequence[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def hf_shapes(self, ours: Sequence[tuple]) -> list[tuple]:
        raise NotImplementedError


class Identity(Transform):
    def to_ours(self, hf):
        return [hf[0]]

    def to_hf(self, ours):
        return [ours[0]]

    def hf_shapes(self, ours):
        return [tuple(ours[0])]


class Transpose(Transform):
    """HF [out, in] <-> ours [in, out] (any leading axes kept; the last two are swapped)."""

    def to_ours(self, hf):
        return [np.swapaxes(hf[0], -1, -2)]

    def to_hf(self, ours):
        return [np.swapaxes(ours[0], -1, -2)]

    def hf_shapes(self, ours):
        s = tuple(ours[0])
        return [s[:-2] + (s[-1], s[-2])]


class GroupedOutA(Transform):
    """HF o_a_proj [g*o, H/g*D] <-> ours wo_a [g, H/g*D, o]."""

    def to_ours(self, hf):
        w = hf[0]
        g_times_o, hgd = w.shape
        blocks = w.reshape(self.g, g_times_o // self.g, hgd)
        return [np.ascontiguousarray(blocks.transpose(0, 2, 1))]

    def to_hf(self, ours):
        g, hgd, o = ours[0].shape
        return [np.ascontiguousarray(ours[0].transpose(0, 2, 1)).reshape(g * o, hgd)]

    def hf_shapes(self, ours):
        g, hgd, o = ours[0]
        return [(g * o, hgd)]

    def __init__(self, g: int):
        self.g = g


class ExpertsGateUp(Transform):
    """HF gate_up_proj [E, 2I, d] (rows 0..I-1 gate, I..2I-1 up) <-> ours (w_gate, w_up),
    each [E, d, I]."""
    n_ours = 2

    def to_ours(self, hf):
        gu = hf[0]
        i = gu.shape[1] // 2
        return [np.ascontiguousarray(np.swapaxes(gu[:, :i], 1, 2)),
                np.ascontiguousarray(np.swapaxes(gu[:, i:], 1, 2))]

    def to_hf(self, ours):
        return [np.concatenate([np.swapaxes(ours[0], 1, 2), np.swapaxes(ours[1], 1, 2)], axis=1)]

    def hf_shapes(self, ours):
        e, d, i = ours[0]
        return [(e, 2 * i, d)]


class ExpertsDown(Transform):
    """HF down_proj [E, d, I] <-> ours w_down [E, I, d]."""

    def to_ours(self, hf):
        return [np.ascontiguousarray(np.swapaxes(hf[0], 1, 2))]

    def to_hf(self, ours):
        return [np.ascontiguousarray(np.swapaxes(ours[0], 1, 2))]

    def hf_shapes(self, ours):
        e, i, d = ours[0]
        return [(e, d, i)]


class HashIds(Transform):
    """HF tid2eid int64 [V, K] <-> ours int32 [V, K] (values must be valid expert ids)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def to_ours(self, hf):
        t = hf[0]
        if not np.issubdtype(t.dtype, np.integer):
            raise MappingError(f"tid2eid must be an integer table, got dtype {t.dtype}")
        if t.size and (t.min() < 0 or t.max() >= self.num_experts):
            raise MappingError(f"tid2eid holds expert ids in [{t.min()}, {t.max()}], outside "
                               f"[0, n_routed_experts={self.num_experts})")
        return [t.astype(np.int32)]

    def to_hf(self, ours):
        return [ours[0].astype(np.int64)]

    def hf_shapes(self, ours):
        return [tuple(ours[0])]


# ---------------------------------------------------------------------------------------- groups
@dataclasses.dataclass(frozen=True)
class Group:
    """Our leaves `ours` <-> HF tensors `hf[r]` (r = cycle repeat; one entry when not stacked)."""
    ours: tuple[tuple, ...]
    hf: tuple[tuple[str, ...], ...]
    transform: Transform
    stacked: bool = False
    experts: bool = False      # the first (unstacked) axis is the expert axis, on both sides
    keep_fp32: bool = False    # transformers keeps it in fp32 (norms, mHC, sinks, biases)

    @property
    def hf_names(self) -> list[str]:
        return [n for names in self.hf for n in names]


def _block_entries(cfg: ModelConfig, kind: str, routing: str):
    """(our relative paths, HF suffixes, transform, experts, keep_fp32) of one layer."""
    T, I = Transpose(), Identity()
    e = [
        ((("attn_hc", "fn"),), ("attn_hc.fn",), T, False, True),
        ((("attn_hc", "base"),), ("attn_hc.base",), I, False, True),
        ((("attn_hc", "scale"),), ("attn_hc.scale",), I, False, True),
        ((("ffn_hc", "fn"),), ("ffn_hc.fn",), T, False, True),
        ((("ffn_hc", "base"),), ("ffn_hc.base",), I, False, True),
        ((("ffn_hc", "scale"),), ("ffn_hc.scale",), I, False, True),
        ((("attn_norm", "weight"),), ("input_layernorm.weight",), I, False, True),
        ((("ffn_norm", "weight"),), ("post_attention_layernorm.weight",), I, False, True),
        ((("attn", "wq_a"),), ("self_attn.q_a_proj.weight",), T, False, False),
        ((("attn", "q_norm", "weight"),), ("self_attn.q_a_norm.weight",), I, False, True),
        ((("attn", "wq_b"),), ("self_attn.q_b_proj.weight",), T, False, False),
        ((("attn", "wkv"),), ("self_attn.kv_proj.weight",), T, False, False),
        ((("attn", "kv_norm", "weight"),), ("self_attn.kv_norm.weight",), I, False, True),
        ((("attn", "wo_a"),), ("self_attn.o_a_proj.weight",), GroupedOutA(cfg.o_groups), False,
         False),
        ((("attn", "wo_b"),), ("self_attn.o_b_proj.weight",), T, False, False),
        ((("attn", "sink"),), ("self_attn.sinks",), I, False, True),
    ]
    if kind != "swa":
        c = "self_attn.compressor."
        e += [
            ((("attn", "compressor", "wkv"),), (c + "kv_proj.weight",), T, False, False),
            ((("attn", "compressor", "wgate"),), (c + "gate_proj.weight",), T, False, False),
            ((("attn", "compressor", "ape"),), (c + "position_bias",), I, False, True),
            ((("attn", "compressor", "norm", "weight"),), (c + "kv_norm.weight",), I, False, True),
        ]
    if kind == "csa":
        x = "self_attn.compressor.indexer."
        e += [
            ((("attn", "indexer", "wq_b"),), (x + "q_b_proj.weight",), T, False, False),
            ((("attn", "indexer", "weights_proj"),), (x + "scorer.weights_proj.weight",), T, False,
             False),
            ((("attn", "indexer", "compressor", "wkv"),), (x + "kv_proj.weight",), T, False, False),
            ((("attn", "indexer", "compressor", "wgate"),), (x + "gate_proj.weight",), T, False,
             False),
            ((("attn", "indexer", "compressor", "ape"),), (x + "position_bias",), I, False, True),
            ((("attn", "indexer", "compressor", "norm", "weight"),), (x + "kv_norm.weight",), I,
             False, True),
        ]
    e.append(((("moe", "gate"),), ("mlp.gate.weight",), T, False, False))
    if routing == "score":
        e.append(((("moe", "bias"),), ("mlp.gate.e_score_correction_bias",), I, False, True))
    else:
        e.append(((("moe", "tid2eid"),), ("mlp.gate.tid2eid",), HashIds(cfg.n_routed_experts),
                  False, False))
    e += [
        ((("moe", "w_gate"), ("moe", "w_up")), ("mlp.experts.gate_up_proj",), ExpertsGateUp(),
         True, False),
        ((("moe", "w_down"),), ("mlp.experts.down_proj",), ExpertsDown(), True, False),
    ]
    if cfg.n_shared_experts:
        s = "mlp.shared_experts."
        e += [
            ((("moe", "shared_gate"),), (s + "gate_proj.weight",), T, False, False),
            ((("moe", "shared_up"),), (s + "up_proj.weight",), T, False, False),
            ((("moe", "shared_down"),), (s + "down_proj.weight",), T, False, False),
        ]
    return e


def _block_groups(cfg, kind, routing, ours_prefix, hf_prefixes, stacked):
    out = []
    for rel_paths, suffixes, tr, experts, fp32 in _block_entries(cfg, kind, routing):
        out.append(Group(ours=tuple(ours_prefix + p for p in rel_paths),
                         hf=tuple(tuple(pre + s for s in suffixes) for pre in hf_prefixes),
                         transform=tr, stacked=stacked, experts=experts, keep_fp32=fp32))
    return out


def hf_layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


MTP_PREFIX = "mtp.0."


def build_groups(cfg: ModelConfig) -> list[Group]:
    """Every group of the model described by `cfg`, in HF layer order."""
    T, I = Transpose(), Identity()
    groups = [Group((("embed",),), (("model.embed_tokens.weight",),), I)]
    lg = cfg.layer_groups
    for i, spec in enumerate(lg.head):
        groups += _block_groups(cfg, spec.kind, spec.routing, ("head_layers", i),
                                [hf_layer_prefix(spec.index)], False)
    p = len(lg.cycle)
    for j, spec in enumerate(lg.cycle):
        prefixes = [hf_layer_prefix(spec.index + r * p) for r in range(lg.num_cycles)]
        groups += _block_groups(cfg, spec.kind, spec.routing, ("cycles", "blocks", j), prefixes,
                                True)
    for i, spec in enumerate(lg.tail):
        groups += _block_groups(cfg, spec.kind, spec.routing, ("tail_layers", i),
                                [hf_layer_prefix(spec.index)], False)
    groups += [
        Group((("hc_head", "fn"),), (("model.hc_head.hc_fn",),), T, keep_fp32=True),
        Group((("hc_head", "base"),), (("model.hc_head.hc_base",),), I, keep_fp32=True),
        Group((("hc_head", "scale"),), (("model.hc_head.hc_scale",),), I, keep_fp32=True),
        Group((("norm", "weight"),), (("model.norm.weight",),), I, keep_fp32=True),
        Group((("lm_head",),), (("lm_head.weight",),), T),
    ]
    if cfg.mtp_depth:
        m = MTP_PREFIX
        groups += [
            Group((("mtp", "enorm", "weight"),), ((m + "enorm.weight",),), I, keep_fp32=True),
            Group((("mtp", "hnorm", "weight"),), ((m + "hnorm.weight",),), I, keep_fp32=True),
            Group((("mtp", "w_e"),), ((m + "e_proj.weight",),), T),
            Group((("mtp", "w_h"),), ((m + "h_proj.weight",),), T),
        ]
        groups += _block_groups(cfg, "swa", "score", ("mtp", "block"), [m], False)
        groups += [
            Group((("mtp", "hc_head", "fn"),), ((m + "hc_head.hc_fn",),), T, keep_fp32=True),
            Group((("mtp", "hc_head", "base"),), ((m + "hc_head.hc_base",),), I, keep_fp32=True),
            Group((("mtp", "hc_head", "scale"),), ((m + "hc_head.hc_scale",),), I, keep_fp32=True),
            Group((("mtp", "norm", "weight"),), ((m + "norm.weight",),), I, keep_fp32=True),
        ]
    return groups


# ---------------------------------------------------------------------- official checkpoint names
# Per-layer renames, official suffix -> transformers suffix (transformers' conversion_mapping does
# the same with regexes; spelled out here so each name is exact). Routed experts are fused
# separately: `ffn.experts.{e}.w1/w3.weight` -> `mlp.experts.gate_up_proj`, `w2` -> `down_proj`.
_LAYER_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "hc_attn_fn": "attn_hc.fn", "hc_attn_base": "attn_hc.base", "hc_attn_scale": "attn_hc.scale",
    "hc_ffn_fn": "ffn_hc.fn", "hc_ffn_base": "ffn_hc.base", "hc_ffn_scale": "ffn_hc.scale",
    "attn.attn_sink": "self_attn.sinks",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight",
    "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight",
    "attn.compressor.wkv.weight": "self_attn.compressor.kv_proj.weight",
    "attn.compressor.wgate.weight": "self_attn.compressor.gate_proj.weight",
    "attn.compressor.ape": "self_attn.compressor.position_bias",
    "attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "attn.indexer.compressor.wkv.weight": "self_attn.compressor.indexer.kv_proj.weight",
    "attn.indexer.compressor.wgate.weight": "self_attn.compressor.indexer.gate_proj.weight",
    "attn.indexer.compressor.ape": "self_attn.compressor.indexer.position_bias",
    "attn.indexer.compressor.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}
_MTP_RENAMES = {
    "e_proj.weight": "e_proj.weight", "h_proj.weight": "h_proj.weight",
    "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "norm.weight": "norm.weight",
    "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base",
    "hc_head_scale": "hc_head.hc_scale",
}
_TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale",
}


@dataclasses.dataclass(frozen=True)
class ExpertPart:
    """One official per-expert tensor that is a slice of a fused logical tensor."""
    logical: str      # e.g. model.layers.3.mlp.experts.gate_up_proj
    expert: int
    part: str         # "w1" (gate rows), "w3" (up rows) or "w2" (down)


def official_to_logical(name: str) -> str | ExpertPart | None:
    """Official name -> transformers name (or the fused expert tensor it belongs to); None if
    the name is not part of the model. Scale companions are handled by the reader."""
    return OFFICIAL.to_logical(name)


def _logical_layer_prefix(official_prefix: str) -> str:
    kind, idx = official_prefix.split(".")
    return f"model.layers.{idx}." if kind == "layers" else f"mtp.{idx}."


# ---------------------------------------------------------------------------- naming schemes
# Every checkpoint is read in exactly one naming scheme, detected from its tensor names
# (`detect_scheme`). Each scheme is one table: physical name -> logical (transformers state-dict)
# name, top-level names spelled out, per-layer names as suffix tables under a layer prefix, and
# routed experts either fused (`mlp.experts.gate_up_proj` / `down_proj`) or one tensor per expert
# (`...experts.{e}.w1/w2/w3.weight`). The logical names are what `build_groups` uses.

# Per-layer logical suffixes (transformers' state-dict names).
_LOGICAL_LAYER = tuple(_LAYER_RENAMES.values()) + ("mlp.experts.gate_up_proj",
                                                   "mlp.experts.down_proj")
_LOGICAL_TOP = tuple(_TOP_RENAMES.values())
# transformers 5.23.0 `save_pretrained` of a model that was loaded from a state-dict-named
# checkpoint: its weight-conversion machinery renames the three KV norms on the way out
# (`.norm.` <-> `.kv_norm.` is the one conversion rule that also matches transformers' own names).
_RESAVED_NORMS = {
    "self_attn.norm.weight": "self_attn.kv_norm.weight",
    "self_attn.compressor.norm.weight": "self_attn.compressor.kv_norm.weight",
    "self_attn.compressor.indexer.norm.weight": "self_attn.compressor.indexer.kv_norm.weight",
}


@dataclasses.dataclass(frozen=True)
class NameScheme:
    """One checkpoint naming scheme: physical names -> logical (transformers state-dict) names."""
    name: str
    description: str
    top: dict                     # physical top-level name -> logical name
    layer_prefix: str             # physical prefix of layer i: f"{layer_prefix}{i}."
    layer: dict                   # physical per-layer suffix -> logical suffix
    mtp_prefix: str | None        # physical prefix of MTP block j: f"{mtp_prefix}{j}." (None: none)
    mtp: dict                     # MTP-only physical suffix -> logical suffix (besides `layer`)
    per_expert: bool              # routed experts stored as `{...}.experts.{e}.w1/w2/w3.weight`
    expert_infix: str = "ffn.experts."

    def to_logical(self, name: str) -> "str | ExpertPart | None":
        """The logical name of a physical tensor (or the fused expert tensor it is a slice
        of); None when the name is not part of this scheme. Scale companions are not names."""
        if name in self.top:
            return self.top[name]
        for prefix, logical_prefix, extra in (
                (self.layer_prefix, "model.layers.", {}),
                (self.mtp_prefix, "mtp.", self.mtp)):
            if prefix is None or not name.startswith(prefix):
                continue
            idx, dot, rest = name[len(prefix):].partition(".")
            if not (dot and idx.isdigit() and str(int(idx)) == idx):
                continue
            lp = f"{logical_prefix}{idx}."
            if rest in self.layer:
                return lp + self.layer[rest]
            if rest in extra:
                return lp + extra[rest]
            if self.per_expert and rest.startswith(self.expert_infix):
                e, dot, part = rest[len(self.expert_infix):].partition(".")
                if dot and e.isdigit() and str(int(e)) == e and \
                        part in ("w1.weight", "w2.weight", "w3.weight"):
                    p = part.split(".")[0]
                    fused = "down_proj" if p == "w2" else "gate_up_proj"
                    return ExpertPart(lp + "mlp.experts." + fused, int(e), p)
        return None


    def to_physical(self, logical: str, num_experts: int) -> list[str]:
        """The physical names of a logical tensor in this scheme (several for fused experts
        stored per expert: w1 and w3 of every expert, or w2); the inverse of `to_logical`."""
        inv_top = {v: k for k, v in self.top.items()}
        if logical in inv_top:
            return [inv_top[logical]]
        for prefix, logical_prefix, extra in (
                (self.layer_prefix, "model.layers.", {}),
                (self.mtp_prefix, "mtp.", self.mtp)):
            if not logical.startswith(logical_prefix):
                continue
            if prefix is None:
                raise MappingError(f"{logical!r} has no name in the {self.name!r} scheme")
            idx, _, rest = logical[len(logical_prefix):].partition(".")
            pp = f"{prefix}{idx}."
            inv = {v: k for k, v in {**self.layer, **extra}.items()}
            if rest in inv:
                return [pp + inv[rest]]
            if self.per_expert and rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
                parts = ("w2",) if rest.endswith("down_proj") else ("w1", "w3")
                return [f"{pp}{self.expert_infix}{e}.{p}.weight" for e in range(num_experts)
                        for p in parts]
        raise MappingError(f"{logical!r} has no name in the {self.name!r} scheme")


_IDENT = lambda names: {n: n for n in names}    # noqa: E731
_MTP_LOGICAL = tuple(_MTP_RENAMES.values())

TRANSFORMERS = NameScheme(
    "transformers",
    "transformers' state-dict names (`model.state_dict()`, what `safetensors.save_file` of it "
    "and sparse_lm's exporter write): model.layers.{i}.self_attn.kv_norm.weight, lm_head.weight, "
    "fused mlp.experts.gate_up_proj / down_proj; MTP as mtp.0.*",
    _IDENT(_LOGICAL_TOP), "model.layers.", _IDENT(_LOGICAL_LAYER), "mtp.", _IDENT(_MTP_LOGICAL),
    per_expert=False)
TRANSFORMERS_RESAVED = NameScheme(
    "transformers-resaved",
    "transformers 5.x save_pretrained of a model loaded from state-dict names: as "
    "'transformers' but the KV norms are self_attn.norm.weight, self_attn.compressor.norm.weight "
    "and self_attn.compressor.indexer.norm.weight",
    _IDENT(_LOGICAL_TOP), "model.layers.",
    {**{k: v for k, v in _IDENT(_LOGICAL_LAYER).items() if v not in _RESAVED_NORMS.values()},
     **_RESAVED_NORMS},
    "mtp.", _IDENT(_MTP_LOGICAL), per_expert=False)
TRANSFORMERS_SAVED = NameScheme(
    "transformers-saved",
    "transformers 5.x save_pretrained of a freshly built model (or of one loaded from the release "
    "or from this scheme): the release's per-layer names under model.layers.{i}. "
    "(attn.wq_a.weight, ffn.experts.{e}.w1.weight, hc_attn_fn, ...; but the attention's KV "
    "norm is attn.norm.weight), "
    "head.weight, model.embed_tokens.weight, model.norm.weight, model.hc_head.hc_fn",
    {"model.embed_tokens.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
     "model.norm.weight": "model.norm.weight", "model.hc_head.hc_fn": "model.hc_head.hc_fn",
     "model.hc_head.hc_base": "model.hc_head.hc_base",
     "model.hc_head.hc_scale": "model.hc_head.hc_scale"},
    "model.layers.",
    {**{k: v for k, v in _LAYER_RENAMES.items() if k != "attn.kv_norm.weight"},
     "attn.norm.weight": "self_attn.kv_norm.weight"},     # not the release's attn.kv_norm
    None, {}, per_expert=True)
OFFICIAL = NameScheme(
    "official",
    "the DeepSeek release's names (inference/model.py): embed.weight, head.weight, norm.weight, "
    "hc_head_fn, layers.{i}.attn.wq_a.weight, layers.{i}.ffn.experts.{e}.w1.weight, mtp.{j}.*",
    dict(_TOP_RENAMES), "layers.", dict(_LAYER_RENAMES), "mtp.", dict(_MTP_RENAMES),
    per_expert=True)
SCHEMES = (TRANSFORMERS, TRANSFORMERS_RESAVED, TRANSFORMERS_SAVED, OFFICIAL)
SCHEMES_BY_NAME = {s.name: s for s in SCHEMES}


@dataclasses.dataclass(frozen=True)
class Detection:
    scheme: NameScheme
    unmatched: tuple[str, ...]     # names of no scheme at all (unknown tensors, reported later)


class SchemeError(MappingError):
    """The tensor names fit no single naming scheme (unknown or mixed)."""


def detect_scheme(names) -> Detection:
    """The naming scheme of a checkpoint from its (non-scale) tensor names.

    The scheme that explains the most names wins. Names it does not explain are an error when
    another scheme explains them (a mixed checkpoint), and are returned as `unmatched` (unknown
    tensors, which validation reports) when no scheme does. A checkpoint whose names mostly fit
    no scheme is an error. Both errors list the first unmatched tensors of every scheme tried.
    """
    names = sorted(names)
    fits = {s.name: {n for n in names if s.to_logical(n) is not None} for s in SCHEMES}
    best = max(SCHEMES, key=lambda s: len(fits[s.name]))     # ties: the first in SCHEMES

    def tried():
        parts = []
        for s in SCHEMES:
            miss = [n for n in names if n not in fits[s.name]]
            parts.append(f"{s.name}: {len(miss)} of {len(names)} unmatched, first {miss[:5]}")
        return "; ".join(parts)

    if not names or 2 * len(fits[best.name]) <= len(names):
        raise SchemeError(f"the tensor names fit no known naming scheme (schemes tried: "
                          f"{tried()})")
    rest = [n for n in names if n not in fits[best.name]]
    foreign = [n for n in rest if any(n in f for f in fits.values())]
    if foreign:
        other = sorted({s.name for s in SCHEMES if foreign[0] in fits[s.name]})
        raise SchemeError(f"the checkpoint mixes naming schemes: {len(fits[best.name])} tensors "
                          f"are {best.name!r} names but {len(foreign)} are not, e.g. "
                          f"{foreign[:5]} ({foreign[0]!r} is a {other} name); schemes tried: "
                          f"{tried()}")
    return Detection(best, tuple(rest))



_INV_LAYER = {v: k for k, v in _LAYER_RENAMES.items()}
_INV_MTP = {v: k for k, v in _MTP_RENAMES.items()}
_INV_TOP = {v: k for k, v in _TOP_RENAMES.items()}


def logical_to_official(name: str) -> str:
    """Inverse of `official_to_logical` for non-expert tensors."""
    if name in _INV_TOP:
        return _INV_TOP[name]
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _INV_LAYER:
        return f"layers.{m.group(1)}.{_INV_LAYER[m.group(2)]}"
    m = re.match(r"^mtp\.(\d+)\.(.+)$", name)
    if m:
        rest = m.group(2)
        if rest in _INV_LAYER:
            return f"mtp.{m.group(1)}.{_INV_LAYER[rest]}"
        if rest in _INV_MTP:
            return f"mtp.{m.group(1)}.{_INV_MTP[rest]}"
    raise MappingError(f"tensor {name!r} has no official-checkpoint name")


def official_expert_names(logical: str, num_experts: int) -> list[tuple[int, str, str]]:
    """Fused logical expert tensor -> [(expert, part, official name)] in expert order."""
    m = re.match(r"^(model\.layers\.(\d+)|mtp\.(\d+))\.mlp\.experts\.(gate_up_proj|down_proj)$",
                 logical)
    if not m:
        raise MappingError(f"{logical!r} is not a fused expert tensor")
    pre = f"layers.{m.group(2)}" if m.group(2) is not None else f"mtp.{m.group(3)}"
    parts = ("w2",) if m.group(4) == "down_proj" else ("w1", "w3")
    return [(e, p, f"{pre}.ffn.experts.{e}.{p}.weight") for e in range(num_experts) for p in parts]
