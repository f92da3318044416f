"""Token selectors of the ablation (issue 23): the defining property of each."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm import presets
from sparse_lm.config import ConfigError, ModelConfig
from sparse_lm.model.attention import Attention
from sparse_lm.model.selectors import make_selector
from sparse_lm.ops import masks
from sparse_lm.ops import selectors as sel
from sparse_lm.ops.attention import attention_reference, attention_xla


def _cfg(**kw):
    base = dict(moe_impl="xla", attention_impl="xla", index_topk=4)
    base.update(kw)
    return ModelConfig.from_dict(presets.tiny()).replace(**base)


def _visible(seed=0, b=2, s=40, ratio=4):
    """A packed row of two documents: entries visible by the model's own rule."""
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2 + 2:] = 2
    seg = jnp.asarray(seg)
    valid = masks.window_validity(seg, b, s, ratio)
    return masks.sequence_entry_visible(s, ratio, valid, seg)


def _numpy_fixed(vis, local, glob, stride, block):
    out = np.zeros_like(vis)
    for idx in np.ndindex(vis.shape[:2]):
        cols = np.flatnonzero(vis[idx])
        for r, c in enumerate(cols):
            out[idx + (c,)] = (len(cols) - 1 - r < local) or (r < glob) or (r % stride < block)
    return out


def test_fixed_selects_exactly_its_pattern_and_keeps_local_first_when_capped():
    vis = _visible()
    want = _numpy_fixed(np.asarray(vis), 2, 1, 3, 1)
    picks = np.asarray(sel.fixed_picks(vis, vis.shape[-1], local=2, global_=1, stride=3, block=1))
    got = np.zeros_like(want)
    for idx in np.ndindex(picks.shape[:2]):
        listed = picks[idx][picks[idx] >= 0]
        assert len(set(listed)) == len(listed)
        got[idx + (listed,)] = True
    np.testing.assert_array_equal(got, want)
    capped = np.asarray(sel.fixed_picks(vis, 2, local=2, global_=1, stride=3, block=1))
    for idx in np.ndindex(capped.shape[:2]):
        cols = np.flatnonzero(np.asarray(vis)[idx])
        assert sorted(capped[idx][capped[idx] >= 0]) == sorted(cols[-2:])


def test_adaptive_k_keeps_the_fraction_of_visible_entries_capped_and_padded():
    cfg = _cfg(selector="mlp_router", selector_k_fraction=0.5, index_topk=2)
    layer = Attention(cfg, "csa", rngs=nnx.Rngs(0))
    b, s = 2, 40
    x = jax.random.normal(jax.random.key(1), (b, s, cfg.hidden_size))
    pos = masks.row_positions(b, s)
    seg = jnp.asarray(np.where(np.arange(s) < 22, 1, 2)[None].repeat(b, 0).astype(np.int32))

    @nnx.jit       # one compiled program: eager layers cost several times more CPU here
    def select(layer, x):
        _, q_latent = layer.project_queries(x, pos)
        entries, valid = layer.compressor(x, pos, layer.inv_freq, seg)
        return layer.indexer.select(layer, x, q_latent, pos, seg, entries, valid, k=2)
    out = select(layer, x)
    vis, picks = np.asarray(out["visible"]), np.asarray(out["picks"])
    assert picks.shape[-1] == 2
    count = vis.sum(-1)
    share = np.ceil(0.5 * count - 1e-6)
    want_k = np.minimum(share, 2)
    np.testing.assert_array_equal((picks >= 0).sum(-1), want_k)
    assert (share > 2).any() and ((0 < want_k) & (want_k < 2)).any()   # cap and share both bind
    for idx in np.ndindex(picks.shape[:2]):
        row = picks[idx]
        k = int((row >= 0).sum())
        assert (row[k:] == -1).all()                    # -1 padding at the end only
        assert vis[idx][row[:k]].all()                  # never an invisible entry


def _gated_problem(seed=0):
    rng = np.random.default_rng(seed)
    b, s, h, d, n, hr = 1, 24, 2, 8, 6, 5
    f = lambda *sh: jnp.asarray(rng.normal(size=sh).astype(np.float32))  # noqa: E731
    q, kv, entries = f(b, s, h, d), f(b, s, d), f(b, n, d)
    vis = masks.sequence_entry_visible(s, 4, jnp.ones((b, n), bool))
    params = {"q": f(b, s, hr), "e": f(b, n, hr), "bias": f(hr), "w": f(hr)}
    return q, kv, entries, vis, params


