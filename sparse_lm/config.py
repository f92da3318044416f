"""Model configuration: a frozen, validated dataclass resolved from an `ml_collections` dict.

Config files in `configs/` build a `ConfigDict` whose `model` field holds the raw values; the model
only ever sees the resolved `ModelConfig`. The layer schedule is stored as a pattern (prefix,
repeating cycle, tail) so `--config.model.num_layers=N` just works; `compress_ratios` (length L+1,
last entry = the MTP layer) is derived from it, in the format of the published `config.json`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from kernels_pallas import registry

LAYER_KINDS = ("swa", "csa", "hca")
# Implementation names: the one vocabulary of `kernels_pallas.registry` (None = the target
# platform's preference, decided when the op is traced). Old names, e.g. in the config.json of
# a checkpoint, are read as aliases with a one-line deprecation note.
ATTENTION_IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu")
ATTENTION_ALIASES = {"pallas": registry.pallas_for}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
MOE_IMPLEMENTATIONS = ("reference", "xla", "pallas_tpu", "pallas_gpu", "tokamax")
# "grouped" was the grouped-matmul registry's platform choice: now the target's preference.
MOE_ALIASES = {"ragged_dot": "reference", "blocked": "xla", "grouped": None,
               "pallas": registry.pallas_for}
MOE_DISPATCHES = ("local", "a2a_padded", "ragged_a2a")
# Ablation options (issue 23): token selectors of CSA layers and MoE routers of score layers.
SELECTORS = ("lightning", "dense", "fixed", "dsa_tokens", "mlp_router")
SELECTOR_ESTIMATORS = ("ste", "gumbel")
MOE_ROUTERS = ("v4", "capacity", "top2_softmax")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"model.{field}={value!r} is invalid: {allowed}")


_noted: set[tuple[str, str]] = set()


def _canonical_impl(field: str, value: Any, aliases: Mapping[str, Any]) -> Any:
    """An old implementation name -> its vocabulary name ("pallas" -> the Pallas kernel of the
    current target platform), with one deprecation note per (field, old name)."""
    if not isinstance(value, str) or value not in aliases:
        return value
    new = aliases[value]
    new = new(registry.current_platform()) if callable(new) else new
    if (field, value) not in _noted:
        _noted.add((field, value))
        logging.getLogger(__name__).warning(
            "model.%s=%r is a deprecated name; read as %r", field, value, new)
    return new


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One transformer layer: its attention kind and how its MoE routes."""
    index: int
    kind: str          # "swa" | "csa" | "hca"
    routing: str       # "hash" | "score"


