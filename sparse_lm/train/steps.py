"""Pure training and evaluation steps over `nnx.split` pytrees.

`graphdef, state = init_train_state(model, tx)` once; then
`state, metrics = train_step(state, batch)` is a jitted pure function (see `make_train_step`).
The state holds the parameters (`nnx.Param`, trained by the optimizer), the buffers (router
biases, updated by the aux-loss-free rule after the optimizer; hash tables, frozen), the
optimizer state and the step.

Router bias rule (spec §8.7): after each step, per score-routed layer,
    b_i <- b_i + gamma * sign(mean_j load_j - load_i)
with load = this step's expert assignment counts over the global batch: overloaded experts go
down, underloaded ones up.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparse_lm.data.packing import batch_targets
from sparse_lm.model.selectors import advance_selector_clocks
from sparse_lm.train.losses import has_mtp, head_cross_entropy, total_loss


@dataclasses.dataclass
class TrainState:
    params: Any          # nnx.State of nnx.Param
    buffers: Any         # nnx.State of every other variable (router biases, hash tables)
    opt_state: Any
    step: jax.Array      # int32 scalar: number of optimizer steps taken


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "buffers", "opt_state", "step"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class LossConfig:
    balance_alpha: float = 1e-4
    indexer_weight: float = 1.0
    router_bias_rate: float = 1e-3       # gamma


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation):
    """(graphdef, TrainState at step 0)."""
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(params, buffers, tx.init(params), jnp.zeros((), jnp.int32))


def abstract_train_state(model_fn, tx):
    """(graphdef, TrainState of ShapeDtypeStructs) without allocating: for checkpoint restore."""
    model = nnx.eval_shape(model_fn)
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    opt_state = jax.eval_shape(tx.init, params)
    return graphdef, TrainState(params, buffers, opt_state, jax.ShapeDtypeStruct((), jnp.int32))


def bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """bias [..., E], load [..., E] expert counts -> bias + rate * sign(mean(load) - load)."""
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - load).astype(bias.dtype)


def layer_rows(cfg) -> dict:
    """Row of `ModelOutput.expert_counts` for each layer group of the model:
    {"head": [rows], "cycle": [[rows of cycle block j over the repeats]], "tail": [...], "mtp": row}."""
    g = cfg.layer_groups
    h, c = len(g.head), len(g.cycle)
    rows = {"head": list(range(h)),
            "cycle": [[h + r * c + j for r in range(g.num_cycles)] for j in range(c)],
            "tail": list(range(h + c * g.num_cycles, cfg.num_layers)),
            "mtp": cfg.num_layers if cfg.mtp_depth else None}
    return rows


def update_router_biases(model, counts: jax.Array, rate: float) -> None:
    """Apply `bias_update` in place to every score-routed MoE of the model.

    counts [L(+1), E]: rows = layers in order (+ the MTP block), as in `ModelOutput`.
    """
    rows = layer_rows(model.cfg)

    def upd(moe, load):
        if moe.routing == "score":
            moe.bias[...] = bias_update(moe.bias[...], load, rate)

    for blk, r in zip(model.head_layers, rows["head"]):
        upd(blk.moe, counts[r])
    if model.cycles is not None:
        for blk, rs in zip(model.cycles.blocks, rows["cycle"]):
            upd(blk.moe, counts[jnp.asarray(rs)])          # stacked: bias [num_cycles, E]
    for blk, r in zip(model.tail_layers, rows["tail"]):
        upd(blk.moe, counts[r])
    if model.mtp is not None:
        upd(model.mtp.block.moe, counts[rows["mtp"]])


def _forward(graphdef, params, buffers, batch, *, sparse: bool, implementation=None):
    model = nnx.merge(graphdef, params, buffers)
    tokens, segs = batch["tokens"], batch["segment_ids"]
    return model(tokens[:, :-1], segment_ids=segs[:, :-1], sparse=sparse,
                 implementation=implementation, return_aux=True, logits=False)


def is_indexer_param(path) -> bool:
    """Parameters of a lightning indexer (its projections and its own compressor)."""
    return any(getattr(k, "key", getattr(k, "name", None)) == "indexer" for k in path)


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, loss_cfg: LossConfig,
               sparse: bool, implementation=None, only_indexer: bool = False):
    """One optimizer step. batch: {"tokens", "segment_ids"} [B, S+1] int32.

    only_indexer=True is the indexer warm-up of the V3.2 recipe (spec §6): every parameter but
    the indexers' is frozen (its update is zeroed) while the indexer learns from its KL loss.

    Returns (new state, metrics): fp32 scalars (loss, ce, bits_per_byte, mtp_ce, balance_loss,
    indexer_kl, grad_norm, update_norm, param_norm, lr, target_tokens) and per-layer arrays
    expert_counts [L(+1), E], indexer_recall [L(+1)].
    """
    def loss_fn(params):
        out = _forward(graphdef, params, state.buffers, batch, sparse=sparse,
                       implementation=implementation)
        loss, metrics = total_loss(out, batch, mtp_weight=schedule.mtp(state.step),
                                   balance_alpha=loss_cfg.balance_alpha,
                                   indexer_weight=loss_cfg.indexer_weight)
        return loss, (metrics, out.expert_counts, out.indexer_recall)

    (_, (metrics, counts, recall)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if only_indexer:
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: u if is_indexer_param(path) else jnp.zeros_like(u), updates)
    params = optax.apply_updates(state.params, updates)
    model = nnx.merge(graphdef, params, state.buffers)
    if not only_indexer:
        update_router_biases(model, counts, loss_cfg.router_bias_rate)
    advance_selector_clocks(model)      # learned selectors' temperature schedules (if any)
    _, _, buffers = nnx.split(model, nnx.Param, ...)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), update_norm=optax.global_norm(updates),
                   param_norm=optax.global_norm(params), lr=schedule.lr(state.step),
                   expert_counts=counts, indexer_recall=recall)
    return TrainState(params, buffers, opt_state, state.step + 1), metrics


def eval_step(params, buffers, batch, *, graphdef, sparse: bool, implementation=None):
    """Sums for exact averaging over batches: ce_sum, tokens, mtp_ce_sum, mtp_tokens,
    indexer_recall (mean over batch rows, per layer)."""
    out = _forward(graphdef, params, buffers, batch, sparse=sparse, implementation=implementation)
    t1, m1 = batch_targets(batch, 1)
    ce, n = head_cross_entropy(out, "main", t1, m1)
    res = {"ce_sum": ce * n, "tokens": n.astype(jnp.float32), "indexer_recall": out.indexer_recall,
           "expert_counts": out.expert_counts}
    if has_mtp(out):
        t2, m2 = batch_targets(batch, 2)
        ce2, n2 = head_cross_entropy(out, "mtp", t2, m2)
        res.update(mtp_ce_sum=ce2 * n2, mtp_tokens=n2.astype(jnp.float32))
    return res


def make_train_step(graphdef, tx, schedule, loss_cfg: LossConfig, *, sparse: bool,
                    implementation=None, donate: bool = True, only_indexer: bool = False):
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                           loss_cfg=loss_cfg, sparse=sparse, implementation=implementation,
                           only_indexer=only_indexer)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef, *, sparse: bool, implementation=None):
    return jax.jit(functools.partial(eval_step, graphdef=graphdef, sparse=sparse,
                                     implementation=implementation))
