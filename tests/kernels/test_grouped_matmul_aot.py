"""The Mosaic TPU grouped-matmul kernels (forward gmm, and the backward's transposed-rhs gmm
and tgmm) compile ahead of time for real TPU chips on this CPU host (libtpu + a topology), at
MoE-like shapes with the default tiles, bf16 and fp32. About 10 s."""
import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.grouped_matmul import grouped_matmul
from kernels_pallas.testing import requires_libtpu, tpu_aot

pytestmark = requires_libtpu


@pytest.mark.parametrize("topology,dtype,shape", [
    ("v5e:2x2", jnp.bfloat16, (1024, 512, 256, 8)),     # M, K (hidden), N (expert width), G
    ("v5e:2x2", jnp.float32, (512, 256, 384, 4)),       # N = 384: 128-wide N tiles
    ("v5p:2x2x1", jnp.bfloat16, (2048, 1024, 512, 16)),
])
def test_forward_and_backward_compile(topology, dtype, shape):
    m, k, n, g = shape

    def fwd(a, b, s):
        return grouped_matmul(a, b, s, implementation="pallas_tpu", interpret=False)

    def grad(a, b, s):
        return jax.grad(lambda a, b: jnp.sum(fwd(a, b, s).astype(jnp.float32)), (0, 1))(a, b)

    with tpu_aot(topology) as shaped:
        args = (shaped((m, k), dtype), shaped((g, k, n), dtype), shaped((g,), jnp.int32))
        for fn, kernels in ((fwd, 1), (grad, 2)):
            text = jax.jit(fn).lower(*args).compile().as_text()
            assert text.count("tpu_custom_call") >= kernels, "Mosaic kernels missing from the HLO"
