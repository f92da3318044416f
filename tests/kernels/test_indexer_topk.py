"""Fused lightning indexer (kernels_pallas/indexer_topk), interpreted on CPU: the Mosaic TPU and
Pallas Triton kernels return exactly `lax.top_k` over the naive scores (same indices in the
same order: best first, ties to the lower index, -1 where fewer than k entries are visible),
including early queries that see fewer than k entries, packed documents (also with a segment
id that reappears later), invalid windows, S not a multiple of the query block and N not a
multiple of the key tile (several streamed tiles per query). Integer-valued inputs make every
score exact in fp32 and produce many exact ties; a float case checks the selected scores. Bad
input is refused with errors naming the argument. About 60 s on 2 CPU cores."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.indexer_topk import IndexerTopkConfig, indexer_topk, indexer_topk_reference
from kernels_pallas.indexer_topk import bitonic
from kernels_pallas.indexer_topk.plan import Layout, prepare
from kernels_pallas.indexer_topk.reference import scores as ref_scores
from sparse_lm.ops import masks


def visibility(s, n, m, key_valid=None, segment_ids=None):
    """[B or 1, S, N] entry visibility of a packed row (`sparse_lm.ops.masks`)."""
    seg_e = None if segment_ids is None else masks.entry_segments(segment_ids, n, m)
    vis = masks.entry_visible(jnp.arange(s), n, m, key_valid, segment_ids, seg_e)
    return vis if vis.ndim == 3 else vis[None]

KERNELS = {"pallas_tpu": IndexerTopkConfig(block_q=8),
           "pallas_gpu": IndexerTopkConfig(block_q=4, block_k=8)}


def _int_inputs(seed, b, s, h, d, n, dtype=jnp.float32):
    """Small integers: products and sums are exact in fp32; ReLU zeros and ties abound."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.integers(-2, 3, size=(b, s, h, d)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.integers(-2, 3, size=(b, s, h)) * 0.5, jnp.float32)
    keys = jnp.asarray(rng.integers(-2, 3, size=(b, n, d)), jnp.float32).astype(dtype)
    return q, w, keys


def _check_exact(got, want):
    gi, gv = (np.asarray(x) for x in got)
    wi, wv = (np.asarray(x) for x in want)
    assert gi.shape == wi.shape and gi.dtype == np.int32
    np.testing.assert_array_equal(gv, wv)
    np.testing.assert_array_equal(gi, wi)


# (b, s, h, d, ratio, k, segment lengths or None, invalid windows?)
CASES = {
    # S = 37: ragged against every block; N = 9 < 2 tiles of 8; k = 5: queries t < 19 see < 5.
    "early_queries_ragged": (2, 37, 4, 16, 4, 5, None, False),
    # Three documents with lengths that cut windows (invalid entries), 20 entries streamed in
    # 3 GPU tiles, k = 3 (TPU merge width 8 -> 3 tiles too).
    "packed_documents": (1, 83, 2, 8, 4, 3, [13, 40, 30], True),
    # Segment id 0 comes back after id 1: entries of the first run stay visible to the last one.
    "segment_id_reappears": (1, 64, 2, 8, 2, 6, "repeat", False),
}


def _case_inputs(case):
    b, s, h, d, m, k, segs, invalid = CASES[case]
    n = s // m
    q, w, keys = _int_inputs(sum(map(ord, case)), b, s, h, d, n)
    seg = valid = None
    if segs == "repeat":
        seg = jnp.asarray(np.broadcast_to(np.repeat([0, 1, 0], [20, 20, 24]), (b, s)), jnp.int32)
    elif segs is not None:
        seg = jnp.asarray(np.broadcast_to(np.repeat(np.arange(len(segs)), segs)[:s], (b, s)),
                          jnp.int32)
    if seg is not None:   # the model's rule: a window is valid iff it lies in one document
        win = np.asarray(seg)[:, : n * m].reshape(b, n, m)
        valid = jnp.asarray(np.all(win == win[:, :, :1], axis=-1))
    if invalid:
        rng = np.random.default_rng(1)
        valid = valid & jnp.asarray(rng.random((b, n)) > 0.2)
    return q, w, keys, dict(k=k, ratio=m, key_valid=valid, segment_ids=seg)


