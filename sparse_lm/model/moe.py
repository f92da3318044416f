"""DeepSeekMoE module: router (score or hash), routed experts, one shared expert."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparse_lm.config import ModelConfig
from sparse_lm.model.layers import HashTable, RouterBias, param
from sparse_lm.ops import moe as moe_ops
from sparse_lm.sharding import expert_parallel
from sparse_lm.sharding.constraints import constrain


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, routing: str, *, rngs: nnx.Rngs, hash_seed: int = 0):
        d, e, i, std = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.init_std
        self.gate = param(rngs, (d, e), ("embed", "exp"), std)
        if routing == "score":
            self.bias = RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=("exp",),
                                   eager_sharding=False)
        else:
            table = moe_ops.balanced_hash_table(cfg.vocab_size, e, cfg.num_experts_per_tok, hash_seed)
            self.tid2eid = HashTable(jnp.asarray(table), out_sharding=("vocab", None),
                                     eager_sharding=False)
        self.w_gate = param(rngs, (e, d, i), ("exp", "embed", "mlp"), std)
        self.w_up = param(rngs, (e, d, i), ("exp", "embed", "mlp"), std)
        self.w_down = param(rngs, (e, i, d), ("exp", "mlp", "embed"), std)
        if cfg.n_shared_experts:
            self.shared_gate = param(rngs, (d, i), ("embed", "mlp"), std)
            self.shared_up = param(rngs, (d, i), ("embed", "mlp"), std)
            self.shared_down = param(rngs, (i, d), ("mlp", "embed"), std)
        self.routing = routing
        self.cfg = cfg

    def __call__(self, u, token_ids, *, record: bool = False):
        """u [B, S, d] (normed), token_ids [B, S] -> (y [B, S, d], stats, recorded).

        Score layers route by `cfg.moe_router` (sparse_lm/ops/moe.py: "v4", "capacity",
        "top2_softmax"); hash layers by the token's table row.
        stats: expert_counts [E] (assignments the experts compute: the capacity router's
        dropped ones excluded), balance_loss (scalar: the router's auxiliary loss, the
        sequence-wise one for v4, the utilisation variance for capacity, Switch for
        top2_softmax; 0 for hash layers).
        recorded (record=True, else empty): the router's affinities [B, S, E] (top2_softmax:
        its probabilities), chosen experts [B, S, k], combine weights [B, S, k] and, for score
        routing, its bias [E]; capacity routing adds kept [B, S, k] and capacity (scalar).
        """
        cfg = self.cfg
        b, s, d = u.shape
        u = constrain(u, ("activation_batch", "activation_length", "activation_embed"))
        flat = u.reshape(b * s, d)
        router = cfg.moe_router if self.routing == "score" else "hash"
        kept = capacity = None
        if router == "top2_softmax":
            scores, idx, weights = moe_ops.top2_softmax_route(flat @ self.gate[...].astype(flat.dtype))
        else:
            scores = moe_ops.affinities(flat, self.gate[...])
            if router == "v4":
                idx = moe_ops.select_by_score(scores, self.bias[...], cfg.num_experts_per_tok)
            elif router == "capacity":   # plain top-k: the variance loss balances, not the bias
                idx = moe_ops.select_by_score(scores, jnp.zeros_like(self.bias[...]),
                                              cfg.num_experts_per_tok)
            else:
                idx = moe_ops.select_by_hash(token_ids.reshape(-1), self.tid2eid[...])
            weights = moe_ops.combine_weights(scores, idx, cfg.routed_scaling_factor)
        if router == "capacity":   # an overflowing assignment contributes nothing (weight 0)
            capacity = moe_ops.batch_capacity(moe_ops.expert_counts(idx, cfg.n_routed_experts),
                                              cfg.router_capacity_range)
            kept = moe_ops.capacity_keep(idx, capacity, cfg.n_routed_experts)
            weights = jnp.where(kept, weights, 0.0)
        if cfg.moe_dispatch == "local":
            experts = moe_ops.EXPERT_IMPLEMENTATIONS[cfg.moe_impl]
            # per device under sharding rules (a global sort otherwise), plain call without
            y = expert_parallel.local_experts(experts, flat, idx, weights, self.w_gate[...],
                                              self.w_up[...], self.w_down[...],
                                              limit=cfg.swiglu_limit)
        else:   # expert parallelism over the active mesh's `expert` axis
            y = expert_parallel.dispatch(cfg.moe_dispatch, flat, idx, weights, self.w_gate[...],
                                         self.w_up[...], self.w_down[...], limit=cfg.swiglu_limit,
                                         moe_impl=cfg.moe_impl,
                                         capacity_factor=cfg.moe_capacity_factor)
        if cfg.n_shared_experts:
            y = y + moe_ops.ffn(flat, self.shared_gate[...], self.shared_up[...],
                                self.shared_down[...], cfg.swiglu_limit)
        if router == "v4":
            balance = moe_ops.sequence_balance_loss(scores.reshape(b, s, -1),
                                                    idx.reshape(b, s, -1), cfg.num_experts_per_tok)
        elif router == "capacity":
            balance = moe_ops.utilisation_variance_loss(scores)
        elif router == "top2_softmax":
            balance = moe_ops.switch_balance_loss(scores, idx)
        else:
            balance = jnp.zeros((), jnp.float32)
        # kept assignments only: T*k minus their sum is the number the capacity dropped
        stats = {"expert_counts": moe_ops.expert_counts(idx, cfg.n_routed_experts, kept),
                 "balance_loss": balance}
        recorded = {}
        if record:
            recorded = {"affinities": scores.reshape(b, s, -1), "experts": idx.reshape(b, s, -1),
                        "weights": weights.reshape(b, s, -1)}
            if self.routing == "score":
                recorded["bias"] = self.bias[...]
            if kept is not None:
                recorded.update(kept=kept.reshape(b, s, -1), capacity=capacity)
        return y.reshape(b, s, d), stats, recorded
