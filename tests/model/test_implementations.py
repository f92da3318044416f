"""The op registries (`kernels_pallas.registry`, `sparse_lm.ops.implementations`): preference
order per *target* platform (a `target_platform` block, an explicit `platform=`, the mesh in
context), a fallback said once with its reason, an explicit impossible implementation raising
with the reason, old names read as aliases with one deprecation note, and `interpret=None`
resolved from the target platform (a pallas_tpu call lowered under target_platform("tpu") on
this CPU host holds a Mosaic custom call). Seconds."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import registry
from kernels_pallas.block_sparse_attention import api as block_sparse
from kernels_pallas.grouped_matmul import api as gmm_api
from kernels_pallas.testing import requires_libtpu, tpu_aot
from sparse_lm.config import ModelConfig
from sparse_lm.ops import implementations as impls
from sparse_lm.ops import moe

SA = impls.SPARSE_ATTENTION


def _attention_args(h, d, *, listed=True, b=1, s=8, n=2):
    """Shapes only (checks read shapes): q, kv, sink + the keyword arguments of the op."""
    sds = jax.ShapeDtypeStruct
    kw = dict(window=4, scale=0.1, segment_ids=None, compressed=sds((b, n, d), jnp.float32),
              compressed_valid=sds((b, n), jnp.bool_), ratio=4,
              topk_idx=sds((b, s, 2), jnp.int32) if listed else None)
    return (sds((b, s, h, d), jnp.float32), sds((b, s, d), jnp.float32),
            sds((h,), jnp.float32)), kw


def _warnings(caplog, text):
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_preference_order_follows_the_target_platform():
    args, kw = _attention_args(16, 128)
    assert SA.select(*args, **kw).name == "xla"                     # this host: CPU
    with registry.target_platform("tpu"):
        assert registry.current_platform() == "tpu"
        assert SA.select(*args, **kw).name == "pallas_tpu"
        with registry.target_platform("gpu"):                       # innermost block wins
            assert SA.select(*args, **kw).name == "pallas_gpu"
        assert SA.select(*args, platform="cpu", **kw).name == "xla"  # explicit argument first
    assert SA.preference == {"cpu": ("xla",), "tpu": ("pallas_tpu", "xla"),
                             "gpu": ("pallas_gpu", "xla")}
    assert moe.EXPERTS.default_implementation("cpu") == "xla"
    assert moe.EXPERTS.default_implementation("tpu") == "pallas_tpu"
    assert gmm_api.OP.default_implementation("gpu") == "pallas_gpu"
    assert block_sparse.OP.default_implementation("cpu") == "pallas_tpu"   # interpreted


def test_the_mesh_in_context_sets_the_target():
    assert registry.current_platform() == "cpu"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    with jax.sharding.set_mesh(mesh):
        assert registry.current_platform() == "cpu"
        with registry.target_platform("tpu"):                      # the context comes first
            assert registry.current_platform() == "tpu"


@requires_libtpu
def test_abstract_tpu_mesh_sets_the_target():
    with tpu_aot("v5e:2x2"):
        assert registry.current_platform() == "tpu"
        assert registry.resolve_interpret(None) is False


def test_fallback_is_logged_once_with_its_reason(caplog):
    args, kw = _attention_args(4, 16, s=5)    # H=4: no TPU sublane tile
    with caplog.at_level(logging.WARNING, logger="kernels_pallas"), \
            registry.target_platform("tpu"):
        for _ in range(3):
            assert SA.select(*args, **kw).name == "xla"
    warned = _warnings(caplog, "sparse_attention on tpu: implementation 'pallas_tpu'")
    assert len(warned) == 1
    assert "num heads H=4 is unsupported by the compiled TPU kernel" in warned[0].getMessage()


def test_block_sparse_shapes_are_checked_by_the_block_sparse_rules():
    args, kw = _attention_args(16, 128, listed=False)
    with registry.target_platform("gpu"):
        assert SA.select(*args, **kw).name == "pallas_gpu"
    args, kw = _attention_args(16, 96, listed=False)      # no power-of-two head dim for Triton
    with registry.target_platform("gpu"):
        assert SA.select(*args, **kw).name == "xla"
        with pytest.raises(ValueError, match="head_dim=96 is not supported by the compiled GPU"):
            SA.select(*args, implementation="pallas_gpu", **kw)


def test_explicit_impossible_implementation_raises_with_the_reason():
    q = jnp.zeros((1, 8, 4, 16))
    kv = jnp.zeros((1, 8, 16))
    with registry.target_platform("tpu"), \
            pytest.raises(ValueError, match="pallas_tpu.*num heads H=4 is unsupported"):
        impls.sparse_attention(q, kv, jnp.zeros((4,)), window=4, scale=0.25,
                               compressed=jnp.zeros((1, 2, 16)),
                               compressed_valid=jnp.ones((1, 2), bool), ratio=4,
                               topk_idx=jnp.zeros((1, 8, 2), jnp.int32),
                               implementation="pallas_tpu")
    with pytest.raises(ValueError, match="implementation='cuda' is invalid"):
        impls.sparse_attention(q, kv, jnp.zeros((4,)), window=4, scale=0.25,
                               implementation="cuda")


def test_aliases_map_to_the_vocabulary_with_one_note(caplog):
    registry._logged.clear()
    with caplog.at_level(logging.WARNING, logger="kernels_pallas"):
        for _ in range(2):
            assert SA.canonical("pallas") == "pallas_tpu"          # CPU: interpreted TPU kernel
            assert SA.canonical("pallas", platform="gpu") == "pallas_gpu"
            assert block_sparse.OP.canonical("tpu") == "pallas_tpu"
            assert block_sparse.OP.canonical("gpu") == "pallas_gpu"
            assert gmm_api.OP.canonical("ragged_dot") == "reference"
            assert moe.EXPERTS.canonical("blocked") == "xla"
            assert moe.EXPERTS.canonical("grouped", platform="tpu") == "pallas_tpu"
            assert moe.EXPERTS.canonical("grouped", platform="cpu") == "reference"
    notes = _warnings(caplog, "is deprecated")
    assert len(notes) == 8, [r.getMessage() for r in notes]
    assert any("block_sparse_attention: implementation name 'tpu' is deprecated; use "
               "'pallas_tpu'" == r.getMessage() for r in notes)


def test_old_config_names_load_with_a_note(caplog):
    base = ModelConfig().to_dict()
    with caplog.at_level(logging.WARNING, logger="sparse_lm.config"):
        cfg = ModelConfig.from_dict(dict(base, moe_impl="blocked", attention_impl="pallas"))
        again = ModelConfig.from_dict(dict(base, moe_impl="blocked", attention_impl="pallas"))
    assert (cfg.moe_impl, cfg.attention_impl) == ("xla", "pallas_tpu") == (again.moe_impl,
                                                                         again.attention_impl)
    assert len(_warnings(caplog, "moe_impl='blocked'")) <= 1
    assert ModelConfig().moe_impl == "reference"                    # the default: ragged_dot
    assert ModelConfig.from_dict(dict(base, moe_impl="ragged_dot")).moe_impl == "reference"
    assert ModelConfig.from_dict(dict(base, moe_impl="grouped")).moe_impl is None
    assert ModelConfig.from_dict(dict(base, moe_impl="tokamax")).moe_impl == "tokamax"


def test_interpret_follows_the_target_platform():
    args, kw = _attention_args(16, 128)
    assert registry.resolve_interpret(None) is True
    assert SA.select(*args, implementation="pallas_tpu", **kw).interpret is True
    with registry.target_platform("tpu"):
        assert registry.resolve_interpret(None) is False
        assert SA.select(*args, implementation="pallas_tpu", **kw).interpret is False
        assert SA.select(*args, implementation="pallas_tpu", interpret=True, **kw).interpret


@requires_libtpu
def test_pallas_tpu_lowered_under_tpu_target_is_a_mosaic_call():
    b, s, h, d, n = 1, 16, 16, 128, 4

    def f(q, kv, sink, comp, idx):
        return impls.sparse_attention(q, kv, sink, window=8, scale=d ** -0.5, compressed=comp,
                                      compressed_valid=jnp.ones((b, n), bool), ratio=4,
                                      topk_idx=idx, implementation="pallas_tpu")

    with tpu_aot("v5e:2x2") as shaped, registry.target_platform("tpu"):
        args = (shaped((b, s, h, d), jnp.bfloat16), shaped((b, s, d), jnp.bfloat16),
                shaped((h,), jnp.float32), shaped((b, n, d), jnp.bfloat16),
                shaped((b, s, 2), jnp.int32))
        text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_moe_experts_by_name_and_default():
    rng = np.random.default_rng(0)
    t, d, i, e, k = 16, 8, 4, 4, 2
    u = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, e, size=(t, k)), jnp.int32)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    p = [jnp.asarray(rng.normal(size=sh), jnp.float32) for sh in ((e, d, i), (e, d, i), (e, i, d))]
    want = moe.experts_dense_reference(u, idx, w, *p, 10.0)
    for name in (None, "reference", "xla", "ragged_dot", "blocked"):
        got = moe.EXPERT_IMPLEMENTATIONS[name](u, idx, w, *p, 10.0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert set(moe.EXPERT_IMPLEMENTATIONS) == {None, "reference", "xla", "pallas_tpu",
                                               "pallas_gpu", "tokamax"}
    with pytest.raises(KeyError):
        moe.EXPERT_IMPLEMENTATIONS["dense_loop"]


def test_indexer_topk_clips_k_and_handles_no_entries():
    rng = np.random.default_rng(1)
    b, s, h, dd, m = 1, 12, 2, 8, 4
    q = jnp.asarray(rng.normal(size=(b, s, h, dd)), jnp.float32)
    w = jnp.asarray(rng.random((b, s, h)), jnp.float32)
    none = impls.indexer_topk(q, w, jnp.zeros((b, 0, dd)), jnp.ones((b, 0), bool), 4, ratio=m)
    assert none.shape == (b, s, 0) and none.dtype == jnp.int32
    keys = jnp.asarray(rng.normal(size=(b, 3, dd)), jnp.float32)
    got = impls.indexer_topk(q, w, keys, jnp.ones((b, 3), bool), 8, ratio=m,
                             implementation="reference")
    assert got.shape == (b, s, 3)
    np.testing.assert_array_equal(np.asarray(got)[0, :3], -1)        # nothing visible before t=3
