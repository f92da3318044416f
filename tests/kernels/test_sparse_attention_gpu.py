"""The Pallas Triton CSA kernels compiled (not interpreted) on a GPU, against the reference:
forward (out, lse) and gradients (q, kv, compressed, sink), fp32 1e-5 and bf16 2e-2, on the same
adversarial index lists as the interpret-mode tests, at shapes the Triton tiles accept (H, D
powers of two >= 16). Skipped without a GPU; run by `bash tools/gpu_check.sh` on a GPU machine.
On a CPU host only the Triton-lowering check runs (about 3 s)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.sparse_attention import SparseAttentionConfig, csa_attention, csa_reference
from kernels_pallas.testing import assert_close, csa_inputs, has_gpu, requires_gpu



TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
CASES = {
    # S=37: ragged; K=40 with block_k=16: three chunks, the last half padding; W=8 -> 16-row tile.
    "batch2_ragged": (dict(b=2, s=37, h=16, d=64, n=19, k=40), 8, None,
                      SparseAttentionConfig(block_k=16)),
    "batch1_packed": (dict(b=1, s=64, h=32, d=128, n=16, k=24), 16, [10, 30, 24],
                      SparseAttentionConfig(block_k=16, num_warps=4)),
    "default_config_w128": (dict(b=1, s=200, h=16, d=64, n=50, k=64), 128, [120, 80], None),
}


def _run(fn, q, kv, comp, sink, dout, dlse):
    def loss(q, kv, comp, sink):
        out, lse = fn(q, kv, comp, sink)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse), (out, lse)
    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3),
                                                        has_aux=True))(q, kv, comp, sink)
    return out, lse, grads


def _check(shape, window, segments, config, dtype, idx=None, seed=0):
    q, kv, comp, topk, sink, seg = csa_inputs(seed, dtype=dtype, segments=segments, **shape)
    topk = topk if idx is None else idx
    kw = dict(window=window, scale=1.0 / np.sqrt(shape["d"]), segment_ids=seg)
    ks = jax.random.split(jax.random.key(seed + 1), 2)
    dout = jax.random.normal(ks[0], q.shape, jnp.float32)
    dlse = jax.random.normal(ks[1], q.shape[:3], jnp.float32)
    got = _run(lambda q, kv, c, s: csa_attention(q, kv, c, topk, s, implementation="pallas_gpu",
                                                 interpret=False, config=config, **kw),
               q, kv, comp, sink, dout, dlse)
    f32 = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = _run(lambda q, kv, c, s: csa_reference(q, kv, c, topk, s, **kw),
                    f32(q), f32(kv), f32(comp), sink, dout, dlse)
    tol = TOL[dtype]
    assert_close("out", got[0], want[0], tol)
    assert_close("lse", got[1], want[1], tol)
    for name, g, w in zip(("dq", "dkv", "dcompressed", "dsink"), got[2], want[2]):
        assert_close(name, g, w, tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@requires_gpu
def test_compiled_matches_reference(case, dtype):
    shape, window, segments, config = CASES[case]
    _check(shape, window, segments, config, dtype)


@requires_gpu
def test_compiled_v4_flash_shape_bf16():
    """V4-Flash tiles with the default config: 64 heads x 512 wide, window 128, top-k 512 over
    N = 300 entries (the list holds -1 padding and duplicates), bf16, forward and gradients (the
    first H100 run of the backward at this width overflowed shared memory)."""
    _check(dict(b=1, s=160, h=64, d=512, n=300, k=512), 128, None, None, jnp.bfloat16)


@requires_gpu
def test_compiled_empty_rows_and_shared_duplicates():
    shape = dict(b=2, s=33, h=16, d=32, n=5, k=16)
    idx = np.tile(np.array([0, 0, 2, 2, 2, 4] + [-1] * 10, np.int32), (2, 33, 1))
    idx[:, ::3] = -1                                    # every third row: no entry at all
    _check(shape, 4, None, SparseAttentionConfig(block_k=16), jnp.float32, idx=jnp.asarray(idx))


@pytest.mark.skipif(has_gpu(), reason="a GPU is present: the compiled tests cover this")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_triton_lowering_on_cpu_host(dtype):
    """Without a GPU, the forward and backward kernels still lower to Triton IR for an H100
    (jax.export for "cuda" under an abstract H100 device): catches Pallas-Triton lowering errors
    (unsupported ops, gathers, atomics, dot shapes) that interpret mode cannot; PTX compilation
    itself happens only on the GPU."""
    from jax import export
    b, s, h, d, n, k = 1, 40, 16, 64, 12, 40
    A = jax.ShapeDtypeStruct
    args = (A((b, s, h, d), dtype), A((b, s, d), dtype), A((b, n, d), dtype),
            A((b, s, k), jnp.int32), A((h,), jnp.float32), A((b, s), jnp.int32))
    cfg = SparseAttentionConfig(block_k=16)

    def fwd(q, kv, c, idx, sink, seg):
        return csa_attention(q, kv, c, idx, sink, window=8, scale=0.1, segment_ids=seg,
                             implementation="pallas_gpu", interpret=False, config=cfg)

    def grad(q, kv, c, idx, sink, seg):
        loss = lambda q, kv, c, sink: jnp.sum(fwd(q, kv, c, idx, sink, seg)[0].astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, kv, c, sink)

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                         platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    skip = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, kernels in ((fwd, 1), (grad, 2)):
            exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=skip)(*args)
            text = exp.mlir_module()
            assert text.count("xla.gpu.triton") >= kernels
