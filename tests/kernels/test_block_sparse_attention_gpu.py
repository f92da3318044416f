"""Block-sparse attention GPU kernels compiled (not interpreted) on a real GPU, against the model's
dense reference: out, lse and gradients, fp32 (1e-5) and bf16 (2e-2), HCA with packed documents
and a dropped entry (batch 2, ragged S), SWA (batch 1), and a V4-Flash-shaped bf16 case with the
default block sizes. Skipped without a GPU (run `bash tools/gpu_check.sh` on a GPU machine)."""
import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.block_sparse_attention import BlockSizes, block_sparse_attention
from kernels_pallas.testing import assert_close, requires_gpu
from sparse_lm.ops.implementations import sparse_attention
from tests.kernels.test_block_sparse_attention import TOL, _inputs, _value_and_grads

# name -> (shape, window, segments, drop an entry, config, dtype); tiles are Triton-legal
# (block_q x heads and block_kv powers of two >= 16).
CASES = {
    "hca_batch2_packed_fp32": (dict(b=2, s=100, h=4, d=32, ratio=8), 12, [37, 63], True,
                               BlockSizes(block_q=4, block_kv=16), jnp.float32),
    "swa_batch1_fp32": (dict(b=1, s=77, h=8, d=16, ratio=0), 9, None, False,
                        BlockSizes(block_q=2, block_kv=16), jnp.float32),
    "hca_batch2_packed_bf16": (dict(b=2, s=100, h=4, d=32, ratio=8), 12, [37, 63], True,
                               BlockSizes(block_q=4, block_kv=32, block_kv_dkv=16), jnp.bfloat16),
    "hca_v4_flash_shape_bf16": (dict(b=1, s=300, h=64, d=512, ratio=16), 128, None, False, None,
                                jnp.bfloat16),
}


@requires_gpu
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_gpu_kernel_matches_reference(case):
    shape, window, segments, drop, config, dtype = CASES[case]
    q, kv, comp, valid, sink, seg = _inputs(11, dtype=dtype, segments=segments, drop_entry=drop,
                                            **shape)
    kw = dict(window=window, scale=float(shape["d"]) ** -0.5, segment_ids=seg,
              ratio=shape["ratio"])
    ks = jax.random.split(jax.random.key(12), 2)
    dout = jax.random.normal(ks[0], q.shape, jnp.float32)
    dlse = jax.random.normal(ks[1], q.shape[:3], jnp.float32)
    valid_k = valid if (segments or drop) else None
    got = _value_and_grads(lambda q, kv, c, s: block_sparse_attention(
        q, kv, s, compressed=c, compressed_valid=valid_k, implementation="pallas_gpu", interpret=False,
        config=config, **kw), q, kv, comp, sink, dout, dlse)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = _value_and_grads(lambda q, kv, c, s: sparse_attention(
            q, kv, s, compressed=c, compressed_valid=valid, implementation="reference",
            return_lse=True, **kw), f32(q), f32(kv), f32(comp), sink, dout, dlse)
    tol = TOL[dtype]
    assert_close("out", got[0], want[0], tol)
    assert_close("lse", got[1], want[1], tol)
    for name, g, w in zip(("dq", "dkv", "dcompressed", "dsink"), got[2], want[2]):
        if w is None:
            assert g is None, name
            continue
        assert_close(name, g, w, tol)
