"""The dense stage (the indexer warm-up) computes its KL over every visible entry in query chunks
(`ops.indexer.indexer_objective_chunked`, picks from the fused top-k): its KL, recall and the
KL's gradient equal the unchunked form it replaced (full [B, S, N] scores and attention mass,
`indexer_objective`), on packed rows spanning several query chunks; fp32, a few seconds."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.model import build_model
from sparse_lm.ops import masks
from sparse_lm.ops.indexer import (compressed_attention_mass, indexer_objective, indexer_scores,
                                   select_topk)
from tests.conftest import tiny_config

S = 600    # 3 query chunks of 256 (the last one partial); N = 150 entries


def _layer_and_inputs():
    cfg = tiny_config(num_layers=1, layer_prefix=(), layer_cycle=("csa",), layer_tail=(),
                      num_hash_layers=0, mtp_depth=0)
    model = build_model(cfg, seed=0)
    attn = model.cycles.blocks[0].attn if model.cycles is not None else model.head_layers[0].attn
    x = jax.random.normal(jax.random.key(3), (2, S, cfg.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(S), (2, S))
    seg = jnp.asarray(np.broadcast_to(np.repeat([1, 2, 3], [137, 300, S - 437]), (2, S)),
                      jnp.int32)
    return cfg, attn, x, positions, seg


def _unchunked(layer, x, positions, seg, implementation):
    """The dense stage's objective as it was: the full scores, mass and top-k."""
    q, q_latent = layer.project_queries(x, positions)
    kv = layer.project_kv(x, positions)
    inv_freq = layer.inv_freq
    entries, valid = layer.compressor(x, positions, inv_freq, seg)
    ind = layer.indexer
    iq, iw = ind.project_queries(x, q_latent, positions, inv_freq)
    keys, _ = ind.keys(x, positions, inv_freq, seg)
    visible = masks.sequence_entry_visible(S, layer.ratio, valid, seg)
    full = indexer_scores(iq, iw, keys, visible)
    picks = select_topk(jax.lax.stop_gradient(full), ind.topk)
    _, lse = layer._sparse_attention(q, kv, seg, entries, valid, None, implementation)
    sg = jax.lax.stop_gradient
    mass = compressed_attention_mass(sg(q), sg(entries), sg(lse), visible, layer.softmax_scale)
    return indexer_objective(full, mass, visible, picks)


@pytest.mark.parametrize("implementation", [None, "reference"])
def test_chunked_dense_stage_kl_recall_and_gradient_equal_the_unchunked_form(implementation):
    cfg, attn, x, positions, seg = _layer_and_inputs()
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

    def chunked(p):
        _, stats, _, _ = nnx.merge(graphdef, p, rest)(x, positions, seg, sparse=False,
                                                        implementation=implementation)
        return stats["indexer_kl"], stats["indexer_recall"]

    def unchunked(p):
        return _unchunked(nnx.merge(graphdef, p, rest), x, positions, seg, implementation)

    (kl, recall), (want_kl, want_recall) = jax.jit(chunked)(params), jax.jit(unchunked)(params)
    assert float(want_kl) > 1e-3 and 0.0 < float(want_recall) < 1.0     # a real objective
    np.testing.assert_allclose(float(kl), float(want_kl), rtol=1e-5)
    np.testing.assert_allclose(float(recall), float(want_recall), rtol=1e-5)
    got = jax.jit(jax.grad(lambda p: chunked(p)[0]))(params)
    want = jax.jit(jax.grad(lambda p: unchunked(p)[0]))(params)
    leaves = jax.tree_util.tree_leaves_with_path(want)
    moved = 0
    for (path, w), g in zip(leaves, jax.tree_util.tree_leaves(got)):
        w, g = np.asarray(w), np.asarray(g)
        scale = float(np.max(np.abs(w)))
        moved += scale > 0
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * max(scale, 1e-30),
                                   err_msg=jax.tree_util.keystr(path))
    assert moved >= 3        # the indexer's projections and its compressor learn from the KL
