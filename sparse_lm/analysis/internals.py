"""Per-layer internals of a forward pass: routing, indexer scores and selections, attention mass.

`collect(model, tokens)` runs the model layer by layer through its own modules' pieces
(`Attention.project_queries / project_kv / compressor / indexer / project_output`,
`Block.attention_residual`, the MoE router functions of `sparse_lm.ops.moe`) and the functional
core (`sparse_attention`, `compressed_attention_mass`), and returns, for every layer, what the
forward computed on the way: nothing in `sparse_lm.model` is changed or patched. Its logits equal
`model(tokens)` (tested), and `topk=` replaces the indexer's k in every CSA layer, which is how the
notebooks measure quality as k shrinks.

Shapes in the result (numpy, one row of the batch = B):
  routing     affinities [B, S, E], experts [B, S, k], weights [B, S, k], bias [E] or None
  attention   window / compressed / sink mass [B, S, H] (the three parts of the softmax)
  compressed  (CSA, HCA) visible [B, S, N], dense_mass [B, S, N]: the attention mass per entry
              when every visible entry is attended (the indexer's KL target before normalising)
  indexer     (CSA) scores [B, S, N], head_scores [B, S, Hi, N], topk [B, S, K]
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.analysis import attention_mass, indexer_stats
from sparse_lm.ops import mhc
from sparse_lm.ops import moe as moe_ops
from sparse_lm.ops.attention import sparse_attention
from sparse_lm.ops.compress import entry_visibility
from sparse_lm.ops.indexer import compressed_attention_mass, select_topk


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
def iter_blocks(model) -> Iterator:
    """The model's main blocks in layer order (cycles unstacked: each repeat is merged from its
    slice of the stacked parameters)."""
    for blk in model.head_layers:
        yield blk
    if model.cycles is not None:
        graphdef, state = nnx.split(model.cycles)
        n = model.cfg.layer_groups.num_cycles
        for r in range(n):
            cycle = nnx.merge(graphdef, jax.tree.map(lambda a: a[r], state))
            for blk in cycle.blocks:
                yield blk
    for blk in model.tail_layers:
        yield blk


def layer_names(cfg) -> list[str]:
    return [f"layer{s.index}_{s.kind}" for s in cfg.layers] + (["mtp"] if cfg.mtp_depth else [])


def router_biases(model) -> dict[str, np.ndarray]:
    """{layer name: bias [E]} of every score-routed MoE (main layers and the MTP block)."""
    out = {}
    for spec, blk in zip(model.cfg.layers, iter_blocks(model)):
        if spec.routing == "score":
            out[f"layer{spec.index}_{spec.kind}"] = np.asarray(blk.moe.bias[...])
    if model.mtp is not None:
        out["mtp"] = np.asarray(model.mtp.block.moe.bias[...])
    return out


# ---------------------------------------------------------------------------- one layer
def _attention(attn, x, positions, segment_ids, *, sparse, topk, implementation, limit=None):
    """The attention sublayer of `Attention.__call__`, keeping what it computes.
    x [B, S, d] (normed) -> (out [B, S, d], arrays). limit (traced int or None): keep only the
    first `limit` of the top-k picks (they come best first), so one compiled forward serves
    every k <= topk."""
    cfg = attn.cfg
    s = x.shape[1]
    impl = implementation or cfg.attention_impl
    q, q_latent = attn.project_queries(x, positions)
    kv = attn.project_kv(x, positions)
    arrays = {}
    entries = valid = sel = visible = None
    if attn.compressor is not None:
        entries, valid = attn.compressor(x, positions, attn.inv_freq, segment_ids)
        visible = entry_visibility(s, attn.ratio, valid, segment_ids)
        arrays["visible"] = visible
        if attn.indexer is not None:
            ix = attn.indexer
            iq, iw = ix.project_queries(x, q_latent, positions, attn.inv_freq)
            keys, kvalid = ix.compressor(x, positions, attn.inv_freq, segment_ids)
            ivis = entry_visibility(s, ix.ratio, kvalid, segment_ids)
            hs = indexer_stats.head_scores(iq, iw, keys, ivis)
            scores = jnp.where(ivis, jnp.sum(hs, axis=2), -jnp.inf)
            sel = select_topk(scores, ix.topk if topk is None else topk)
            if limit is not None:
                sel = jnp.where(jnp.arange(sel.shape[-1]) < limit, sel, -1)
            arrays.update(scores=scores, head_scores=hs, topk=sel)
    use_sel = sel if (sparse and sel is not None) else None
    o, lse = sparse_attention(q, kv, attn.sink[...], window=cfg.sliding_window,
                              scale=attn.softmax_scale, segment_ids=segment_ids,
                              compressed=entries, compressed_valid=valid, ratio=attn.ratio,
                              topk_idx=use_sel, implementation=impl, return_lse=True)
    attended = None
    if entries is not None and entries.shape[1] > 0:
        if use_sel is not None and use_sel.shape[-1] > 0:
            attended = jnp.sum(jax.nn.one_hot(use_sel, entries.shape[1], dtype=jnp.float32), -2)
        elif use_sel is None:
            attended = visible
    split = attention_mass.mass_split(q, kv, attn.sink[...], lse, window=cfg.sliding_window,
                                      scale=attn.softmax_scale, segment_ids=segment_ids,
                                      entries=entries if attended is not None else None,
                                      attended=attended)
    arrays.update({f"{k}_mass": v for k, v in split.items()})
    if entries is not None and entries.shape[1] > 0:
        if use_sel is not None:     # the dense softmax's lse: every visible entry attended
            _, dense_lse = sparse_attention(q, kv, attn.sink[...], window=cfg.sliding_window,
                                            scale=attn.softmax_scale, segment_ids=segment_ids,
                                            compressed=entries, compressed_valid=valid,
                                            ratio=attn.ratio, topk_idx=None,
                                            implementation=impl, return_lse=True)
        else:
            dense_lse = lse
        arrays["dense_mass"] = compressed_attention_mass(q, entries, dense_lse, visible,
                                                         attn.softmax_scale)
    return attn.project_output(o, positions), arrays


def _block(blk, x, token_ids, positions, segment_ids, *, sparse, topk, implementation,
           limit=None):
    """`Block.__call__` keeping the attention and routing internals."""
    x, arrays = blk.attention_residual(
        x, lambda h: _attention(blk.attn, h, positions, segment_ids, sparse=sparse, topk=topk,
                                implementation=implementation, limit=limit))
    # The MoE sublayer as in Block.ffn_residual, with the router's choice recorded.
    pre, post, comb = blk.ffn_hc.weights(x)
    u = blk.ffn_norm(mhc.hc_collapse(x, pre))
    f, _ = blk.moe(u, token_ids)
    moe = blk.moe
    b, s, d = u.shape
    aff = moe_ops.affinities(u.reshape(b * s, d), moe.gate[...])
    if moe.routing == "score":
        idx = moe_ops.select_by_score(aff, moe.bias[...], moe.cfg.num_experts_per_tok)
        arrays["bias"] = moe.bias[...]
    else:
        idx = moe_ops.select_by_hash(token_ids.reshape(-1), moe.tid2eid[...])
    w = moe_ops.combine_weights(aff, idx, moe.cfg.routed_scaling_factor)
    arrays.update(affinities=aff.reshape(b, s, -1), experts=idx.reshape(b, s, -1),
                  weights=w.reshape(b, s, -1))
    return mhc.hc_expand(f, x, post, comb), arrays


# ---------------------------------------------------------------------------- the whole model
def _forward(model, tokens, segment_ids, *, sparse, topk, implementation, mtp, limit=None):
    cfg = model.cfg
    b, s = tokens.shape
    if segment_ids is not None:
        from sparse_lm.model.transformer import segment_positions
        positions = segment_positions(segment_ids)
    else:
        positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    kw = dict(sparse=sparse, topk=topk, implementation=implementation, limit=limit)
    x = model.embed_streams(tokens)
    per_layer = []
    for blk in iter_blocks(model):
        x, arrays = _block(blk, x, tokens, positions, segment_ids, **kw)
        per_layer.append(arrays)
    logits = model.final_logits(x)
    if mtp and model.mtp is not None:
        m = model.mtp
        dt = x.dtype
        next_ids = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
        next_embed = jnp.take(model.embed[...], next_ids, axis=0).astype(dt)
        xm = (m.enorm(next_embed) @ m.w_e[...].astype(dt))[:, :, None, :] + m.hnorm(x) @ m.w_h[...].astype(dt)
        _, arrays = _block(m.block, xm, next_ids, positions, segment_ids, **kw)
        per_layer.append(arrays)
    return logits, per_layer


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
    key = (graphdef, bool(sparse), topk, implementation, bool(mtp))
    fn = _JITTED.get(key)
    if fn is None:
        @jax.jit
        def fn(state, tokens, segment_ids):
            return _forward(nnx.merge(graphdef, state), tokens, segment_ids, sparse=sparse,
                            topk=topk, implementation=implementation, mtp=mtp)
        _JITTED[key] = fn
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    logits, per_layer = jax.device_get(fn(state, tokens, seg))
    specs = list(cfg.layers)
    layers = []
    for i, arrays in enumerate(per_layer):
        if i < len(specs):
            sp = specs[i]
            idx, name, kind, routing = sp.index, f"layer{sp.index}_{sp.kind}", sp.kind, sp.routing
        else:
            idx, name, kind, routing = cfg.num_layers, "mtp", "swa", "score"
        layers.append(LayerInternals(index=idx, name=name, kind=kind, routing=routing,
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
    truncated to k inside it). k = 0 leaves the CSA layers window-only (+ sink)."""
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 0:
        raise ValueError(f"ks={ks} is invalid: need one or more k >= 0")
    tokens = jnp.asarray(tokens, jnp.int32)
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    graphdef, state = nnx.split(model)
    kmax = max(max(ks), 1)

    @jax.jit
    def fn(state, tokens, seg, limit):
        logits, _ = _forward(nnx.merge(graphdef, state), tokens, seg, sparse=True, topk=kmax,
                             implementation=implementation, mtp=False, limit=limit)
        return logits
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
    from sparse_lm.analysis import routing
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
    from sparse_lm.train.checkpoint import Checkpointer
    from sparse_lm.train.loop import load_for_eval
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
