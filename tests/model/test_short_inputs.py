"""Short inputs: the full forward works for any S >= 1 and equals the cached decoder.

A model with one SWA, one CSA (ratio 4) and one HCA (ratio 8) layer, window 8, index_topk 2.
S = 1, 2, 3 are shorter than the CSA ratio (no compressed entry at all: the overlapping CSA
compressor has zero windows) and than top-k entries; S = 5 gives one CSA entry (fewer than
top-k) and is still shorter than the HCA ratio and the window; S = 9 passes the HCA ratio and
the window. Each full forward (fp32) must equal the cached decoder's prefill
logits at every position to 1e-5, for a batch of two different rows.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.inference import Decoder
from sparse_lm.model import build_model
from tests.conftest import tiny_config

CFG = dict(layer_prefix=("swa",), layer_cycle=("csa", "hca"), layer_tail=(), num_layers=3,
           num_hash_layers=1, dtype="float32", param_dtype="float32")


@pytest.fixture(scope="module")
def model_and_decoder():
    cfg = tiny_config(**CFG)
    assert list(cfg.layer_kinds) == ["swa", "csa", "hca"]
    model = build_model(cfg, seed=11)
    return model, Decoder(model)


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5, 9])
def test_short_forward_equals_cached_decoder(model_and_decoder, seq_len):
    model, dec = model_and_decoder
    ids = np.asarray(jax.random.randint(jax.random.key(seq_len), (2, seq_len), 0,
                                        model.cfg.vocab_size), np.int32)
    full = np.asarray(nnx.jit(lambda m, i: m(i))(model, jnp.asarray(ids)))
    assert full.shape == (2, seq_len, model.cfg.vocab_size)
    assert np.isfinite(full).all()
    cache = dec.init_cache(2, 16)
    rows, _ = dec.prefill(cache, [ids[0], ids[1]], chunk_size=4, logits="all")
    for r in range(2):
        np.testing.assert_allclose(np.asarray(rows[r]), full[r], atol=1e-5, rtol=0,
                                   err_msg=f"row {r}, S={seq_len}")