def _loss_through_unselected(params, q, kv, entries, vis, *, estimator, selected_only=False):
    """The loss with every picked entry's score detached: what reaches the parameters comes
    through the scores of entries that were NOT picked."""
    r = sel.pair_mlp_scores(params["q"], params["e"], params["bias"], params["w"])
    picks = sel.select_topk(jnp.where(vis, jax.lax.stop_gradient(r), -jnp.inf), 2)
    listed = sel.picks_mask(picks, r.shape[-1])
    r = jnp.where(listed, jax.lax.stop_gradient(r), r)
    noise, tau = None, 1.0
    if estimator == "gumbel":
        noise, tau = jax.random.logistic(jax.random.key(3), r.shape), 0.5
    gate, soft = sel.straight_through_gate(r, picks, vis, temperature=tau, noise=noise)
    if selected_only:            # the estimator a sparse kernel could give: listed entries only
        gate = jnp.where(listed, gate, 0.0)
    o, _ = sel.gated_entries_attention(q, kv, jnp.zeros(q.shape[2]), entries, vis, gate,
                                       window=4, scale=0.3)
    return jnp.sum(jnp.sin(o)), picks


@pytest.mark.parametrize("estimator", ["ste", "gumbel"])
def test_the_gradient_reaches_the_router_through_an_unselected_entry(estimator):
    q, kv, entries, vis, params = _gated_problem()
    def grad(selected_only):
        return jax.jit(jax.grad(lambda p: _loss_through_unselected(
            p, q, kv, entries, vis, estimator=estimator, selected_only=selected_only)[0]))(params)
    g = grad(False)
    assert float(jnp.abs(g["w"]).max()) > 1e-4
    g0 = grad(True)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g0))


def test_the_gated_forward_is_the_sparse_attention_of_the_picks():
    q, kv, entries, vis, params = _gated_problem(1)
    r = sel.pair_mlp_scores(params["q"], params["e"], params["bias"], params["w"])
    picks = sel.select_topk(jnp.where(vis, r, -jnp.inf), 2)
    gate, _ = sel.straight_through_gate(r, picks, vis)
    sink = jnp.asarray([0.3, -0.2])
    o, lse = sel.gated_entries_attention(q, kv, sink, entries, vis, gate, window=4, scale=0.3)
    o_ref, lse_ref = attention_xla(q, kv, sink, window=4, scale=0.3, compressed=entries,
                                   compressed_valid=jnp.ones(entries.shape[:2], bool), ratio=4,
                                   topk_idx=picks)
    np.testing.assert_allclose(o, o_ref, atol=2e-5)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-5)


def _csa_layer(selector, b, s, seed):
    """(cfg, a CSA attention layer with `selector`, input x [B, S, d], positions [B, S])."""
    cfg = _cfg(selector=selector)
    x = jax.random.normal(jax.random.key(seed), (b, s, cfg.hidden_size))
    return cfg, Attention(cfg, "csa", rngs=nnx.Rngs(0)), x, masks.row_positions(b, s)


def test_dense_selector_equals_the_dense_reference():
    cfg, layer, x, pos = _csa_layer("dense", 2, 32, 2)

    @nnx.jit
    def both(layer, x):
        out, stats, _, _ = layer(x, pos)
        q, _ = layer.project_queries(x, pos)
        kv = layer.project_kv(x, pos)
        entries, valid = layer.compressor(x, pos, layer.inv_freq, None)
        o_ref, _ = attention_reference(q, kv, layer.sink[...], window=cfg.sliding_window,
                                       scale=layer.softmax_scale, compressed=entries,
                                       compressed_valid=valid, ratio=layer.ratio)
        return out, layer.project_output(o_ref, pos), stats["indexer_recall"]
    out, want, recall = both(layer, x)
    np.testing.assert_allclose(out, want, atol=1e-5)
    np.testing.assert_allclose(recall, 1.0, rtol=1e-6)


