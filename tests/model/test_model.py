"""Whole-model properties: causality per layer kind, no leakage across packed documents,
implementations agree in value and gradient, finite gradients, scan keeps the program small."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sparse_lm.model import build_model
from sparse_lm.model.layers import HashTable, RouterBias
from tests.conftest import tiny_config

# One config per layer kind (single layer + MTP), plus the mixed tiny preset.
KIND_CONFIGS = {
    "swa": dict(num_layers=1, layer_prefix=(), layer_cycle=("swa",), num_hash_layers=0),
    "csa": dict(num_layers=1, layer_prefix=(), layer_cycle=("csa",), num_hash_layers=0),
    "hca": dict(num_layers=1, layer_prefix=(), layer_cycle=("hca",), num_hash_layers=1),
}


def _ids(seed, b, s, vocab=256):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, vocab)


@pytest.fixture(scope="module")
def tiny_model():
    return build_model(tiny_config(), seed=0)


def _causality_check(model, s, t, seed=0):
    ids = _ids(seed, 2, s)
    changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 7) % 256)
    fwd = nnx.jit(lambda m, i: m(i, return_aux=True))
    a, b = fwd(model, ids), fwd(model, changed)
    np.testing.assert_allclose(a.logits[:, : t + 1], b.logits[:, : t + 1], atol=1e-5)
    assert np.abs(np.asarray(a.logits[:, t + 1:] - b.logits[:, t + 1:])).max() > 1e-4
    # MTP at position i reads token i+1: unchanged up to t-1.
    np.testing.assert_allclose(a.mtp_logits[:, :t], b.mtp_logits[:, :t], atol=1e-5)


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_causal_for_each_layer_kind(kind):
    model = build_model(tiny_config(**KIND_CONFIGS[kind]), seed=1)
    for t in (2, 7, 8, 19):        # inside/at the end of CSA (4) and HCA (8) windows
        _causality_check(model, 24, t)


def test_causal_across_hca_block_boundaries_at_release_ratios():
    """Window 128 and HCA ratio 128, S = 300: several HCA entries become visible mid-sequence."""
    cfg = tiny_config(num_layers=3, layer_prefix=(), layer_cycle=("swa", "csa", "hca"),
                      num_hash_layers=0, sliding_window=128, compress_ratio_hca=128, index_topk=8,
                      hidden_size=32, num_heads=2, head_dim=16, rope_head_dim=8, q_lora_rank=16,
                      o_groups=1, o_lora_rank=16, index_head_dim=8, index_n_heads=2, mtp_depth=0)
    model = build_model(cfg, seed=2)
    ids = _ids(3, 1, 300)
    fwd = nnx.jit(lambda m, i: m(i))
    base = fwd(model, ids)
    for t in (126, 127, 255, 256):
        changed = ids.at[:, t + 1:].set((ids[:, t + 1:] + 3) % 256)
        np.testing.assert_allclose(base[:, : t + 1], fwd(model, changed)[:, : t + 1], atol=1e-5)


def test_no_leakage_across_packed_documents(tiny_model):
    ids = _ids(4, 1, 32)
    seg = jnp.asarray([[0] * 16 + [1] * 16])
    other = ids.at[:, :16].set((ids[:, :16] + 11) % 256)   # change document 0 only
    fwd = nnx.jit(lambda m, i, s: m(i, segment_ids=s, return_aux=True))
    a, b = fwd(tiny_model, ids, seg), fwd(tiny_model, other, seg)
    np.testing.assert_allclose(a.logits[:, 16:], b.logits[:, 16:], atol=1e-5)
    # ... and document 1 alone, at positions 0.., gives the same logits as inside the pack.
    alone = fwd(tiny_model, ids[:, 16:], jnp.zeros((1, 16), jnp.int32))
    np.testing.assert_allclose(a.logits[:, 16:], alone.logits, atol=1e-5)


def _loss(model, ids, impl):
    out = model(ids, implementation=impl, return_aux=True)
    return (jnp.mean(jax.nn.log_softmax(out.logits)[..., 0]) + jnp.mean(out.mtp_logits ** 2)
            + jnp.sum(out.balance_loss) + jnp.sum(out.indexer_kl))


def test_reference_and_xla_agree_in_value_and_gradient():
    # Two scanned (CSA, HCA) cycles + MTP: small to compile, still every attention kind and scan.
    model = build_model(tiny_config(num_layers=4, layer_prefix=(), num_hash_layers=0), seed=5)
    ids = _ids(5, 2, 29)   # not a multiple of the window or the ratios
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, impl):
        return _loss(nnx.merge(graphdef, params, rest), ids, impl)
    (l_ref, g_ref), (l_xla, g_xla) = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, i)
                                      for i in ("reference", "xla")]
    np.testing.assert_allclose(l_ref, l_xla, rtol=1e-5)
    flat_ref, flat_xla = jax.tree.leaves(g_ref), jax.tree.leaves(g_xla)
    for a, b in zip(flat_ref, flat_xla):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert all(bool(jnp.isfinite(g).all()) for g in flat_xla)
    # Gradients reach every trainable parameter except the indexer's projections through the
    # LM loss (top-k has no gradient; they learn from the KL term included above).
    norms = {jax.tree_util.keystr(p): float(jnp.abs(g).max())
             for p, g in jax.tree_util.tree_flatten_with_path(g_xla)[0]}
    dead = [k for k, v in norms.items() if v == 0]
    assert not dead, dead


def test_hash_layers_route_by_token_id_only(tiny_model):
    out = nnx.jit(lambda m, i: m(i, return_aux=True))(tiny_model, _ids(6, 2, 16))
    table = tiny_model.head_layers[0].moe.tid2eid[...]
    ids = _ids(6, 2, 16)
    want = np.bincount(np.asarray(table[ids]).ravel(), minlength=8)
    np.testing.assert_array_equal(out.expert_counts[0], want)
    assert isinstance(tiny_model.head_layers[0].moe.tid2eid, HashTable)
    assert isinstance(tiny_model.head_layers[2].moe.bias, RouterBias)


def test_scanned_layers_keep_the_program_size_independent_of_depth():
    def n_eqns(layers):
        model = nnx.eval_shape(lambda: build_model(tiny_config(num_layers=layers, mtp_depth=0)))
        graphdef, state = nnx.split(model)
        f = lambda st, ids: nnx.merge(graphdef, st)(ids)
        return len(jax.make_jaxpr(f)(state, jnp.zeros((1, 16), jnp.int32)).jaxpr.eqns)
    assert n_eqns(8) == n_eqns(16) == n_eqns(24)


def test_logits_shape_and_dtype(tiny_model):
    logits = nnx.jit(lambda m, i: m(i))(tiny_model, _ids(7, 3, 10).astype(jnp.int32))
    assert logits.shape == (3, 10, 256) and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match=r"input_ids must be \[B, S\]"):
        tiny_model(jnp.zeros((10,), jnp.int32))


def test_pallas_kernels_inside_the_model_match_xla():
    """implementation="pallas" (interpreted on CPU) runs both kernels in every attention kind."""
    model = build_model(tiny_config(num_layers=4, layer_prefix=(), num_hash_layers=0,
                                    mtp_depth=0), seed=5)
    ids = _ids(8, 2, 21)
    seg = jnp.asarray([[0] * 12 + [1] * 9, [0] * 21])
    f = nnx.jit(lambda m, i, s, impl: m(i, segment_ids=s, implementation=impl), static_argnums=3)
    np.testing.assert_allclose(f(model, ids, seg, "pallas"), f(model, ids, seg, "xla"), atol=1e-5)
