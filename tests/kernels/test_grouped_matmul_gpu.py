"""The Pallas Triton grouped-matmul kernels compiled on a GPU against `lax.ragged_dot`, forward
and backward, with empty experts and one expert receiving all rows (fp32 1e-4 with TF32 off,
bf16 2e-2). Skipped without a GPU (run `bash tools/gpu_check_kernels2.sh`); on a CPU host only
the Triton-lowering check runs (jax.export for an abstract H100, about 3 s)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.grouped_matmul import GroupedMatmulConfig, grouped_matmul
from kernels_pallas.testing import assert_close, has_gpu, requires_gpu

CASES = {
    "empty_and_ragged": ([0, 130, 0, 77, 300, 0, 5, 0], 256, 128, None),
    "one_expert_all": ([0, 0, 0, 512], 128, 256, None),
    "small_tiles": ([3, 0, 61, 17], 64, 48, GroupedMatmulConfig(block_m=16, block_k=16,
                                                                 block_n=16)),
}


def _run(impl, lhs, rhs, gs, cot, config=None):
    def loss(a, b):
        out = grouped_matmul(a, b, gs, implementation=impl, config=config)
        return jnp.sum(out.astype(jnp.float32) * cot), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
    return out, grads


@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matches_ragged_dot(case, dtype):
    sizes, k, n, cfg = CASES[case]
    rng = np.random.default_rng(0)
    m, g = sum(sizes), len(sizes)
    lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(g, k, n)) / np.sqrt(k), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    got = _run("pallas_gpu", lhs.astype(dtype), rhs.astype(dtype), gs, cot, cfg)
    with jax.default_matmul_precision("highest"):
        want = _run("reference", lhs, rhs, gs, cot)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    assert_close("out", got[0], want[0], tol)
    assert_close("dlhs", got[1][0], want[1][0], tol)
    assert_close("drhs", got[1][1], want[1][1], tol)


@pytest.mark.skipif(has_gpu(), reason="a GPU is present: the compiled tests cover this")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_triton_lowering_on_cpu_host(dtype):
    """Forward (1 kernel) and backward (d lhs gmm + tgmm) lower to Triton IR for an H100."""
    from jax import export
    A = jax.ShapeDtypeStruct
    args = (A((1024, 512), dtype), A((8, 512, 256), dtype), A((8,), jnp.int32))

    def fwd(a, b, s):
        return grouped_matmul(a, b, s, implementation="pallas_gpu", interpret=False)

    def grad(a, b, s):
        return jax.grad(lambda a, b: jnp.sum(fwd(a, b, s).astype(jnp.float32)), (0, 1))(a, b)

    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None,
                                         platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    skip = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.sharding.use_abstract_mesh(mesh):
        for fn, kernels in ((fwd, 1), (grad, 2)):
            exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=skip)(*args)
            assert exp.mlir_module().count("xla.gpu.triton") >= kernels
