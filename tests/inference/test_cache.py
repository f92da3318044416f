"""Cache layout and accounting.

* Bytes per token of context, measured as the slope of the real cache arrays' sizes between two
  maximum lengths, equal the analytic formula of `sparse_lm.analysis.accounting` for every layer
  kind and in total (fp32 and bf16 caches; tiny, V4-Flash and V4-Pro shapes).
* The fixed-size state (window ring buffers + compressor tails) equals the analytic state size.
* The state part does not grow with max_len; only the entries do.
* Logical axis names cover every cache array with one name per dimension.
"""
import jax
import jax.numpy as jnp
import pytest

from configs import model_presets
from sparse_lm.analysis.accounting import kv_cache_bytes_per_token, kv_cache_state_bytes
from sparse_lm.config import ModelConfig
from sparse_lm.inference.cache import (cache_bytes, cache_logical_axes, init_cache,
                                       measured_bytes_per_token)
from tests.conftest import tiny_config

CONFIGS = {
    "tiny": tiny_config,
    "v4_flash": lambda: ModelConfig.from_dict(model_presets.v4_flash()),
    "v4_pro": lambda: ModelConfig.from_dict(model_presets.v4_pro()),
    # a CSA layer caches what its selector reads: dsa_tokens every token's row and key
    "tiny:dsa_tokens": lambda: tiny_config().replace(selector="dsa_tokens"),
    "tiny:mlp_router": lambda: tiny_config().replace(selector="mlp_router"),
}


def _only(cfg: ModelConfig, kind: str) -> ModelConfig:
    """One layer of `kind` with cfg's shapes: the analytic figure of a single layer."""
    return cfg.replace(num_layers=1, layer_prefix=(), layer_cycle=(kind,), layer_tail=(),
                       num_hash_layers=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,nbytes", [(jnp.float32, 4), (jnp.bfloat16, 2)])
def test_measured_bytes_per_token_equal_analytic(name, dtype, nbytes):
    cfg = CONFIGS[name]()
    measured = measured_bytes_per_token(cfg, dtype=dtype)
    kinds = set(cfg.layer_kinds)
    assert set(measured) == kinds | {"total"}
    for kind in kinds:
        assert measured[kind] == pytest.approx(
            kv_cache_bytes_per_token(_only(cfg, kind), "bf16", dtype_bytes=nbytes), rel=1e-12)
    assert measured["total"] == pytest.approx(
        kv_cache_bytes_per_token(cfg, "bf16", dtype_bytes=nbytes), rel=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_bytes_equal_analytic_and_do_not_grow(name):
    cfg = CONFIGS[name]()
    small, large = (cache_bytes(cfg, jax.eval_shape(lambda n=n: init_cache(cfg, 1, n, jnp.bfloat16)))
                    for n in (1024, 4096))
    state = sum(d["state"] for d in small.values())
    assert state == kv_cache_state_bytes(cfg, "bf16", dtype_bytes=2, state_dtype_bytes=4)
    assert state == sum(d["state"] for d in large.values())
    assert sum(d["entries"] for d in large.values()) > sum(d["entries"] for d in small.values())


def test_real_arrays_match_the_shapes_used_for_accounting():
    """The accounting reads eval_shape; the arrays the decoder allocates have the same sizes."""
    cfg = tiny_config()
    real = cache_bytes(cfg, init_cache(cfg, 2, 64))
    abstract = cache_bytes(cfg, jax.eval_shape(lambda: init_cache(cfg, 2, 64)))
    assert real == abstract
    assert sum(d["layers"] for d in real.values()) == cfg.num_layers


def test_logical_axes_name_every_dimension():
    cfg = tiny_config()
    cache = init_cache(cfg, 2, 64)
    axes = cache_logical_axes(cache)
    leaves = jax.tree.leaves(cache)
    names = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple) and
                            all(isinstance(n, (str, type(None))) for n in x))
    assert len(leaves) == len(names)
    for a, n in zip(leaves, names):
        assert len(n) == a.ndim and "activation_batch" in n


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="max_len"):
        init_cache(tiny_config(), 1, 0)
    with pytest.raises(ValueError, match="batch"):
        init_cache(tiny_config(), 0, 8)
