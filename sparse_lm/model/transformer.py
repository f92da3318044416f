"""The DeepSeek-V4 model: embedding -> 4 mHC streams -> L blocks -> hc_head -> norm -> head, + MTP.

Layers run in groups (config `layer_groups`): an unrolled head (prefix and hash-routed layers), a
`lax.scan` over stacked parameters of the repeating cycle, an unrolled tail, then the MTP block.
Compile time therefore grows with the number of distinct layers, not with L.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.block import Block
from sparse_lm.model.layers import RMSNorm, dtype_of, param
from sparse_lm.model.mhc import HcHead
from sparse_lm.sharding.constraints import constrain, constrain_slice, stacked_slice_names

REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass
class ModelOutput:
    """Per-layer arrays have one row per layer in order, plus one for the MTP block.

    logits [B, S, V]; mtp_logits [B, S, V] or None (position i predicts token i+2);
    expert_counts [L(+1), E]; balance_loss [L(+1)] (0 for hash layers);
    indexer_kl, indexer_recall [L(+1)] (0 for non-CSA layers).
    With logits=False the two logits are None and hidden / mtp_hidden [B, S, d] (the inputs of
    the output head) and head [d, V] are set instead, for a loss that never holds [B, S, V].
    recorded (model call with record=True): one dict per layer in order, then the MTP block's,
    of what its attention and router computed (`Attention._record`, `MoE`; read by
    `sparse_lm.analysis.internals`); None otherwise.
    """
    logits: jax.Array | None
    mtp_logits: jax.Array | None
    expert_counts: jax.Array
    balance_loss: jax.Array
    indexer_kl: jax.Array
    indexer_recall: jax.Array
    hidden: jax.Array | None = None
    mtp_hidden: jax.Array | None = None
    head: jax.Array | None = None
    recorded: tuple | None = None


jax.tree_util.register_dataclass(ModelOutput, data_fields=[f.name for f in dataclasses.fields(ModelOutput)],
                                 meta_fields=[])


class Cycle(nnx.Module):
    """One repeat of the layer cycle (e.g. CSA then HCA); stacked and scanned by the model."""

    def __init__(self, cfg: ModelConfig, kinds: tuple[str, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, k, "score", rngs=rngs) for k in kinds])

    def __call__(self, x, token_ids, positions, segment_ids, **static):
        """-> (streams, stats stacked over the cycle's blocks, a tuple of their recordings)."""
        stats, recorded = [], []
        for block in self.blocks:
            x, st, _, rec = block(x, token_ids, positions, segment_ids, **static)
            stats.append(st)
            recorded.append(rec)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *stats), tuple(recorded)


class MTP(nnx.Module):
    """Depth-1 multi-token prediction block (spec §9); shares embedding and head with the model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, "embed")
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, "embed")
        self.w_e = param(rngs, (d, d), ("embed", "embed_out"), cfg.init_std)
        self.w_h = param(rngs, (d, d), ("embed", "embed_out"), cfg.init_std)
        self.block = Block(cfg, "swa", "score", rngs=rngs)
        self.hc_head = HcHead(cfg, rngs=rngs)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, "embed")

    def __call__(self, streams, next_embed, next_ids, positions, segment_ids, *, implementation,
                 record: bool = False):
        """streams [B, S, n, d] (main model, before hc_head); next_embed [B, S, d] ->
        ([B, S, d], stats, recorded)."""
        dt = streams.dtype
        e = self.enorm(next_embed) @ self.w_e[...].astype(dt)
        h = self.hnorm(streams) @ self.w_h[...].astype(dt)
        x = e[:, :, None, :] + h
        x, stats, _, recorded = self.block(x, next_ids, positions, segment_ids,
                                           implementation=implementation, record=record)
        return self.norm(self.hc_head(x)), stats, recorded


def _stack_cycles(cfg: ModelConfig, kinds, n: int, rngs: nnx.Rngs) -> Cycle:
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Cycle(cfg, kinds, rngs=r)
    return make(rngs)


def _streams(x):
    """Sharding constraint on the residual streams [B, S, n, d] between blocks (no-op without
    active sharding rules)."""
    return constrain(x, ("activation_batch", "activation_length", "activation_hc", "activation_embed"))


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids -> position of each token inside its document."""
    s = segment_ids.shape[1]
    t = jnp.arange(s)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return t - first


