"""Wiring of the fused indexer into the model (additive; defaults unchanged): the indexer's
"select" stage (`ops.implementations.indexer_topk`) returns exactly the top-k indices of the model's own
`Indexer.__call__` (dense scores, then `select_topk`) on the tiny config, for a packed row of
documents and for a row shorter than k windows, through every implementation (the Pallas ones
interpreted). About 25 s."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_lm.model.attention import rope_table
from sparse_lm.model.indexer import Indexer
from sparse_lm.model.transformer import segment_positions
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def indexer_and_inputs():
    cfg = tiny_config(index_topk=3)
    ind = Indexer(cfg, rngs=nnx.Rngs(0))
    b, s = 2, 45
    ks = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(ks[0], (b, s, cfg.hidden_size), jnp.float32)
    q_latent = jax.random.normal(ks[1], (b, s, cfg.q_lora_rank), jnp.float32)
    seg = jnp.asarray(np.broadcast_to(np.repeat([0, 1, 2], [14, 19, 12]), (b, s)), jnp.int32)
    return cfg, ind, x, q_latent, seg


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("packed", [True, False])
def test_select_equals_model_topk(indexer_and_inputs, impl, packed):
    cfg, ind, x, q_latent, seg = indexer_and_inputs
    if not packed:
        x, q_latent, seg = x[:, :10], q_latent[:, :10], None     # 2 windows < k = 3
    positions = (segment_positions(seg) if seg is not None
                 else jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))
    inv_freq = rope_table(cfg, "csa")
    _, want, _ = ind(x, q_latent, positions, inv_freq, seg)
    _, got, _ = ind(x, q_latent, positions, inv_freq, seg, stage="select", implementation=impl)
    assert got.shape == want.shape and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.any(np.asarray(want) == -1) and np.any(np.asarray(want) >= 0)
