"""The Pallas Triton indexer kernel compiled on a GPU equals `lax.top_k` over the naive scores
(integer-valued inputs: exact scores and ties) with packed documents and ragged S, and picks the
reference's best scores on V4-Flash shapes in bf16. Skipped without a GPU (run
`bash tools/gpu_check_kernels2.sh`); on a CPU host only the Triton-lowering check runs
(jax.export for an abstract H100, about 5 s)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.indexer_topk import IndexerTopkConfig, indexer_topk, indexer_topk_reference
from kernels_pallas.indexer_topk.reference import scores as ref_scores
from kernels_pallas.testing import has_gpu, requires_gpu
from sparse_lm.ops import masks


def visibility(s, n, m, key_valid=None, segment_ids=None):
    """[B or 1, S, N] entry visibility of a packed row (`sparse_lm.ops.masks`)."""
    seg_e = None if segment_ids is None else masks.entry_segments(segment_ids, n, m)
    vis = masks.entry_visible(jnp.arange(s), n, m, key_valid, segment_ids, seg_e)
    return vis if vis.ndim == 3 else vis[None]


@requires_gpu
@pytest.mark.parametrize("config", [None, IndexerTopkConfig(block_q=4, block_k=16)])
def test_compiled_exact_on_integer_inputs(config):
    rng = np.random.default_rng(0)
    b, s, h, d, m, k = 2, 300, 16, 32, 4, 24
    n = s // m
    q = jnp.asarray(rng.integers(-2, 3, size=(b, s, h, d)), jnp.float32)
    w = jnp.asarray(rng.integers(-2, 3, size=(b, s, h)) * 0.5, jnp.float32)
    keys = jnp.asarray(rng.integers(-2, 3, size=(b, n, d)), jnp.float32)
    seg = jnp.asarray(np.broadcast_to(np.repeat([0, 1, 2], [101, 120, 79]), (b, s)), jnp.int32)
    win = np.asarray(seg)[:, : n * m].reshape(b, n, m)
    valid = jnp.asarray(np.all(win == win[:, :, :1], axis=-1))
    kw = dict(k=k, ratio=m, key_valid=valid, segment_ids=seg)
    want = indexer_topk_reference(q, w, keys, **kw)
    got = jax.jit(lambda q, w, keys: indexer_topk(q, w, keys, implementation="pallas_gpu",
                                                  interpret=False, config=config,
                                                  return_scores=True, **kw))(q, w, keys)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@requires_gpu
def test_compiled_v4_flash_shape_bf16_picks_best_scores():
    rng = np.random.default_rng(1)
    b, s, h, d, m, k = 1, 4096, 64, 128, 4, 512
    n = s // m
    q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(b, s, h)) / 64, jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, n, d)), jnp.bfloat16)
    idx = indexer_topk(q, w, keys, k=k, ratio=m, implementation="pallas_gpu", interpret=False)
    full = np.asarray(ref_scores(q, w, keys, visibility(s, n, m)))
    want = np.asarray(jax.lax.top_k(jnp.asarray(full), k)[0])
    ix = np.asarray(idx)
    picked = np.where(ix >= 0, np.take_along_axis(full, np.maximum(ix, 0), axis=-1), -np.inf)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(picked), fin)
    np.testing.assert_allclose(np.sort(picked[fin]), np.sort(want[fin]), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(has_gpu(), reason="a GPU is present: the compiled tests cover this")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_triton_lowering_on_cpu_host(dtype):
    from jax import export
    A = jax.ShapeDtypeStruct
    args = (A((1, 2048, 64, 128), dtype), A((1, 2048, 64), jnp.float32), A((1, 512, 128), dtype),
            A((1, 2048), jnp.int32))

    def fn(q, w, keys, seg):
        return indexer_topk(q, w, keys, k=512, ratio=4, segment_ids=seg, return_scores=True,
                            implementation="pallas_gpu", interpret=False)

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                         platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    skip = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(mesh):
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=skip)(*args)
    assert exp.mlir_module().count("xla.gpu.triton") == 1
