"""Per-layer internals of a forward pass: routing, indexer scores and selections, attention mass.

`collect(model, tokens)` runs the model's own forward with `record=True`: every layer's
attention and router return what they computed on the way (`ModelOutput.recorded`), so the
logits are those of `model(tokens)` and nothing is re-implemented here. `topk=` is the model
call's own override of every CSA layer's k, which is how the notebooks measure quality as k
shrinks; `bits_vs_topk` uses the model's `topk_limit` to serve every k from one compile.

Shapes in the result (numpy, one row of the batch = B):
  routing     affinities [B, S, E], experts [B, S, k], weights [B, S, k], bias [E] (score routing)
  attention   window / compressed / sink mass [B, S, H] (the three parts of the softmax)
  compressed  (CSA, HCA) visible [B, S, N], dense_mass [B, S, N]: the attention mass per entry
              when every visible entry is attended (the indexer's KL target before normalising)
  indexer     (CSA) scores [B, S, N], head_scores [B, S, Hi, N], topk [B, S, K]
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.analysis import attention_mass, routing
from sparse_lm.train.checkpoint import Checkpointer
from sparse_lm.train.loop import load_for_eval


@dataclasses.dataclass
class LayerInternals:
    index: int                      # layer index; num_layers for the MTP block
    name: str                       # "layer{i}_{kind}" / "mtp" (the training log's row names)
    kind: str                       # "swa" | "csa" | "hca"
    routing: str                    # "hash" | "score"
    ratio: int                      # compression ratio (0 for SWA-only)
    arrays: dict                    # name -> numpy array (see the module doc)

    def __getitem__(self, key):
        return self.arrays[key]

    def get(self, key, default=None):
        return self.arrays.get(key, default)


@dataclasses.dataclass
class Internals:
    tokens: np.ndarray              # [B, S]
    segment_ids: np.ndarray | None
    logits: np.ndarray              # [B, S, V] of the main model
    layers: list[LayerInternals]
    topk: int                       # the k the CSA layers used
    sparse: bool

    def layer(self, name_or_index) -> LayerInternals:
        for l in self.layers:
            if l.name == name_or_index or l.index == name_or_index:
                return l
        raise KeyError(f"no layer {name_or_index!r}; layers: {[l.name for l in self.layers]}")

    def of_kind(self, kind: str) -> list[LayerInternals]:
        return [l for l in self.layers if l.kind == kind]


# ---------------------------------------------------------------------------- walking the layers
def layer_names(cfg) -> list[str]:
    return [f"layer{s.index}_{s.kind}" for s in cfg.layers] + (["mtp"] if cfg.mtp_depth else [])


def router_biases(model) -> dict[str, np.ndarray]:
    """{layer name: bias [E]} of every score-routed MoE (main layers and the MTP block)."""
    out = {}
    for spec, blk in zip(model.cfg.layers, model.layer_blocks()):
        if spec.routing == "score":
            out[f"layer{spec.index}_{spec.kind}"] = np.asarray(blk.moe.bias[...])
    if model.mtp is not None:
        out["mtp"] = np.asarray(model.mtp.block.moe.bias[...])
    return out


# ---------------------------------------------------------------------------- the whole model
def collect(model, tokens, segment_ids=None, *, sparse: bool = True, topk: int | None = None,
            implementation: str | None = None, mtp: bool = True) -> Internals:
    """Run `model` on tokens [B, S] (int) and return every layer's internals (see module doc).

    sparse=False: CSA layers attend every visible entry (the warm-up stage). topk: the k of every
    CSA layer's indexer (default: the model's `index_topk`). mtp: include the MTP block's layer
    (its routing and window attention) as the last row. The forward is jitted once per
    (shape, sparse, topk).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, S], got shape {tokens.shape}")
    if topk is not None and int(topk) < 1:
        raise ValueError(f"topk={topk} is invalid: must be >= 1")
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    topk = None if topk is None else int(topk)
    key = (graphdef, bool(sparse), topk, implementation)
    fn = _JITTED.get(key)
    if fn is None:
        @jax.jit
        def fn(state, tokens, segment_ids):
            out = nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, sparse=sparse,
                                             topk=topk, implementation=implementation,
                                             return_aux=True, record=True)
            return out.logits, out.recorded
        _JITTED[key] = fn
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    logits, per_layer = jax.device_get(fn(state, tokens, seg))
    specs = list(cfg.layers)
    if not mtp:
        per_layer = per_layer[:len(specs)]
    layers = []
    for i, arrays in enumerate(per_layer):
        if i < len(specs):
            sp = specs[i]
            idx, name, kind, routing_ = sp.index, f"layer{sp.index}_{sp.kind}", sp.kind, sp.routing
        else:
            idx, name, kind, routing_ = cfg.num_layers, "mtp", "swa", "score"
        layers.append(LayerInternals(index=idx, name=name, kind=kind, routing=routing_,
                                     ratio=cfg.ratio_of(kind) if kind != "swa" else 0,
                                     arrays={k: np.asarray(v) for k, v in arrays.items()}))
    return Internals(tokens=np.asarray(tokens), segment_ids=None if seg is None else np.asarray(seg),
                     logits=np.asarray(logits), layers=layers,
                     topk=int(cfg.index_topk if topk is None else topk), sparse=bool(sparse))