@pytest.mark.parametrize("impl", list(KERNELS) + ["xla"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_top_k_over_naive_scores(impl, case):
    q, w, keys, kw = _case_inputs(case)
    want = indexer_topk_reference(q, w, keys, **kw)
    got = indexer_topk(q, w, keys, implementation=impl, config=KERNELS.get(impl),
                       return_scores=True, **kw)
    _check_exact(got, want)
    # The case is not vacuous: some rows are short of k, some are full, and ties occur.
    idx = np.asarray(want[0])
    assert np.any(idx[..., -1] == -1) and np.any(idx[..., -1] >= 0)
    vals = np.asarray(want[1])
    finite = vals[np.isfinite(vals)]
    assert finite.size > np.unique(finite).size


def test_model_semantics_select_topk_over_entry_visibility():
    """Same result as the model's own ops (sparse_lm.ops.indexer / compress) on a packed row."""
    from sparse_lm.ops.masks import sequence_entry_visible
    from sparse_lm.ops.indexer import indexer_scores, select_topk
    q, w, keys, kw = _case_inputs("packed_documents")
    vis = sequence_entry_visible(q.shape[1], kw["ratio"], kw["key_valid"], kw["segment_ids"])
    want = select_topk(indexer_scores(q, w, keys, vis), kw["k"])
    got = indexer_topk(q, w, keys, implementation="pallas_tpu", config=KERNELS["pallas_tpu"], **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("impl", list(KERNELS))
def test_float_inputs_select_the_best_scores(impl):
    """Random fp32 (rows of different length, one bf16 run): the kernel's picks carry exactly the
    reference's top-k scores (to rounding), and are the reference's indices."""
    rng = np.random.default_rng(7)
    b, s, h, d, m, k = 1, 48, 4, 16, 2, 7
    n = s // m
    q = jnp.asarray(rng.normal(size=(b, s, h, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        qq, kk = q.astype(dtype), keys.astype(dtype)
        idx, vals = indexer_topk(qq, w, kk, k=k, ratio=m, implementation=impl,
                                 config=KERNELS[impl], return_scores=True)
        full = ref_scores(qq, w, kk, visibility(s, n, m))          # [B, S, N] fp32
        want_vals, want_idx = jax.lax.top_k(full, k)
        picked = np.take_along_axis(np.asarray(full), np.maximum(np.asarray(idx), 0), axis=-1)
        picked = np.where(np.asarray(idx) >= 0, picked, -np.inf)
        np.testing.assert_allclose(picked, np.asarray(want_vals), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(vals), np.asarray(want_vals), rtol=1e-5, atol=1e-5)
        ok = np.isfinite(np.asarray(want_vals))
        np.testing.assert_array_equal(np.asarray(idx)[ok], np.asarray(want_idx)[ok])


@pytest.mark.parametrize("exchange", ["roll_host", "split"])
@pytest.mark.parametrize("width,tile", [(32, 8), (128, 128)])
def test_bitonic_merge_keeps_the_best_pairs_in_top_k_order(exchange, width, tile):
    rng = np.random.default_rng(width + tile)
    rows = 4
    merge = jax.jit(lambda *a: bitonic.merge_tile(*a, exchange=exchange))
    sv, si = bitonic.empty_state(rows, width)
    seen_v, seen_i = [], []
    for step in range(4):
        v = rng.integers(-3, 4, size=(rows, tile)).astype(np.float32)
        v[rng.random((rows, tile)) < 0.2] = -np.inf
        i = np.broadcast_to(step * tile + np.arange(tile, dtype=np.int32), (rows, tile))
        seen_v.append(v)
        seen_i.append(i)
        sv, si = merge(sv, si, jnp.asarray(v), jnp.asarray(i))
    allv = np.concatenate(seen_v, 1)
    kk = min(width, allv.shape[1])
    want_v, want_i = jax.lax.top_k(jnp.asarray(allv), kk)
    np.testing.assert_array_equal(np.asarray(sv)[:, :kk], np.asarray(want_v))
    fin = np.isfinite(np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(si)[:, :kk][fin], np.asarray(want_i)[fin])


def test_tpu_roll_direction_matches_jnp_roll_in_interpret_mode():
    """The TPU network relies on pltpu.roll having jnp.roll's direction."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu
    x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)

    def kern(x_ref, o_ref):
        o_ref[...] = pltpu.roll(x_ref[...], 3, 1)
    y = pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)
    np.testing.assert_array_equal(np.asarray(y), np.roll(np.asarray(x), 3, 1))


@pytest.mark.parametrize("segments", [None, [5, 30, 29]])
def test_key_tile_ranges_cover_every_visible_entry(segments):
    b, s, h, d, m = 1, 64, 2, 8, 4
    n = s // m
    seg = None if segments is None else jnp.asarray(np.repeat(np.arange(3), segments)[None],
                                                     jnp.int32)
    lay = Layout(b=b, s=s, h=h, d=d, n=n, k=2, ratio=m, bq=8, bk=4, width=8)
    _, _, lo, hi = prepare(lay, None, seg)
    lo, hi = np.asarray(lo).reshape(lay.nq), np.asarray(hi).reshape(lay.nq)
    vis = np.asarray(visibility(s, n, m, None, seg))[0]
    visited = 0
    for t in range(s):
        for e in np.flatnonzero(vis[t]):
            assert lo[t // lay.bq] <= e // lay.bk < hi[t // lay.bq], (t, e)
    for j in range(lay.nq):
        visited += max(0, hi[j] - lo[j])
    if segments is not None:   # documents prune tiles: fewer visits than the causal rule alone
        assert visited < sum(-(-min(((j + 1) * lay.bq) // m, n) // lay.bk) for j in range(lay.nq))


def test_bad_input_is_refused_with_clear_errors():
    q, w, keys = _int_inputs(0, 1, 16, 2, 8, 4)
    with pytest.raises(ValueError, match="k=5 is larger than the number of keys N=4"):
        indexer_topk(q, w, keys, k=5, ratio=4)
    with pytest.raises(ValueError, match="k=0 is invalid"):
        indexer_topk(q, w, keys, k=0, ratio=4)
    with pytest.raises(ValueError, match="weights has shape"):
        indexer_topk(q, w[:, :, :1], keys, k=2, ratio=4)
    with pytest.raises(TypeError, match="keys has dtype bfloat16"):
        indexer_topk(q, w, keys.astype(jnp.bfloat16), k=2, ratio=4)
    with pytest.raises(ValueError, match="ratio=0 is invalid"):
        indexer_topk(q, w, keys, k=2, ratio=0)
    with pytest.raises(ValueError, match="segment_ids has shape"):
        indexer_topk(q, w, keys, k=2, ratio=4, segment_ids=jnp.zeros((1, 15), jnp.int32))
    with pytest.raises(ValueError, match="every entry must have its window"):
        indexer_topk(q, w, keys, k=2, ratio=5, segment_ids=jnp.zeros((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="key_valid has shape"):
        indexer_topk(q, w, keys, k=2, ratio=4, key_valid=jnp.ones((1, 3), bool))
    with pytest.raises(ValueError, match="implementation='fast' is invalid"):
        indexer_topk(q, w, keys, k=2, ratio=4, implementation="fast")
    with pytest.raises(ValueError, match="must be None or the merge width"):
        indexer_topk(q, w, keys, k=2, ratio=4, implementation="pallas_tpu",
                     config=IndexerTopkConfig(block_k=64))
    with pytest.raises(ValueError, match="Di=8 is unsupported by the compiled TPU kernel"):
        IndexerTopkConfig().validate_for("tpu", compiled=True, k=2, heads=16, dim=8)
    with pytest.raises(ValueError, match="block_q=8 x Hi=3 is unsupported"):
        IndexerTopkConfig().validate_for("gpu", compiled=True, k=2, heads=3, dim=16)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_max_score_probe_is_the_best_visible_score(impl):
    """`indexer_max_score` (the benchmark's scoring-only pass) is the row max of the naive
    scores, -inf for queries that see nothing."""
    from kernels_pallas.indexer_topk import indexer_max_score
    q, w, keys, kw = _case_inputs("packed_documents")
    got = indexer_max_score(q, w, keys, ratio=kw["ratio"], key_valid=kw["key_valid"],
                            segment_ids=kw["segment_ids"], implementation=impl,
                            config=KERNELS[impl])
    want = indexer_topk_reference(q, w, keys, **dict(kw, k=1))[1][..., 0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.any(np.isinf(np.asarray(want))) and np.any(np.isfinite(np.asarray(want)))
    with pytest.raises(ValueError, match="invalid for indexer_max_score"):
        indexer_max_score(q, w, keys, ratio=4, implementation="xla")


@pytest.mark.parametrize("impl", list(KERNELS) + ["xla", "reference"])
def test_a_shard_of_query_rows_with_a_traced_offset_equals_those_rows_of_the_whole(impl):
    """Context parallelism: the rows [o, o + S/c) of a packed row, scored by themselves with
    query_offset = o (traced, as `axis_index * S/c` is inside `shard_map`) and the entries'
    documents given (key_segments: the shard's segment ids do not cover the entries), select
    exactly the rows' picks of the unsplit call. Shards past the first see more entries than
    their local row count would allow, and their first query block starts mid-document."""
    q, w, keys, kw = _case_inputs("packed_documents")
    want = indexer_topk_reference(q, w, keys, **kw)
    seg, n = kw["segment_ids"], keys.shape[1]
    key_segments = masks.entry_segments(seg, n, kw["ratio"])
    rows = 24                       # 83 rows: shards of 24 (the last one ragged)
    run = jax.jit(lambda q, w, seg, o: indexer_topk(
        q, w, keys, k=kw["k"], ratio=kw["ratio"], key_valid=kw["key_valid"], segment_ids=seg,
        key_segments=key_segments, query_offset=o, implementation=impl,
        config=KERNELS.get(impl), return_scores=True))
    for o in range(0, q.shape[1], rows):
        part = slice(o, o + rows)
        got = run(q[:, part], w[:, part], seg[:, part], jnp.int32(o))
        _check_exact(got, (want[0][:, part], want[1][:, part]))


def test_query_offset_and_key_segments_are_checked():
    q, w, keys, kw = _case_inputs("packed_documents")
    with pytest.raises(ValueError, match="query_offset=-1"):
        indexer_topk(q, w, keys, query_offset=-1, implementation="xla", **kw)
    with pytest.raises(ValueError, match="key_segments has shape"):
        indexer_topk(q, w, keys, key_segments=kw["segment_ids"], implementation="xla", **kw)
