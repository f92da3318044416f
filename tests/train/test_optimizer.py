"""Muon (spec §11) against a NumPy float64 implementation of the report's algorithm, AdamW
against NumPy, and the Muon / AdamW parameter split.

~10 s on 2 cores.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.train import optimizer as opt
from tests.conftest import tiny_config

COEFFS = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2


def np_hybrid_ns(u):
    """Report's HybridNS on one matrix, float64, on the wide orientation."""
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (np.linalg.norm(x) + 1e-8)
    for a, b, c in COEFFS:
        aa = x @ x.T
        x = a * x + (b * aa + c * aa @ aa) @ x
    return x.T if u.shape[0] > u.shape[1] else x


def np_muon_run(w, grads, lr, mu=0.95, wd=0.1, rms=0.18):
    """Every trailing 2-D slice of w is its own matrix (experts, stacked layers)."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    n, k = w.shape[-2:]
    for g in grads:
        g = g.astype(np.float64)
        m = mu * m + g
        u = mu * m + g
        o = np.stack([np_hybrid_ns(s) for s in u.reshape(-1, n, k)]).reshape(w.shape)
        o = o * np.sqrt(max(n, k)) * rms
        w = w * (1 - lr * wd) - lr * o
    return w


def np_adamw_run(w, grads, lr, b1=0.9, b2=0.95, eps=1e-20, wd=0.1):
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w = w - lr * (mh / (np.sqrt(vh) + eps) + wd * w)
    return w


def test_muon_and_adamw_match_numpy_reference_over_three_steps():
    rng = np.random.default_rng(0)
    shapes = {"wide": (6, 10), "tall": (12, 5), "w_up": (3, 4, 7),       # 3 experts
              "stacked": (2, 3, 5, 4),                                    # 2 layers x 3 experts
              "embed": (9, 4), "weight": (7,)}                           # AdamW
    params = {k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()}
             for _ in range(3)]
    lr = 0.02
    tx = opt.make_optimizer(opt.OptimizerConfig(grad_clip=0.0), lambda step: lr)
    state = tx.init(params)
    p = params
    for g in grads:
        upd, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, upd)
    labels = opt.label_params(params)
    for k in shapes:
        gs = [np.asarray(g[k]) for g in grads]
        w0 = np.asarray(params[k])
        ref = (np_muon_run(w0, gs, lr) if labels[k] == opt.MUON else np_adamw_run(w0, gs, lr))
        # Compare the total change of the weights (O(lr)), relative to its size.
        got, want = np.asarray(p[k], np.float64) - w0, ref - w0
        assert np.max(np.abs(got - want)) <= 2e-4 * np.max(np.abs(want)), k
    assert [labels[k] for k in shapes] == [opt.MUON] * 4 + [opt.ADAMW] * 2


def test_muon_treats_each_expert_matrix_separately():
    """Scaling one expert's gradient by 1000 leaves the other experts' updates unchanged
    (one Newton-Schulz over the whole [E, d, I] tensor would couple them)."""
    rng = np.random.default_rng(1)
    g = rng.normal(size=(3, 4, 6)).astype(np.float32)
    g2 = g.copy()
    g2[0] *= 1000.0
    tx = opt.scale_by_report_muon()
    p = {"w_gate": jnp.zeros((3, 4, 6))}
    u1, _ = tx.update({"w_gate": jnp.asarray(g)}, tx.init(p))
    u2, _ = tx.update({"w_gate": jnp.asarray(g2)}, tx.init(p))
    np.testing.assert_allclose(u1["w_gate"][1:], u2["w_gate"][1:], rtol=1e-5, atol=1e-6)


def test_parameter_split_of_the_model():
    from sparse_lm.model import build_model
    model = nnx.eval_shape(lambda: build_model(tiny_config(), seed=0))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    summary = opt.split_summary(params)
    adam = summary[opt.ADAMW]["names"]
    muon = summary[opt.MUON]["names"]
    leaf_names = {p.split("/")[-1] for p in list(adam) + list(muon)}
    # AdamW: embedding, head, norms, mHC static terms, sinks, compressor ape; nothing else.
    assert {p.split("/")[-1] for p in adam} == {"embed", "lm_head", "weight", "base", "scale",
                                                "sink", "ape"}
    assert "embed" in adam and "lm_head" in adam and "hc_head/base" in adam
    assert "mtp/hc_head/scale" in adam and "norm/weight" in adam
    # Muon: every projection, expert, router gate, mHC fn, compressor and indexer matrix.
    for name in ("head_layers/attn/wq_a", "head_layers/moe/w_gate", "head_layers/moe/gate",
                 "head_layers/attn_hc/fn", "cycles/blocks/attn/compressor/wkv",
                 "cycles/blocks/attn/indexer/wq_b", "mtp/w_e", "hc_head/fn"):
        assert name in muon, (name, sorted(muon))
    # Buffers are not parameters: no router bias or hash table reaches the optimizer.
    assert "bias" not in leaf_names and "tid2eid" not in leaf_names
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert summary[opt.MUON]["params"] + summary[opt.ADAMW]["params"] == n_params
    text = opt.format_split(summary)
    assert "muon" in text and "adamw" in text and "lm_head" in text


def test_unknown_vector_parameter_is_an_error():
    with pytest.raises(opt.OptimizerConfigError, match="mystery.*no optimizer rule"):
        opt.label_params({"mystery": jnp.zeros((4,))})
