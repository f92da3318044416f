"""CSA token-sparse attention kernels (TPU Mosaic and GPU Triton, both interpreted on CPU) against
the model's dense reference: forward (out, lse) and gradients (q, kv, compressed, sink), on index
lists with empty rows, -1 padding first/last, duplicates, heavy overlap, ragged S, packed
documents, batch 1 and 2. Plus input validation. About 60 s on 2 CPU cores."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import compat
from kernels_pallas.sparse_attention import (SparseAttentionConfig, csa_attention, csa_reference,
                                             default_implementation)
from kernels_pallas.testing import assert_close, csa_inputs, interpret_default

IMPLS = ["pallas_tpu", "pallas_gpu"]
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# name -> (shape kwargs, window, segments, config). block_q=8 and S=19/21 make S ragged;
# block_k=4 with K=5/6 gives two chunks, the second one half -1 padding; bwd_block_s=8 runs the
# TPU backward in 3 query chunks.
CASES = {
    "batch2_ragged": (dict(b=2, s=19, h=4, d=16, n=7, k=5), 4, None,
                      SparseAttentionConfig(block_q=8, block_k=4, bwd_block_s=8)),
    "batch1_packed": (dict(b=1, s=21, h=4, d=16, n=6, k=6), 6, [5, 9, 4],
                      SparseAttentionConfig(block_q=8, block_k=4)),
    "window1_single_chunk": (dict(b=1, s=9, h=2, d=8, n=3, k=3), 1, None, None),
    "window_exceeds_S": (dict(b=2, s=11, h=4, d=8, n=4, k=2), 16, [4, 7], None),
}


def _loss_and_grads(fn, q, kv, comp, sink, dout, dlse):
    """Forward outputs and d/d(q, kv, compressed, sink) of <out, dout> + <lse, dlse>."""
    def loss(q, kv, comp, sink):
        out, lse = fn(q, kv, comp, sink)
        return (jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse)), (out, lse)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    (_, (out, lse)), grads = step(q, kv, comp, sink)   # one compile: much faster than eager
    return out, lse, grads


def _check(impl, shape, window, segments, config, dtype, seed=0, idx=None):
    q, kv, comp, topk, sink, seg = csa_inputs(seed, dtype=dtype, segments=segments, **shape)
    if idx is not None:
        topk = idx
    scale = 1.0 / np.sqrt(shape["d"])
    kw = dict(window=window, scale=scale, segment_ids=seg)
    ks = jax.random.split(jax.random.key(seed + 1), 2)
    dout = jax.random.normal(ks[0], q.shape, jnp.float32)
    dlse = jax.random.normal(ks[1], q.shape[:3], jnp.float32)
    got = _loss_and_grads(lambda q, kv, c, s: csa_attention(
        q, kv, c, topk, s, implementation=impl, interpret=True, config=config, **kw),
        q, kv, comp, sink, dout, dlse)
    # The reference runs in fp32 on the same (rounded) inputs; bf16 kernels are judged at 2e-2.
    f32 = lambda x: x.astype(jnp.float32)
    want = _loss_and_grads(lambda q, kv, c, s: csa_reference(q, kv, c, topk, s, **kw),
                           f32(q), f32(kv), f32(comp), sink, dout, dlse)
    tol = TOL[dtype]
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    assert_close("out", got[0], want[0], tol)
    assert_close("lse", got[1], want[1], tol)
    for name, g, w in zip(("dq", "dkv", "dcompressed", "dsink"), got[2], want[2]):
        assert_close(name, g, w, tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(impl, case):
    shape, window, segments, config = CASES[case]
    _check(impl, shape, window, segments, config, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_bf16(impl):
    shape, window, segments, config = CASES["batch1_packed"]
    _check(impl, shape, window, segments, config, jnp.bfloat16, seed=3)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_row_without_compressed_entries(impl):
    """All indices -1: only window + sink remain; no NaN from the empty compressed part."""
    shape = dict(b=1, s=10, h=2, d=8, n=5, k=4)
    idx = -jnp.ones((1, 10, 4), jnp.int32)
    _check(impl, shape, 3, None, SparseAttentionConfig(block_q=8, block_k=2), jnp.float32,
           idx=idx)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_queries_share_duplicated_entries(impl):
    """Every query lists entries {0, 0, 2, 2, 2, N-1}: gradients of shared rows must sum over all
    queries and listings (atomics / scatter-add), and a duplicate counts once per listing."""
    shape = dict(b=2, s=12, h=2, d=8, n=4, k=6)
    row = jnp.array([0, 0, 2, 2, 2, 3], jnp.int32)
    idx = jnp.broadcast_to(row, (2, 12, 6))
    _check(impl, shape, 2, [5, 7], SparseAttentionConfig(block_q=8, block_k=4), jnp.float32,
           idx=idx)


def test_gpu_backward_in_head_groups():
    """bwd_heads=2 of 4 heads and bwd_block_k=2 (forward block_k=4): the GPU backward runs two
    programs per query (its q / dout tiles halved) over its own chunking of the list and window;
    dq per group and dK summed over the groups equal the reference (packed documents, shared
    duplicated entries)."""
    shape = dict(b=2, s=12, h=4, d=8, n=4, k=6)
    idx = jnp.broadcast_to(jnp.array([0, 0, 2, -1, 2, 3], jnp.int32), (2, 12, 6))
    _check("pallas_gpu", shape, 3, [5, 7], SparseAttentionConfig(block_k=4, bwd_heads=2,
                                                             bwd_block_k=2),
           jnp.float32, idx=idx)


def test_duplicate_listing_counts_twice():
    """The property the kernels inherit from the reference: listing an entry twice equals adding
    log 2 to its logit (so a duplicate is not the same as a single listing)."""
    q, kv, comp, _, sink, _ = csa_inputs(5, b=1, s=4, h=2, d=8, n=3, k=2)
    once = jnp.array([[[1, -1]] * 4], jnp.int32)
    twice = jnp.array([[[1, 1]] * 4], jnp.int32)
    run = jax.jit(lambda idx: csa_attention(q, kv, comp, idx, sink, window=2, scale=0.3,
                                            implementation="pallas_tpu", interpret=True)[0])
    o1, o2 = run(once), run(twice)
    r2, _ = csa_reference(q, kv, comp, twice, sink, window=2, scale=0.3)
    assert float(jnp.max(jnp.abs(o1 - o2))) > 1e-3
    assert_close("out", o2, r2, 1e-5)


def test_interpret_none_means_interpret_on_cpu_and_default_is_xla():
    assert compat.backend() == "cpu" and interpret_default() is True
    assert default_implementation("cpu") == "xla"
    assert default_implementation("tpu") == "pallas_tpu"
    assert default_implementation("gpu") == "pallas_gpu"
    q, kv, comp, idx, sink, seg = csa_inputs(2, b=1, s=8, h=2, d=8, n=3, k=2, segments=[3, 5])
    kw = dict(window=3, scale=0.35, segment_ids=seg)
    want = csa_reference(q, kv, comp, idx, sink, **kw)
    for impl in (None, "pallas_gpu"):  # None -> xla on CPU; pallas with interpret=None runs
        got = jax.jit(lambda q: csa_attention(q, kv, comp, idx, sink, implementation=impl,
                                              **kw))(q)
        assert_close("out", got[0], want[0], 1e-5)
        assert_close("lse", got[1], want[1], 1e-5)


# ------------------------------------------------------------------------------- validation

def _args(**over):
    q, kv, comp, idx, sink, _ = csa_inputs(0, b=1, s=8, h=4, d=16, n=5, k=3)
    a = dict(q=q, kv=kv, compressed=comp, topk_idx=idx, sink=sink)
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,match", [
    (dict(topk_idx=jnp.zeros((1, 8, 3), jnp.int64 if jax.config.jax_enable_x64 else jnp.int16)),
     TypeError, "topk_idx has dtype"),
    (dict(topk_idx=jnp.zeros((1, 8, 3), jnp.float32)), TypeError, "topk_idx has dtype"),
    (dict(topk_idx=jnp.zeros((1, 7, 3), jnp.int32)), ValueError, "topk_idx has shape"),
    (dict(topk_idx=jnp.zeros((1, 8), jnp.int32)), ValueError, "topk_idx has shape"),
    (dict(topk_idx=jnp.full((1, 8, 3), 5, jnp.int32)), ValueError, "out of range for N=5"),
    (dict(topk_idx=jnp.full((1, 8, 3), -2, jnp.int32)), ValueError, "only negative value"),
    (dict(kv=jnp.zeros((1, 8, 2, 16))), ValueError, "kv has shape"),
    (dict(compressed=jnp.zeros((1, 5, 8))), ValueError, "compressed has shape"),
    (dict(sink=jnp.zeros((3,))), ValueError, "sink has shape"),
    (dict(kv=jnp.zeros((1, 8, 16), jnp.bfloat16)), TypeError, "kv has dtype"),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_fail_before_launch(impl, over, exc, match):
    with pytest.raises(exc, match=match):
        csa_attention(**_args(**over), window=4, scale=0.25, implementation=impl, interpret=True)


def test_bad_arguments_name_the_field():
    a = _args()
    with pytest.raises(ValueError, match="implementation='cuda'"):
        csa_attention(**a, window=4, scale=0.25, implementation="cuda")
    with pytest.raises(ValueError, match="window=0"):
        csa_attention(**a, window=0, scale=0.25, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="segment_ids has shape"):
        csa_attention(**a, window=4, scale=0.25, segment_ids=jnp.zeros((1, 9), jnp.int32),
                      implementation="pallas_tpu")
    with pytest.raises(ValueError, match="block_q=12"):
        SparseAttentionConfig(block_q=12)
    with pytest.raises(ValueError, match="block_k=0"):
        SparseAttentionConfig(block_k=0)


def test_compiled_tile_constraints_fail_before_launch():
    """Head counts / head dims / block sizes the compiled kernels cannot tile are rejected up front
    (checked without compiling: interpret=False on this CPU host stops at validation)."""
    a = _args()  # H=4, D=16
    with pytest.raises(ValueError, match="num heads H=4 is unsupported by the compiled TPU"):
        csa_attention(**a, window=4, scale=0.25, implementation="pallas_tpu", interpret=False)
    with pytest.raises(ValueError, match="num heads H=4 is unsupported by the compiled GPU"):
        csa_attention(**a, window=4, scale=0.25, implementation="pallas_gpu", interpret=False)
    q, kv, comp, idx, sink, _ = csa_inputs(0, b=1, s=8, h=16, d=128, n=5, k=3)
    with pytest.raises(ValueError, match="block_k=64 is invalid for the compiled TPU"):
        csa_attention(q, kv, comp, idx, sink, window=4, scale=0.1, implementation="pallas_tpu",
                      interpret=False, config=SparseAttentionConfig(block_k=64))
    with pytest.raises(ValueError, match="block_k=24 is invalid for the compiled GPU"):
        csa_attention(q, kv, comp, idx, sink, window=4, scale=0.1, implementation="pallas_gpu",
                      interpret=False, config=SparseAttentionConfig(block_k=24))


def test_tpu_kernels_under_tpu_semantics_interpreter():
    """The TPU interpreter that simulates DMAs, semaphores and VMEM (with race detection) runs
    the forward and the chunked backward to the reference values: the DMA start/wait pairing of
    the double-buffered gathers and write-outs is right, not just the math."""
    from jax.experimental.pallas import tpu as pltpu
    from kernels_pallas.sparse_attention import tpu
    q, kv, comp, idx, sink, seg = csa_inputs(0, b=1, s=12, h=2, d=8, n=5, k=5, segments=[5, 7])
    cfg = SparseAttentionConfig(block_q=8, block_k=4, bwd_block_s=8)
    kw = dict(window=3, scale=0.3, segment_ids=seg, cfg=cfg,
              interpret=pltpu.InterpretParams(detect_races=True))
    out, lse = tpu.csa_fwd_tpu(q, kv, comp, idx, sink, **kw)
    dout = jax.random.normal(jax.random.key(1), out.shape)
    grads = tpu.csa_bwd_tpu(q, kv, comp, idx, sink, out, lse, dout, **kw)
    ref = lambda q, kv, c, s: csa_reference(q, kv, c, idx, s, window=3, scale=0.3,
                                            segment_ids=seg)
    want_out, want_lse = ref(q, kv, comp, sink)
    want_grads = jax.grad(lambda *a: jnp.sum(ref(*a)[0] * dout), argnums=(0, 1, 2, 3))(
        q, kv, comp, sink)
    assert_close("out", out, want_out, 1e-5)
    assert_close("lse", lse, want_lse, 1e-5)
    for name, g, w in zip(("dq", "dkv", "dcompressed", "dsink"), grads, want_grads):
        assert_close(name, g, w, 1e-5)
    try:  # race report of the TPU interpreter (internal module; absent in other versions)
        from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc
    except ImportError:
        return
    races = getattr(ipc, "races", None)
    assert races is None or not races.races_found, "the TPU interpreter found a race"
