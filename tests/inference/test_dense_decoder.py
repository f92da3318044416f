"""`sparse_lm.inference.dense`: the dense full-context baseline is a correct decoder.

Token-by-token decode through its full KV cache gives the full forward's logits (fp32, 1e-5) of
the same model with every layer a causal attention (SWA with a window covering the sequence);
its cache is exactly layers x [B, max_len, D]; models it cannot serve are refused by name.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_lm.inference import Decoder
from sparse_lm.inference.dense import (full_attention_config, full_kv_cache_bytes,
                                       init_full_kv_cache)
from sparse_lm.model import build_model
from tests.inference.test_bench_decode import TINY


def test_dense_arm_decodes_like_the_full_forward_of_a_full_attention_model():
    s = 24
    model = build_model(full_attention_config(TINY, window=s), seed=2)   # window covers every token
    ids = np.random.default_rng(1).integers(0, 256, (2, s)).astype(np.int32)
    full = np.asarray(jax.jit(lambda i: model(i))(jnp.asarray(ids)))
    dec = Decoder(model)
    cache = init_full_kv_cache(model.cfg, 2, s)
    for t in range(s):
        logits, cache = dec.decode(cache, ids[:, t])
        np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5, rtol=0,
                                   err_msg=f"position {t}")
    assert np.asarray(cache.lengths).tolist() == [s, s]


def test_chunked_prefill_through_the_full_kv_cache_equals_the_full_forward():
    s = 20
    model = build_model(full_attention_config(TINY, window=s), seed=3)
    ids = np.random.default_rng(2).integers(0, 256, (2, s)).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids)))
    dec = Decoder(model)
    got, _ = dec.prefill(init_full_kv_cache(model.cfg, 2, s), [ids[0], ids[1][:13]],
                         chunk_size=6, logits="all")
    np.testing.assert_allclose(np.asarray(got[0]), full[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got[1]), full[1, :13], atol=1e-5, rtol=0)


def test_full_kv_cache_size_and_refusals():
    cfg = full_attention_config(TINY, window=64)
    shapes = jax.eval_shape(lambda: init_full_kv_cache(cfg, 3, 64))
    assert full_kv_cache_bytes(shapes) == cfg.num_layers * 3 * 64 * cfg.head_dim * 4
    with pytest.raises(ValueError, match="window-only"):
        init_full_kv_cache(TINY, 1, 8)
    with pytest.raises(ValueError, match="sliding_window"):
        init_full_kv_cache(full_attention_config(TINY), 1, 4 * TINY.sliding_window)
    with pytest.raises(ValueError, match="max_len"):
        init_full_kv_cache(cfg, 1, 0)