def test_dsa_tokens_picks_tokens_outside_the_window_and_runs_every_stage():
    s = 32
    cfg, layer, x, pos = _csa_layer("dsa_tokens", 1, s, 4)

    @nnx.jit
    def run(layer, x):
        picks = layer(x, pos, record=True)[3]["topk"]
        dense_kl = layer(x, pos, sparse=False)[1]["indexer_kl"]                  # dense stage
        grad = nnx.grad(lambda m: m(x, pos)[1]["indexer_kl"])(layer)             # sparse stage
        return picks, dense_kl, jnp.abs(grad.indexer.wk[...]).max()
    picks, dense_kl, grad = run(layer, x)
    picks = np.asarray(picks)
    t = np.arange(s)[None, :, None]
    assert ((picks == -1) | (picks <= t - cfg.sliding_window)).all()
    assert (picks >= 0).sum(-1).max() == cfg.index_topk
    assert float(dense_kl) > 0 and float(grad) > 0


@pytest.mark.parametrize("selector,extra", [
    ("dsa_tokens", {}),
    ("mlp_router", dict(selector_estimator="gumbel", selector_temperature=(2.0, 0.5),
                        selector_k_fraction=0.5)),
])
def test_chunked_prefill_and_decode_of_a_learned_selector_equal_the_full_forward(selector, extra):
    """The cached path (`Decoder.prefill` in chunks, then `decode`) picks what the full forward
    picks: dsa_tokens from its per-token cache (candidates j <= t - W), mlp_router from the
    cached entries with adaptive k. 3 layers (swa, csa, hca); 30 tokens, window 8, k = 3."""
    from sparse_lm.inference.decode import Decoder
    from sparse_lm.model.transformer import build_model
    cfg = _cfg(num_layers=3, layer_prefix=("swa",), layer_cycle=("csa", "hca"), layer_tail=(),
               num_hash_layers=1, mtp_depth=0, index_topk=3, selector=selector, **extra)
    model = build_model(cfg, seed=0)
    toks = np.random.default_rng(0).integers(0, 256, size=(1, 30)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(toks)))[0]
    dec = Decoder(model)
    cache = dec.init_cache(batch=1, max_len=48)
    logits, cache = dec.prefill(cache, [toks[0, :27]], chunk_size=16)
    got = [np.asarray(logits)[0]]
    for t in range(27, 30):
        logits, cache = dec.decode(cache, jnp.asarray(toks[:, t]))
        got.append(np.asarray(logits)[0])
    np.testing.assert_allclose(np.stack(got), full[26:30], atol=2e-6, rtol=0)


def test_cached_dense_stage_of_dsa_tokens_is_a_clear_error():
    cfg = _cfg(selector="dsa_tokens")
    selector = make_selector(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"model\.selector='dsa_tokens' has no dense stage on "
                                         r"the cached path.*sparse=True"):
        selector.cached(None, None, None, None, None, None, None, None, entries=None,
                        select=False)


@pytest.mark.parametrize("kw,field,needle", [
    (dict(selector="bigbird"), "selector",
     "allowed values: ('lightning', 'dense', 'fixed', 'dsa_tokens', 'mlp_router')"),
    (dict(selector="dense", selector_k_fraction=0.3), "selector_k_fraction",
     "adaptive k is an option of selector='mlp_router' only"),
    (dict(selector="mlp_router", selector_estimator="ste", selector_temperature=(1.0, 0.1)),
     "selector_temperature", "selector_estimator='gumbel' only"),
    (dict(selector="mlp_router", selector_estimator="reinforce"), "selector_estimator",
     "allowed values: ('ste', 'gumbel')"),
])
def test_bad_selector_fields_name_the_field_and_the_choices(kw, field, needle):
    with pytest.raises(ConfigError, match=rf"model\.{field}=.*{re.escape(needle)}"):
        _cfg(**kw)


def test_the_gumbel_temperature_anneals_on_the_clock():
    cfg = _cfg(selector="mlp_router", selector_estimator="gumbel",
               selector_temperature=(2.0, 0.5), selector_anneal_steps=10)
    selector = make_selector(cfg, rngs=nnx.Rngs(0))
    taus = []
    for step in (0, 5, 10, 20):
        selector.clock[...] = jnp.int32(step)
        taus.append(float(selector.temperature()))
    np.testing.assert_allclose(taus, [2.0, 2.0 * math.sqrt(0.25), 0.5, 0.5], rtol=1e-6)