_JITTED: dict[Any, Any] = {}


def bits_vs_topk(model, tokens, segment_ids=None, ks=(1, 2, 4, 8), *,
                 implementation: str | None = None) -> dict[int, float]:
    """Next-token bits per token of the main model when every CSA layer keeps only its k
    best-scored entries, for each k in `ks` (one compiled forward: the top-max(ks) picks are
    truncated to k inside it, the model call's `topk_limit`). k = 0 leaves the CSA layers
    window-only (+ sink)."""
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 0:
        raise ValueError(f"ks={ks} is invalid: need one or more k >= 0")
    tokens = jnp.asarray(tokens, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    kmax = max(max(ks), 1)

    @jax.jit
    def fn(state, tokens, seg, limit):
        return nnx.merge(graphdef, state)(tokens, segment_ids=seg, sparse=True, topk=kmax,
                                          topk_limit=limit, implementation=implementation)
    return {k: next_token_bits(np.asarray(fn(state, tokens, seg, jnp.int32(k))), np.asarray(tokens),
                               None if seg is None else np.asarray(seg)) for k in ks}


# ---------------------------------------------------------------------------- summaries
def next_token_bits(logits, tokens, segment_ids=None) -> float:
    """Mean next-token cross-entropy in bits per token of logits [B, S, V] on tokens [B, S]
    (pairs that cross a document boundary, or padding with segment id 0, do not count)."""
    logits = np.asarray(logits, np.float64)
    tokens = np.asarray(tokens)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    logp = np.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0] - lse[:, :-1]
    mask = np.ones(logp.shape, bool)
    if segment_ids is not None:
        seg = np.asarray(segment_ids)
        mask = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
    return float(-logp[mask].mean() / np.log(2.0))


def routing_counts(internals: Internals) -> np.ndarray:
    """[L(+1), E] expert assignments per layer of the collected batch (padding excluded)."""
    e = internals.layers[0]["affinities"].shape[-1]
    mask = None if internals.segment_ids is None else internals.segment_ids > 0
    return np.stack([routing.expert_counts(l["experts"], e, mask) for l in internals.layers])


def mass_rows(internals: Internals) -> list[dict]:
    """Per layer: mean window / compressed / sink mass over real queries and heads."""
    mask = None if internals.segment_ids is None else internals.segment_ids > 0
    rows = []
    for l in internals.layers:
        split = {k: l[f"{k}_mass"] for k in attention_mass.PARTS}
        m = attention_mass.mean_split(split, mask)
        rows.append({"layer": l.name, "kind": l.kind, **m})
    return rows


def bias_trajectory(config, workdir, steps=None) -> tuple[list[int], dict[str, np.ndarray]]:
    """Router biases of every score-routed layer at every checkpoint of a training run.

    Returns (steps, {layer name: [len(steps), E]}). Restores each checkpoint with the training
    package's `load_for_eval`; only the checkpoints the run kept are available.
    """
    if steps is None:
        ck = Checkpointer(workdir, keep=1000, async_save=False)
        steps = sorted(ck.all_steps())
        ck.close()
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {workdir}")
    rows = []
    for s in steps:
        _, model, _ = load_for_eval(config, workdir, s)
        rows.append(router_biases(model))
    return list(steps), {k: np.stack([r[k] for r in rows]) for k in rows[0]}
