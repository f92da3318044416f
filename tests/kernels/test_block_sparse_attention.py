"""Block-sparse HCA / SWA attention: the host-side block map against a brute-force element mask,
and the TPU (Mosaic) and GPU (Triton) kernels, interpreted on CPU, against the model's dense
reference (`sparse_lm.ops.implementations.sparse_attention`, implementation="reference"): out, lse and the gradients in
q, kv, compressed and sink, on ragged S, packed documents with invalid entries, batch 1 and 2,
SWA and HCA, fp32 (1e-5) and bf16 (2e-2). Plus input validation. About 70 s on 2 CPU cores."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.block_sparse_attention import (BlockSizes, block_sparse_attention,
                                                   default_block_sizes)
from kernels_pallas.block_sparse_attention import mask as mask_lib
from kernels_pallas.block_sparse_attention import reference
from kernels_pallas.testing import assert_close, packed_segment_ids
from sparse_lm.ops.implementations import sparse_attention
from sparse_lm.ops.masks import window_validity

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


# ------------------------------------------------------------------------------ block map

def _element_visibility(geom):
    """[q_pad, num_keys] bool straight from the rule (only real queries see anything)."""
    t = np.arange(geom.q_pad)[:, None]
    j = np.arange(geom.num_keys)[None, :]
    in_win = (j < geom.seq) & (j <= t) & (t - j < geom.window)
    e = j - geom.win_pad
    in_comp = (e >= 0) & (e < geom.num_entries) & (e < (t + 1) // max(geom.ratio, 1))
    return (in_win | in_comp) & (t < geom.seq)


GEOMETRIES = [(s, w, r, bq, bk)
              for s, w, r, (bq, bk) in itertools.product(
                  [1, 7, 16, 37], [1, 3, 8, 100], [0, 3, 4, 8], [(1, 4), (4, 4), (8, 16), (3, 5)])]


@pytest.mark.parametrize("s,w,r,bq,bk", GEOMETRIES)
def test_block_map_is_exact(s, w, r, bq, bk):
    """Visited blocks = blocks with a visible pair; full blocks = blocks whose every real query
    sees every key (and no padding); the dkv map is the exact transpose of the forward map."""
    geom = mask_lib.make_geometry(s, w, s // r if r else 0, r, q_multiple=bq, kv_multiple=bk)
    vis = _element_visibility(geom)
    nq, nk = geom.q_pad // bq, geom.num_keys // bk
    blocks = vis.reshape(nq, bq, nk, bk)
    real_q = (np.arange(geom.q_pad) < s).reshape(nq, bq)
    any_vis = blocks.any(axis=(1, 3))
    all_vis = np.all(blocks | ~real_q[:, :, None, None], axis=(1, 3)) & real_q.any(1)[:, None]
    fwd = mask_lib.decode(mask_lib.query_block_map(geom, bq, bk), nk)
    np.testing.assert_array_equal(fwd > 0, any_vis)
    np.testing.assert_array_equal(fwd == mask_lib.FULL, all_vis)
    bwd = mask_lib.decode(mask_lib.key_block_map(geom, bq, bk), nq)
    np.testing.assert_array_equal(bwd.T, fwd)


def test_block_map_work_is_sparse():
    """The HCA map visits far fewer blocks than the dense causal map, and rows stay short."""
    s, bq, bk = 4096, 8, 128
    hca = mask_lib.make_geometry(s, 128, s // 128, 128, q_multiple=bq, kv_multiple=bk)
    dense = mask_lib.make_geometry(s, s, 0, 0, q_multiple=bq, kv_multiple=bk)
    f_hca = mask_lib.visited_fraction(hca, bq, bk)
    f_dense = mask_lib.visited_fraction(dense, bq, bk)
    assert 0.45 < f_dense < 0.55                      # causal: about half of all block pairs
    assert f_hca * (dense.num_keys // bk) < 4 * (hca.num_keys // bk)
    assert mask_lib.steps_per_row(mask_lib.query_block_map(hca, bq, bk)).max() <= 3


def test_block_map_runs_beyond_2_15_blocks():
    """The GPU default at S = 128K (one query of 64 heads per dkv block, 64-key blocks): the dkv
    map of the dense causal geometry has runs of up to 131072 query blocks starting past 2**15,
    and encodes them exactly (key block b is visited by queries 64 b .. S - 1; the first 63
    queries of its own diagonal see it only partially)."""
    s, bk = 1 << 17, 64
    geom = mask_lib.make_geometry(s, s, 0, 0, q_multiple=1, kv_multiple=bk)
    kmap = mask_lib.key_block_map(geom, 1, bk)
    b = np.arange(s // bk)
    np.testing.assert_array_equal(mask_lib.steps_per_row(kmap), s - bk * b)
    for row in (0, 700, s // bk - 1):
        runs = [(int(st), int(w) >> 1, int(w) & 1) for st, w in kmap[row] if w]
        first_full = bk * row + bk - 1
        assert runs == [(bk * row, bk - 1, 0), (first_full, s - first_full, 1)]
    qmap = mask_lib.query_block_map(geom, 1, bk)
    np.testing.assert_array_equal(mask_lib.steps_per_row(qmap), np.arange(s) // bk + 1)


def test_block_map_packed_limit():
    """A run that does not fit the packed int32 words is refused with an actionable message."""
    big = np.array([[mask_lib.MAX_BLOCKS]])
    with pytest.raises(ValueError, match="use larger blocks"):
        mask_lib._pack(big, np.ones_like(big), np.zeros(big.shape, bool), "query")


# -------------------------------------------------------------------------- numerics

def _inputs(seed, *, b, s, h, d, ratio, dtype, segments=None, drop_entry=False):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, s, h, d), jnp.float32).astype(dtype)
    kv = jax.random.normal(ks[1], (b, s, d), jnp.float32).astype(dtype)
    n = s // ratio if ratio else 0
    comp = jax.random.normal(ks[2], (b, n, d), jnp.float32).astype(dtype) if ratio else None
    sink = jax.random.normal(ks[3], (h,), jnp.float32)
    seg = None if segments is None else jnp.asarray(packed_segment_ids(b, s, segments))
    valid = window_validity(seg, b, s, ratio) if ratio else None
    if drop_entry and ratio:
        valid = valid.at[0, 1].set(False)   # an entry invalid for reasons other than packing
    return q, kv, comp, valid, sink, seg


def _value_and_grads(fn, q, kv, comp, sink, dout, dlse):
    """(out, lse) and d/d(q, kv, compressed, sink) of <out, dout> + <lse, dlse>, one jit."""
    def loss(q, kv, comp, sink):
        out, lse = fn(q, kv, comp, sink)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(lse * dlse), (out, lse)
    (_, (out, lse)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, kv, comp, sink)
    return out, lse, grads


# name -> (shape, window, segments, drop an entry, config). S = 37 / 21 / 19 are ragged for
# every block size used; block_kv = 8 puts window and compressed keys in several blocks.
CASES = {
    "hca_batch2_packed": (dict(b=2, s=37, h=2, d=16, ratio=4), 5, [12, 25], True,
                          BlockSizes(block_q=4, block_kv=8, block_q_dkv=2, block_kv_dkv=16)),
    "hca_batch1_ragged": (dict(b=1, s=21, h=4, d=16, ratio=8), 6, None, False,
                          BlockSizes(block_q=2, block_kv=8)),
    "swa_batch2": (dict(b=2, s=19, h=2, d=8, ratio=0), 4, None, False,
                   BlockSizes(block_q=4, block_kv=4)),
    "swa_batch1_packed": (dict(b=1, s=19, h=2, d=8, ratio=0), 7, [5, 9], False,
                          BlockSizes(block_q=4, block_kv=8)),
}


def _check(impl, case, dtype, seed=0):
    shape, window, segments, drop, config = CASES[case]
    q, kv, comp, valid, sink, seg = _inputs(seed, dtype=dtype, segments=segments,
                                            drop_entry=drop, **shape)
    ratio = shape["ratio"]
    kw = dict(window=window, scale=float(shape["d"]) ** -0.5, segment_ids=seg, ratio=ratio)
    ks = jax.random.split(jax.random.key(seed + 1), 2)
    dout = jax.random.normal(ks[0], q.shape, jnp.float32)
    dlse = jax.random.normal(ks[1], q.shape[:3], jnp.float32)
    # Without packing or dropped entries the kernel gets compressed_valid=None: its fast path,
    # where positionally full blocks skip the mask (the reference still gets the all-true mask).
    valid_k = valid if (segments or drop) else None
    got = _value_and_grads(lambda q, kv, c, s: block_sparse_attention(
        q, kv, s, compressed=c, compressed_valid=valid_k, implementation=impl, interpret=True,
        config=config, **kw), q, kv, comp, sink, dout, dlse)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)  # noqa: E731
    want = _value_and_grads(lambda q, kv, c, s: sparse_attention(
        q, kv, s, compressed=c, compressed_valid=valid, implementation="reference",
        return_lse=True, **kw), f32(q), f32(kv), f32(comp), sink, dout, dlse)
    tol = TOL[dtype]
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    assert_close("out", got[0], want[0], tol)
    assert_close("lse", got[1], want[1], tol)
    names = ("dq", "dkv", "dcompressed", "dsink")
    for name, g, w in zip(names, got[2], want[2]):
        if w is None:
            assert g is None, name
            continue
        assert_close(name, g, w, tol)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_fp32(impl, case):
    _check(impl, case, jnp.float32)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_matches_reference_bf16(impl):
    _check(impl, "hca_batch2_packed", jnp.bfloat16, seed=3)


# GPU row tiles (block_rows*): a query block's block_q x heads rows split into tiles of fewer
# rows, also fewer than the heads (the sink slice of a tile then starts mid-query).
ROW_TILE_CASES = {
    "hca_packed_tiles_of_8_4_2": (dict(b=2, s=37, h=4, d=16, ratio=4), 5, [12, 25], True,
                                  BlockSizes(block_q=4, block_kv=8, block_rows=8,
                                             block_rows_dq=4, block_rows_dkv=2)),
    "swa_tiles_of_2": (dict(b=1, s=19, h=4, d=8, ratio=0), 6, None, False,
                       BlockSizes(block_q=2, block_kv=4, block_q_dkv=4, block_rows=2,
                                  block_rows_dq=2, block_rows_dkv=2)),
}


@pytest.mark.parametrize("case", list(ROW_TILE_CASES))
def test_gpu_kernel_row_tiles_match_reference(case, monkeypatch):
    monkeypatch.setitem(CASES, case, ROW_TILE_CASES[case])
    _check("pallas_gpu", case, jnp.float32, seed=4)


def test_dense_causal_baseline_and_defaults():
    """window >= S with no entries is plain causal attention with a sink (the benchmark's dense
    baseline); implementation=None / interpret=None / config=None pick the interpreted kernel."""
    q, kv, _, _, sink, _ = _inputs(5, b=1, s=24, h=2, d=8, ratio=0, dtype=jnp.float32)
    out, lse = block_sparse_attention(q, kv, sink, window=1000, scale=0.3)
    ref_out, ref_lse = sparse_attention(q, kv, sink, window=24, scale=0.3,
                                        implementation="reference", return_lse=True)
    assert_close("out", out, ref_out, 1e-5)
    assert_close("lse", lse, ref_lse, 1e-5)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_sequence_shorter_than_ratio_is_window_only(impl):
    """S < ratio: no compressed entry exists (N = 0), the layer is plain SWA with a sink."""
    q, kv, _, _, sink, _ = _inputs(2, b=2, s=5, h=2, d=8, ratio=0, dtype=jnp.float32)
    comp = jnp.zeros((2, 0, 8))
    out, lse = block_sparse_attention(q, kv, sink, window=3, scale=0.3, compressed=comp,
                                      compressed_valid=jnp.ones((2, 0), bool), ratio=8,
                                      implementation=impl, interpret=True)
    ref_out, ref_lse = sparse_attention(q, kv, sink, window=3, scale=0.3,
                                        implementation="reference", return_lse=True)
    assert_close("out", out, ref_out, 1e-5)
    assert_close("lse", lse, ref_lse, 1e-5)


@pytest.mark.parametrize("case", ["hca_batch2_packed", "swa_batch1_packed"])
def test_reference_matches_model_reference(case):
    shape, window, segments, drop, _ = CASES[case]
    q, kv, comp, valid, sink, seg = _inputs(7, dtype=jnp.float32, segments=segments,
                                            drop_entry=drop, **shape)
    kw = dict(window=window, scale=0.25, segment_ids=seg, compressed=comp,
              compressed_valid=valid, ratio=shape["ratio"])
    got = reference.attention(q, kv, sink, **kw)
    want = sparse_attention(q, kv, sink, implementation="reference", return_lse=True, **kw)
    assert_close("out", got[0], want[0], 1e-5)
    assert_close("lse", got[1], want[1], 1e-5)


# ------------------------------------------------------------------------------ validation

def _small():
    q, kv, comp, valid, sink, seg = _inputs(0, b=1, s=16, h=2, d=8, ratio=4, dtype=jnp.float32,
                                            segments=[8, 8])
    return q, kv, comp, valid, sink, seg


@pytest.mark.parametrize("change,match", [
    (dict(kv=lambda a: a["kv"][:, :8]), "kv has shape"),
    (dict(kv=lambda a: a["kv"].astype(jnp.bfloat16)), "kv has dtype"),
    (dict(sink=lambda a: a["sink"][:1]), "sink has shape"),
    (dict(compressed=lambda a: a["compressed"][..., :4]), "compressed has shape"),
    (dict(compressed_valid=lambda a: a["compressed_valid"].astype(jnp.int32)), "compressed_valid"),
    (dict(segment_ids=lambda a: a["segment_ids"][:, :3]), "segment_ids has shape"),
    (dict(ratio=lambda a: 0), "ratio"),
    (dict(window=lambda a: 0), "window"),
    (dict(implementation=lambda a: "cuda"), "implementation"),
    (dict(config=lambda a: {"block_q": 8}), "config"),
])
def test_bad_input_is_refused(change, match):
    q, kv, comp, valid, sink, seg = _small()
    args = dict(q=q, kv=kv, sink=sink, window=4, scale=0.3, compressed=comp, compressed_valid=valid,
                ratio=4, segment_ids=seg, implementation="pallas_tpu", interpret=True, config=None)
    for k, f in change.items():
        args[k] = f(args)
    with pytest.raises((ValueError, TypeError), match=match):
        block_sparse_attention(**args)


@pytest.mark.parametrize("impl,config,heads,match", [
    ("pallas_tpu", BlockSizes(block_q=8, block_kv=96), 64, "multiple of 128"),
    ("pallas_tpu", BlockSizes(block_q=1, block_kv=128), 4, "sublanes"),
    ("pallas_tpu", BlockSizes(block_q=8, block_kv=128, block_q_dkv=1), 64, "block_q_dkv"),
    ("pallas_gpu", BlockSizes(block_q=1, block_kv=64), 48, "power of two"),
    ("pallas_gpu", BlockSizes(block_q=4, block_kv=48), 16, "key block"),
    ("pallas_gpu", BlockSizes(block_q=4, block_kv=64, block_rows_dq=24), 16, "block_rows_dq"),
    ("pallas_gpu", BlockSizes(block_q=4, block_kv=64, block_rows_dkv=8), 16, "block_rows"),
])
def test_compiled_tiling_is_checked_before_launch(impl, config, heads, match):
    """Block sizes the compiled kernel cannot tile fail with the field named, before lowering."""
    q = jnp.zeros((1, 16, heads, 128), jnp.bfloat16)
    kv = jnp.zeros((1, 16, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, kv, jnp.zeros((heads,)), window=4, scale=0.1,
                               implementation=impl, interpret=False, config=config)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("heads", [16, 64, 128])
def test_default_block_sizes_tile(platform, heads):
    default_block_sizes(platform, num_heads=heads).check_tiling(
        platform, num_heads=heads, head_dim=512, itemsize=2)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="block_kv"):
        BlockSizes(block_q=8, block_kv=0)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=3)