class DeepseekV4(nnx.Module):
    """`logits = model(input_ids)` with int32 [B, S] ids gives [B, S, vocab] logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, v = cfg.hidden_size, cfg.vocab_size
        groups = cfg.layer_groups
        self.embed = param(rngs, (v, d), ("vocab", "embed"), cfg.init_std)
        self.head_layers = nnx.List([Block(cfg, l.kind, l.routing, rngs=rngs, hash_seed=l.index)
                                     for l in groups.head])
        self.cycles = (_stack_cycles(cfg, tuple(l.kind for l in groups.cycle), groups.num_cycles, rngs)
                       if groups.num_cycles else None)
        self.tail_layers = nnx.List([Block(cfg, l.kind, l.routing, rngs=rngs, hash_seed=l.index)
                                     for l in groups.tail])
        self.hc_head = HcHead(cfg, rngs=rngs)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, "embed")
        self.lm_head = param(rngs, (d, v), ("embed", "vocab"), cfg.init_std)
        self.mtp = MTP(cfg, rngs=rngs) if cfg.mtp_depth else None
        self.cfg = cfg

    # ------------------------------------------------------------------ pieces
    def _checkpointed(self, module, *args, **static):
        """Call `module(*args, **static)` under the configured remat policy."""
        policy = REMAT[self.cfg.remat]
        if policy is None:
            return module(*args, **static)
        graphdef, state = nnx.split(module)

        def f(state, *args):
            return nnx.merge(graphdef, state)(*args, **static)
        return jax.checkpoint(f, policy=policy)(state, *args)

    def _run_cycles(self, x, token_ids, positions, segment_ids, static):
        graphdef, state = nnx.split(self.cycles)
        policy = REMAT[self.cfg.remat]
        names = stacked_slice_names(state, "layers")

        def body(x, layer_state):
            # each layer's weights (and so their gradients) in the per-layer layout
            layer_state = constrain_slice(layer_state, names)
            x, st, rec = nnx.merge(graphdef, layer_state)(_streams(x), token_ids, positions,
                                                          segment_ids, **static)
            return _streams(x), (st, rec)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy)
        return jax.lax.scan(body, x, state)   # stats: [num_cycles, len(cycle), ...]

    def logits_from_hidden(self, h):
        return h @ self.lm_head[...].astype(h.dtype)

    def final_hidden(self, x):
        """Last streams [B, S, n, d] -> the head's input [B, S, d] (hc_head collapse, final norm)."""
        return self.norm(self.hc_head(x))

    def embed_rows(self, ids):
        """Embedding rows of `ids` in the compute dtype. Under sharding rules the table is
        gathered whole first (`constrain` to replicated; no-op without rules): XLA's SPMD
        partitioner aborts on a row gather from a table split over two mesh axes with indices
        split over one of them (fsdp_tp: "Check failed: grouped_sharding.device_groups...").
        The table is cast to the compute dtype before it is gathered: a bf16 run moves and holds
        half the bytes (1 GB instead of 2 for V4-Flash's 129280 x 4096 table, per device)."""
        table = constrain(self.embed[...].astype(dtype_of(self.cfg.dtype)), (None, None))
        return jnp.take(table, ids, axis=0)

    def embed_streams(self, input_ids):
        """[B, S] ids -> the initial residual streams [B, S, hc_mult, d] (4 identical copies)."""
        cfg = self.cfg
        x = self.embed_rows(input_ids)
        return jnp.broadcast_to(x[:, :, None, :], input_ids.shape + (cfg.hc_mult, cfg.hidden_size))

    def final_logits(self, x):
        """Last streams [B, S, n, d] -> logits [B, S, V] (hc_head collapse, final norm, head)."""
        return self.logits_from_hidden(self.final_hidden(x))

    def layer_blocks(self) -> list[Block]:
        """Every Block in layer order (`cfg.layer_kinds`): head layers, the scanned cycle's
        blocks with their stacked parameters sliced per cycle, tail layers. Call it outside
        jit (as the Decoder does) so that the slices are made once, not on every step."""
        blocks = list(self.head_layers)
        if self.cycles is not None:
            graphdef, params = nnx.split(self.cycles)
            for i in range(self.cfg.layer_groups.num_cycles):
                blocks += list(nnx.merge(graphdef, jax.tree.map(lambda a: _layer(a, i),
                                                                params)).blocks)
        return blocks + list(self.tail_layers)

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids, positions=None, segment_ids=None, *, sparse: bool = True,
                 implementation: str | None = None, return_aux: bool = False,
                 logits: bool = True, topk: int | None = None, topk_limit=None,
                 record: bool = False) -> Any:
        """input_ids [B, S] int -> logits [B, S, V] (or a ModelOutput with return_aux=True;
        with logits=False too, it carries the head's inputs instead of logits).

        positions default to 0..S-1, or to the position inside each document when segment_ids
        (packed documents, [B, S]) are given. sparse=False: CSA attends every visible entry.
        topk: the k of every CSA layer's indexer (default index_topk); topk_limit (a traced
        int): keep only each query's best `topk_limit` picks, so one compiled forward serves
        every k; record=True: ModelOutput.recorded holds every layer's internals (analysis).
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk={topk!r} is invalid: must be None or an integer >= 1")
        if not (return_aux or logits):
            raise ValueError("logits=False needs return_aux=True (the output carries the "
                             "head's inputs)")
        b, s = input_ids.shape
        if positions is None:
            positions = (segment_positions(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(s), (b, s)))
        static = dict(sparse=sparse, implementation=implementation, topk=topk,
                      topk_limit=topk_limit, record=record)
        x = self.embed_streams(input_ids)
        stats, recorded = [], []

        def unrolled(block, x):
            x, st, _, rec = self._checkpointed(block, _streams(x), input_ids, positions,
                                               segment_ids, **static)
            stats.append(jax.tree.map(lambda a: a[None], st))
            recorded.append(rec)
            return _streams(x)
        for block in self.head_layers:
            x = unrolled(block, x)
        if self.cycles is not None:
            x, (st, rec) = self._run_cycles(x, input_ids, positions, segment_ids, static)
            stats.append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), st))
            for r in range(self.cfg.layer_groups.num_cycles):   # rec: per block, [cycles, ...]
                recorded += [jax.tree.map(lambda a: a[r], blk) for blk in rec]
        for block in self.tail_layers:
            x = unrolled(block, x)
        if not return_aux:
            return self.final_logits(x)
        hidden = self.final_hidden(x)
        mtp_hidden = None
        if self.mtp is not None:
            next_ids = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
            next_embed = self.embed_rows(next_ids)
            mtp_hidden, st, rec = self.mtp(x, next_embed, next_ids, positions, segment_ids,
                                           implementation=implementation, record=record)
            stats.append(jax.tree.map(lambda a: a[None], st))
            recorded.append(rec)
        stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats)
        recorded = tuple(recorded) if record else None
        if logits:
            return ModelOutput(self.logits_from_hidden(hidden),
                               None if mtp_hidden is None else self.logits_from_hidden(mtp_hidden),
                               **stats, recorded=recorded)
        return ModelOutput(None, None, **stats, hidden=hidden, mtp_hidden=mtp_hidden,
                           head=self.lm_head[...], recorded=recorded)


def _layer(a, i: int):
    """Slice i of a stacked parameter (a ShapeDtypeStruct of an `nnx.eval_shape` model too)."""
    if isinstance(a, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return a[i]


def build_model(cfg: ModelConfig, seed: int = 0) -> DeepseekV4:
    return DeepseekV4(cfg, rngs=nnx.Rngs(seed))
