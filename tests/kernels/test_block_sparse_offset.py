"""Block-sparse attention at a query offset (a context-parallel shard's rows): the shard's call
on [halo | local] rows, its entries' causal mask at global positions offset + row (a traced
offset, the block map planned over the offset range), equals those rows of the unsplit
reference call, out / lse and the gradients in q, kv, compressed and sink; TPU and GPU kernels
interpreted, and the offset reference. Plus the offset arguments' validation. Seconds."""
import jax
import jax.numpy as jnp
import pytest

from kernels_pallas.block_sparse_attention import BlockSizes, block_sparse_attention
from kernels_pallas.testing import assert_close, packed_segment_ids
from sparse_lm.ops import masks
from sparse_lm.ops.implementations import sparse_attention

B, S, H, D, M, W, ROWS, HALO = 2, 32, 2, 16, 4, 6, 8, 8
N = S // M
CONFIG = BlockSizes(block_q=4, block_kv=8, block_q_dkv=4, block_kv_dkv=8)


def _inputs(m=M):
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, S, H, D), jnp.float32)
    kv = jax.random.normal(ks[1], (B, S, D), jnp.float32)
    comp = jax.random.normal(ks[2], (B, S // m, D), jnp.float32)
    sink = jax.random.normal(ks[3], (H,), jnp.float32)
    seg = jnp.asarray(packed_segment_ids(B, S, [13, 11]))      # boundaries inside shards
    valid = masks.window_validity(seg, B, S, m).at[0, 5].set(False)
    return q, kv, comp, sink, seg, valid, jax.random.normal(ks[4], (B, S, H, D), jnp.float32)


def _loss(out, lse, dout):
    return jnp.sum(out * dout) + jnp.sum(jnp.sin(lse))


@pytest.mark.parametrize("impl, packed", [("pallas_tpu", True), ("pallas_gpu", True),
                                          ("reference", True), ("pallas_tpu", False)])
def test_shard_rows_at_an_offset_equal_the_unsplit_rows(impl, packed):
    """packed=False: one document, every entry valid: no data mask, so the blocks the map
    calls full run unmasked at every offset (from the second shard, whose range (0, 16) makes
    the first entry blocks full for the later query blocks at ratio 1; the first shard's halo
    before position 0 needs segment ids to be masked, as sequence_shard_attention gives it)."""
    m = M if packed else 1
    q, kv, comp, sink, seg, valid, dout = _inputs(m)
    if not packed:
        seg, valid = jnp.ones_like(seg), jnp.ones_like(valid)
    kw = dict(window=W, scale=D ** -0.5, ratio=m)
    ent_seg = masks.entry_segments(seg, S // m, m)
    offset_range = (-HALO, S - ROWS - HALO) if packed else (0, S - ROWS - HALO)

    def full(q, kv, comp, sink, lo, hi):
        out, lse = sparse_attention(q, kv, sink, compressed=comp, compressed_valid=valid,
                                    segment_ids=seg if packed else None,
                                    implementation="reference", return_lse=True, **kw)
        return _loss(out[:, lo:hi], lse[:, lo:hi], dout[:, lo:hi]), (out, lse)

    @jax.jit
    def shard(q, kv, comp, sink, start):
        # rows [start, start + HALO + ROWS), start = shard offset - HALO (may be < 0: zeros)
        pad = lambda x: jnp.pad(x, [(0, 0), (HALO, 0)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        take = lambda x: jax.lax.dynamic_slice_in_dim(pad(x), start + HALO, HALO + ROWS, 1)  # noqa: E731
        seg_rows = jnp.where(start + jnp.arange(HALO + ROWS) >= 0, take(seg), -7)

        def loss(q, kv, comp, sink):
            out, lse = block_sparse_attention(
                take(q), take(kv), sink, compressed=comp,
                compressed_valid=valid if packed else None,
                segment_ids=seg_rows if packed else None, query_offset=start,
                offset_range=offset_range,
                compressed_segments=ent_seg if packed else None, implementation=impl,
                config=CONFIG, **kw)
            out, lse = out[:, HALO:], lse[:, HALO:]
            return _loss(out, lse, take(dout)[:, HALO:]), (out, lse)
        return jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(q, kv, comp, sink)

    for offset in range(0 if packed else ROWS, S, ROWS):
        (_, (wo, wl)), wg = jax.value_and_grad(full, (0, 1, 2, 3), has_aux=True)(
            q, kv, comp, sink, offset, offset + ROWS)
        (_, (go, gl)), gg = shard(q, kv, comp, sink, jnp.int32(offset - HALO))
        assert_close(f"out at {offset}", go, wo[:, offset:offset + ROWS], 1e-5)
        assert_close(f"lse at {offset}", gl, wl[:, offset:offset + ROWS], 1e-5)
        for name, g, w in zip(("dq", "dkv", "dcompressed", "dsink"), gg, wg):
            assert_close(f"{name} at {offset}", g, w, 1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(offset_range=None), "offset_range=None is invalid"),
    (dict(offset_range=(4, 0)), "lo <= hi"),
    (dict(compressed_segments=None), "needs compressed_segments"),
    (dict(query_offset=jnp.zeros(2, jnp.int32)), "query_offset must be an integer scalar"),
    (dict(compressed=None, compressed_valid=None), "without compressed entries"),
])
def test_bad_offset_arguments_are_refused(change, match):
    q, kv, comp, sink, seg, valid, _ = _inputs()
    kw = dict(compressed=comp, compressed_valid=valid, segment_ids=seg, query_offset=0,
              offset_range=(0, 8), compressed_segments=masks.entry_segments(seg, N, M))
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, kv, sink, window=W, scale=0.25, ratio=M,
                               implementation="pallas_tpu", **kw)