@dataclasses.dataclass(frozen=True)
class LayerGroups:
    """How the L layers execute: unrolled head, a scan over `num_cycles` repeats of the cycle, tail.

    Compile time grows with the number of distinct layers in `head + cycle + tail`, not with L.
    """
    head: tuple[LayerSpec, ...]
    cycle: tuple[LayerSpec, ...]       # specs of the first repeat; repeat r adds r*len(cycle)
    num_cycles: int
    tail: tuple[LayerSpec, ...]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architectural hyper-parameter of a DeepSeek-V4-style model (spec §2.1)."""
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_layers: int = 43
    num_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # Layer schedule as a pattern; kinds are "swa" (window only), "csa", "hca".
    layer_prefix: tuple[str, ...] = ("swa", "swa")
    layer_cycle: tuple[str, ...] = ("csa", "hca")
    layer_tail: tuple[str, ...] = ("csa",)
    compress_ratio_csa: int = 4
    compress_ratio_hca: int = 128
    # Lightning indexer (CSA layers).
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # DeepSeekMoE.
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    # Routed-expert matmuls (`sparse_lm.ops.moe.EXPERTS`): "reference" (lax.ragged_dot), "xla"
    # (padded row blocks; the faster one on XLA:CPU), or through kernels_pallas.grouped_matmul:
    # "pallas_tpu" / "pallas_gpu" (interpreted on CPU), "tokamax" (optional package); None = the
    # target platform's preference (Pallas on TPU/GPU, "xla" on CPU). Same results. Old names
    # ragged_dot / blocked / grouped / pallas are aliases.
    moe_impl: str | None = "reference"
    # How routed tokens reach their experts: "local" (every device computes the experts it is
    # given; GSPMD moves weights/tokens) or expert parallelism under shard_map over the mesh's
    # `expert` axis (sparse_lm/sharding/expert_parallel.py): "a2a_padded" (capacity-padded
    # all-to-all, runs everywhere) or "ragged_a2a" (lax.ragged_all_to_all, TPU/GPU).
    moe_dispatch: str = "local"
    # Expert-parallel receive buffer in units of the tokens*k rows a device routes; 0 = no drop.
    moe_capacity_factor: float = 0.0
    # mHC.
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    # RoPE: plain theta for SWA-only layers and MTP; compress theta (+YaRN) for CSA/HCA layers.
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    yarn: bool = True
    yarn_factor: float = 16.0
    yarn_original_max_position: int = 65536
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # Multi-token prediction (depth 0 or 1); the MTP block is an SWA-only layer.
    mtp_depth: int = 1
    # Numerics and execution.
    dtype: str = "float32"             # compute dtype of activations and matmuls
    param_dtype: str = "float32"
    attention_impl: str | None = None  # None = the target platform's preference
    remat: str = "none"
    init_std: float = 0.02
    hc_alpha_init: float = 0.1         # spec §3: gating factors start small (value unpublished)
    # Ablation options (issue 23): how CSA layers select what they attend and how score-routed
    # MoE layers route; the defaults are the V4 mechanisms. Checked by `_check_ablation`.
    # Token selector of CSA layers (sparse_lm/model/selectors.py): "lightning" (the indexer over
    # compressed entries), "dense" (every visible entry), "fixed" (local + global + strided
    # entries), "dsa_tokens" (V3.2: indexer top-k over raw tokens outside the window),
    # "mlp_router" (a learned two-layer MLP over (query, entry) pairs).
    selector: str = "lightning"
    selector_estimator: str = "ste"     # mlp_router: "ste" | "gumbel"
    # mlp_router: k = ceil(fraction * visible entries), capped by index_topk (0 = fixed k)
    selector_k_fraction: float = 0.0
    selector_hidden: int = 32           # mlp_router: hidden width of the pair MLP
    # mlp_router gumbel: temperature annealed exponentially from start to end over anneal steps
    # (None = no temperature: the ste estimator has none)
    selector_temperature: tuple[float, float] | None = None
    selector_anneal_steps: int = 1000
    selector_sparsity_weight: float = 0.0   # mlp_router: weight of the mean relaxed mask
    # fixed: the last `local` entries, the first `global` entries, and every entry whose index
    # mod `stride` is < `block` (strided blocks); picks capped by index_topk, newest first
    fixed_local: int = 2
    fixed_global: int = 1
    fixed_stride: int = 8
    fixed_block: int = 1
    # MoE router of score layers (sparse_lm/ops/moe.py ROUTERS): "v4" | "capacity" |
    # "top2_softmax"; capacity: the batch capacity factor's range (f_min, f_max).
    moe_router: str = "v4"
    router_capacity_range: tuple[float, float] = (1.0, 2.0)
    # Longest context (prompt + generated tokens) the model serves; 0 = no limit set. With YaRN
    # it may not exceed the positions YaRN stretches the compressed layers' RoPE to
    # (yarn_factor * yarn_original_max_position: 16 x 64K = 1M for V4). Decoder / generate
    # refuse a longer cache or prompt before any compute (docs/inference.md, long context).
    max_context: int = 0

    # ------------------------------------------------------------------ derived properties
    @property
    def layer_kinds(self) -> tuple[str, ...]:
        body = self.num_layers - len(self.layer_prefix) - len(self.layer_tail)
        reps, rest = divmod(body, len(self.layer_cycle))
        return (tuple(self.layer_prefix) + tuple(self.layer_cycle) * reps
                + tuple(self.layer_cycle[:rest]) + tuple(self.layer_tail))

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return tuple(LayerSpec(i, k, "hash" if i < self.num_hash_layers else "score")
                     for i, k in enumerate(self.layer_kinds))

    @property
    def compress_ratios(self) -> tuple[int, ...]:
        """Per layer, plus one trailing 0 for the MTP layer (the published config.json format)."""
        return tuple(self.ratio_of(k) for k in self.layer_kinds) + (0,)

    def ratio_of(self, kind: str) -> int:
        return {"swa": 0, "csa": self.compress_ratio_csa, "hca": self.compress_ratio_hca}[kind]

    @property
    def layer_groups(self) -> LayerGroups:
        """Split the schedule into an unrolled head, a scanned cycle and an unrolled tail.

        The scan starts at the first cycle boundary at or after both the prefix and the hash
        layers (hash layers carry a token->expert table instead of a bias, so they differ).
        """
        layers = self.layers
        p = len(self.layer_cycle)
        start = len(self.layer_prefix)
        while start < self.num_hash_layers:
            start += p
        end_of_cycles = self.num_layers - len(self.layer_tail)
        n = max(0, (end_of_cycles - start) // p)
        if n < 2:  # nothing worth scanning: unroll everything
            return LayerGroups(head=layers, cycle=(), num_cycles=0, tail=())
        stop = start + n * p
        return LayerGroups(head=layers[:start], cycle=layers[start:start + p], num_cycles=n,
                           tail=layers[stop:])

    @property
    def yarn_reach(self) -> int:
        """Positions the YaRN-stretched RoPE covers: yarn_factor * yarn_original_max_position."""
        return int(self.yarn_factor * self.yarn_original_max_position)

    @property
    def rope_dims_indexer(self) -> int:
        return self.rope_head_dim

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        object.__setattr__(self, "attention_impl", _canonical_impl(
            "attention_impl", self.attention_impl, ATTENTION_ALIASES))
        object.__setattr__(self, "moe_impl", _canonical_impl(
            "moe_impl", self.moe_impl, MOE_ALIASES))
        for name in ("layer_prefix", "layer_cycle", "layer_tail"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim",
                    "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
                    "index_n_heads", "index_head_dim", "n_routed_experts",
                    "num_experts_per_tok", "moe_intermediate_size", "hc_mult",
                    "hc_sinkhorn_iters")
        for f in positive:
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                _fail(f, v, "must be an integer >= 1")
        if self.index_topk < 1:
            _fail("index_topk", self.index_topk, "must be >= 1")
        for name in ("layer_prefix", "layer_cycle", "layer_tail"):
            for k in getattr(self, name):
                if k not in LAYER_KINDS:
                    _fail(name, getattr(self, name), f"layer kinds must be one of {LAYER_KINDS}")
        if not self.layer_cycle:
            _fail("layer_cycle", self.layer_cycle, "must name at least one layer kind")
        fixed = len(self.layer_prefix) + len(self.layer_tail)
        if self.num_layers < fixed:
            _fail("num_layers", self.num_layers,
                  f"must be >= len(layer_prefix) + len(layer_tail) = {fixed}")
        if self.num_heads % self.o_groups:
            _fail("o_groups", self.o_groups, f"must divide num_heads={self.num_heads}")
        if self.rope_head_dim % 2 or self.rope_head_dim > self.head_dim:
            _fail("rope_head_dim", self.rope_head_dim,
                  f"must be even and <= head_dim={self.head_dim}")
        if self.rope_head_dim > self.index_head_dim:
            _fail("rope_head_dim", self.rope_head_dim,
                  f"must be <= index_head_dim={self.index_head_dim} (the indexer ropes it too)")
        for f in ("compress_ratio_csa", "compress_ratio_hca"):
            if getattr(self, f) < 2:
                _fail(f, getattr(self, f), "must be an integer >= 2")
        if self.num_experts_per_tok > self.n_routed_experts:
            _fail("num_experts_per_tok", self.num_experts_per_tok,
                  f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.n_shared_experts not in (0, 1):
            _fail("n_shared_experts", self.n_shared_experts, "allowed values: 0, 1")
        if not 0 <= self.num_hash_layers <= self.num_layers:
            _fail("num_hash_layers", self.num_hash_layers, f"must be in [0, {self.num_layers}]")
        if self.mtp_depth not in (0, 1):
            _fail("mtp_depth", self.mtp_depth, "allowed values: 0, 1")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"allowed values: {DTYPES}")
        if self.param_dtype not in DTYPES:
            _fail("param_dtype", self.param_dtype, f"allowed values: {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLEMENTATIONS + (None,):
            _fail("attention_impl", self.attention_impl,
                  f"allowed values: {ATTENTION_IMPLEMENTATIONS + (None,)}")
        if self.moe_impl not in MOE_IMPLEMENTATIONS + (None,):
            _fail("moe_impl", self.moe_impl, f"allowed values: {MOE_IMPLEMENTATIONS + (None,)}")
        if self.moe_dispatch not in MOE_DISPATCHES:
            _fail("moe_dispatch", self.moe_dispatch, f"allowed values: {MOE_DISPATCHES}")
        if not self.moe_capacity_factor >= 0:
            _fail("moe_capacity_factor", self.moe_capacity_factor, "must be >= 0 (0 = no drop)")
        if self.remat not in REMAT_POLICIES:
            _fail("remat", self.remat, f"allowed values: {REMAT_POLICIES}")
        if self.yarn and (self.yarn_factor <= 0 or self.yarn_original_max_position < 1):
            _fail("yarn_factor", self.yarn_factor, "YaRN needs factor > 0 and an original length >= 1")
        if not isinstance(self.max_context, int) or isinstance(self.max_context, bool) or \
                self.max_context < 0:
            _fail("max_context", self.max_context, "must be an integer >= 0 (0 = no limit)")
        if self.yarn and self.max_context > self.yarn_reach:
            _fail("max_context", self.max_context,
                  f"exceeds the positions YaRN reaches: yarn_factor * yarn_original_max_position "
                  f"= {self.yarn_reach}; raise yarn_factor or yarn_original_max_position")
        self._check_ablation()

    def _check_ablation(self):
        """The selector and router fields: names, ranges and combinations that make sense."""
        for name in ("selector_temperature", "router_capacity_range"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.selector not in SELECTORS:
            _fail("selector", self.selector, f"allowed values: {SELECTORS}")
        if self.selector_estimator not in SELECTOR_ESTIMATORS:
            _fail("selector_estimator", self.selector_estimator,
                  f"allowed values: {SELECTOR_ESTIMATORS}")
        if not 0.0 <= self.selector_k_fraction <= 1.0:
            _fail("selector_k_fraction", self.selector_k_fraction, "must be in [0, 1] (0 = fixed k)")
        if self.selector_k_fraction and self.selector != "mlp_router":
            _fail("selector_k_fraction", self.selector_k_fraction,
                  f"adaptive k is an option of selector='mlp_router' only (selector="
                  f"{self.selector!r}); use 0 with the selectors {SELECTORS}")
        t = self.selector_temperature
        if t is not None:
            if self.selector != "mlp_router" or self.selector_estimator != "gumbel":
                _fail("selector_temperature", t,
                      "a temperature belongs to selector='mlp_router' with selector_estimator="
                      f"'gumbel' only (here selector={self.selector!r}, selector_estimator="
                      f"{self.selector_estimator!r}); use None, or estimator one of "
                      f"{SELECTOR_ESTIMATORS}")
            if len(t) != 2 or not all(v > 0 for v in t):
                _fail("selector_temperature", t, "must be (start, end), both > 0")
        if self.selector_anneal_steps < 1:
            _fail("selector_anneal_steps", self.selector_anneal_steps, "must be >= 1")
        if self.selector_hidden < 1:
            _fail("selector_hidden", self.selector_hidden, "must be an integer >= 1")
        if self.selector_sparsity_weight < 0:
            _fail("selector_sparsity_weight", self.selector_sparsity_weight, "must be >= 0")
        if self.selector_sparsity_weight and self.selector != "mlp_router":
            _fail("selector_sparsity_weight", self.selector_sparsity_weight,
                  f"the sparsity regulariser is an option of selector='mlp_router' only "
                  f"(selector={self.selector!r})")
        for f in ("fixed_local", "fixed_global", "fixed_block"):
            if getattr(self, f) < 0:
                _fail(f, getattr(self, f), "must be an integer >= 0")
        if self.fixed_stride < 1 or self.fixed_block > self.fixed_stride:
            _fail("fixed_stride", self.fixed_stride,
                  f"must be >= 1 and >= fixed_block={self.fixed_block}")
        if self.moe_router not in MOE_ROUTERS:
            _fail("moe_router", self.moe_router, f"allowed values: {MOE_ROUTERS}")
        if self.moe_router == "top2_softmax" and self.num_experts_per_tok != 2:
            _fail("num_experts_per_tok", self.num_experts_per_tok,
                  "moe_router='top2_softmax' routes every token to 2 experts: must be 2")
        lo_hi = self.router_capacity_range
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            _fail("router_capacity_range", lo_hi, "must be (f_min, f_max) with 0 < f_min <= f_max")
        if self.moe_router != "v4" and self.moe_dispatch != "local":
            _fail("moe_router", self.moe_router,
                  f"expert-parallel dispatch ({self.moe_dispatch!r}) serves the 'v4' router "
                  "only; use moe_dispatch='local' with the routers " f"{MOE_ROUTERS}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Build from a mapping (e.g. `ConfigDict.model`); unknown keys are errors."""
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        if "compress_ratios" in d:
            raise ConfigError("model.compress_ratios is derived from layer_prefix/layer_cycle/"
                              "layer_tail; set those instead")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def schedule_from_ratios(ratios, ratio_csa: int = 4, ratio_hca: int = 128):
    """(prefix, cycle, tail) pattern reproducing a per-layer `compress_ratios` list (without MTP).

    Used when importing a Hugging Face config: finds the 2-periodic (or 1-periodic) body.
    """
    to_kind = {0: "swa", ratio_csa: "csa", ratio_hca: "hca"}
    kinds = []
    for i, r in enumerate(ratios):
        if r not in to_kind:
            raise ConfigError(f"compress_ratios[{i}]={r} is invalid: allowed values {sorted(to_kind)}")
        kinds.append(to_kind[r])
    best = None
    for p in (1, 2, 3, 4):
        for pre in range(0, len(kinds)):
            cyc = kinds[pre:pre + p]
            if len(cyc) < p:
                break
            j = pre
            while j + p <= len(kinds) and kinds[j:j + p] == cyc:
                j += p
            cand = (tuple(kinds[:pre]), tuple(cyc), tuple(kinds[j:]))
            cost = len(cand[0]) + len(cand[2]) + p
            if best is None or cost < best[0]:
                best = (cost, cand)
    return best[1]
