"""Both stages select through the fused score + top-k op and the dense stage's KL runs in query
chunks: training never forms the [B, S, N] indexer scores nor a [B, S, Hi|H, N] product
(checked on the jaxpr of the loss gradient, every sub-jaxpr included), and the picks equal the
top-k of the full scores (so the loss is the one of the full form)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_lm.model import build_model
from sparse_lm.ops.indexer import select_topk
from sparse_lm.train.losses import total_loss
from sparse_lm.train.steps import _forward
from tests.conftest import tiny_config
from tests.jaxpr_walk import equations

S = 1280   # > the 512 queries the recall metric samples; N = S / 4 = 320 entries, 5 chunks of the top-k


def _shapes(jaxpr) -> set:
    """Shapes of every floating value any equation makes, nested jaxprs included."""
    return {tuple(v.aval.shape) for eqn, _ in equations(jaxpr) for v in eqn.outvars
            if hasattr(v.aval, "shape") and jnp.issubdtype(v.aval.dtype, jnp.floating)}


def _csa_model():
    cfg = tiny_config(num_layers=1, layer_prefix=(), layer_cycle=("csa",), layer_tail=(),
                      num_hash_layers=0, mtp_depth=0)
    return cfg, build_model(cfg, seed=0)


def _s_by_n(sh, s, n) -> bool:
    """A value with a query axis of S and, after it, an entry axis of N."""
    return s in sh and n in sh[sh.index(s) + 1:]


def test_neither_stage_gradient_holds_a_query_by_entry_value():
    cfg, model = _csa_model()
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 256, (2, S + 1)), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens)}
    n = S // cfg.compress_ratio_csa

    def loss(p, sparse, implementation):
        out = _forward(graphdef, p, buffers, batch, sparse=sparse, implementation=implementation)
        return total_loss(out, batch, mtp_weight=0.0, balance_alpha=0.0, indexer_weight=1.0)[0]
    # the attention too: "xla" (the default on CPU) and "reference" (bench_train's dense arm)
    # take every visible entry in query chunks
    for sparse, implementation in ((True, None), (False, None), (False, "reference")):
        shapes = _shapes(jax.make_jaxpr(jax.grad(lambda p: loss(p, sparse, implementation)))(params))
        found = sorted(sh for sh in shapes if _s_by_n(sh, S, n))
        assert not found, (sparse, found)


def test_fused_picks_equal_the_top_k_of_the_full_scores():
    cfg, model = _csa_model()
    x = jax.random.normal(jax.random.key(1), (2, S, cfg.hidden_size))
    q_latent = jax.random.normal(jax.random.key(2), (2, S, cfg.q_lora_rank))
    positions = jnp.broadcast_to(jnp.arange(S), (2, S))
    attn = model.cycles.blocks[0].attn if model.cycles is not None else model.head_layers[0].attn
    indexer = attn.indexer
    inv_freq = attn.inv_freq
    (sel_scores, fused, _) = indexer(x, q_latent, positions, inv_freq, stage="sparse")
    _, _, recorded = indexer(x, q_latent, positions, inv_freq, stage="dense", record=True)
    full = recorded["scores"]
    picks = select_topk(full, cfg.index_topk)
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(picks))
    np.testing.assert_array_equal(np.asarray(recorded["topk"]), np.asarray(picks))
    want = jnp.where(picks >= 0, jnp.take_along_axis(full, jnp.maximum(picks, 0), axis=-1), -jnp.inf)
    np.testing.assert_allclose(np.asarray(sel_scores), np.asarray(want), rtol=1e-6, atol=1e-6)
