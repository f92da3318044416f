"""The kernels' tile-level masks against the one masks module (`sparse_lm.ops.masks`), on random
shapes (S, W, N, ratio, block sizes, packed documents, invalid entries), as splash tests its
mask info against its mask functions:
  * block-sparse attention (`block_sparse_attention/mask.py`): every (query, key) pair the masks
    module calls visible lies in a block the forward map visits, and in one the dkv map visits;
    every block a map calls full is visible for all its (real query, key) pairs; with a traced
    query offset's range (a context-parallel shard), the same at every offset of the range;
  * the indexer plan (`indexer_topk/plan.py`): each query block's key tiles [tile_lo, tile_hi)
    cover every entry visible to any of its queries.
Seconds."""
import numpy as np
import pytest

from kernels_pallas.block_sparse_attention import mask as mask_lib
from kernels_pallas.indexer_topk.plan import Layout, prepare
from sparse_lm.ops import masks


def _segments(rng, s: int):
    """[S] int32 document ids of random packed documents (or None)."""
    if rng.random() < 0.3:
        return None
    cuts = np.sort(rng.choice(np.arange(1, s), size=min(s - 1, rng.integers(0, 4)),
                              replace=False)) if s > 1 else np.array([], int)
    return np.searchsorted(cuts, np.arange(s), side="right").astype(np.int32)


@pytest.mark.parametrize("seed", range(40))
def test_block_sparse_maps_cover_the_masks_and_full_blocks_are_visible(seed):
    rng = np.random.default_rng(seed)
    s = int(rng.integers(1, 48))
    window = int(rng.integers(1, s + 4))
    ratio = int(rng.choice([0, 1, 2, 3, 4, 8]))
    n = int(rng.integers(0, s // ratio + 1)) if ratio else 0
    bq, bk = (int(x) for x in rng.choice([1, 2, 4, 8], size=2))
    geom = mask_lib.make_geometry(s, window, n, ratio, q_multiple=bq, kv_multiple=bk)
    fwd = mask_lib.decode(mask_lib.query_block_map(geom, bq, bk), geom.num_keys // bk)
    dkv = mask_lib.decode(mask_lib.key_block_map(geom, bq, bk), geom.q_pad // bq).T

    t = np.arange(s)
    seg = _segments(rng, s)
    valid = rng.random(n) < 0.8
    # [S, keys] visibility in the kernels' key space: [window keys | entries], both padded.
    vis = np.zeros((s, geom.num_keys), bool)
    vis[:, :s] = masks.window_visible(t, t, window, seg, seg)
    positional = np.zeros_like(vis)
    positional[:, :s] = masks.window_visible(t, t, window)
    if n:
        seg_e = None if seg is None else masks.entry_segments(seg, n, ratio)
        vis[:, geom.win_pad:geom.win_pad + n] = masks.entry_visible(t, n, ratio, valid, seg, seg_e)
        positional[:, geom.win_pad:geom.win_pad + n] = masks.entry_visible(t, n, ratio)

    q_idx, k_idx = np.nonzero(vis)
    for kinds, name in ((fwd, "forward"), (dkv, "dkv")):
        missed = kinds[q_idx // bq, k_idx // bk] == 0
        assert not missed.any(), (f"{name} map skips visible pairs "
                                  f"{list(zip(q_idx[missed], k_idx[missed]))[:5]} of {geom}")
        for qb, kb in zip(*np.nonzero(kinds == mask_lib.FULL)):
            rows = t[qb * bq:(qb + 1) * bq]
            assert rows.size, f"{name} map calls a block of padding queries full"
            block = positional[rows, kb * bk:(kb + 1) * bk]
            assert block.shape[1] == bk and block.all(), (
                f"{name} map calls block ({qb}, {kb}) full but not all of it is visible: {geom}")


@pytest.mark.parametrize("seed", range(30))
def test_offset_maps_visit_every_entry_some_offset_sees_and_full_only_when_full_at_all(seed):
    """A context-parallel shard's plan (`entry_shift` = the range of a traced query offset):
    for every offset in the range, every (row, entry) pair visible at global position
    offset + row lies in a block the forward and dkv maps visit; every entry block called full
    is visible for all its pairs at every offset; the window region's map is the unshifted
    one."""
    rng = np.random.default_rng(2000 + seed)
    s = int(rng.integers(1, 40))
    ratio = int(rng.choice([1, 2, 4, 8]))
    lo = int(rng.integers(-16, 8))
    hi = lo + int(rng.integers(0, 64))
    n = int(rng.integers(1, (s + hi) // ratio + 2))
    window = int(rng.integers(1, s + 4))
    bq, bk = (int(x) for x in rng.choice([1, 2, 4, 8], size=2))
    geom = mask_lib.make_geometry(s, window, n, ratio, q_multiple=bq, kv_multiple=bk,
                                  entry_shift=(lo, hi))
    plain = mask_lib.make_geometry(s, window, 0, 0, q_multiple=bq, kv_multiple=bk)
    fwd = mask_lib.decode(mask_lib.query_block_map(geom, bq, bk), geom.num_keys // bk)
    dkv = mask_lib.decode(mask_lib.key_block_map(geom, bq, bk), geom.q_pad // bq).T
    win = mask_lib.decode(mask_lib.query_block_map(plain, bq, bk), plain.num_keys // bk)
    nwb = geom.win_pad // bk
    assert (fwd[:, :nwb] == win).all() and (dkv[:, :nwb] == win).all(), geom
    t = np.arange(s)
    for offset in sorted({lo, hi, int(rng.integers(lo, hi + 1))}):
        vis = np.zeros((s, geom.comp_pad), bool)
        vis[:, :n] = masks.entry_visible(offset + t, n, ratio)
        q_idx, e_idx = np.nonzero(vis)
        for kinds, name in ((fwd, "forward"), (dkv, "dkv")):
            ent = kinds[:, nwb:]
            missed = ent[q_idx // bq, e_idx // bk] == 0
            assert not missed.any(), (name, offset, geom)
            for qb, eb in zip(*np.nonzero(ent == mask_lib.FULL)):
                block = vis[qb * bq:(qb + 1) * bq, eb * bk:(eb + 1) * bk]
                assert block.size and block.all(), (name, offset, qb, eb, geom)


@pytest.mark.parametrize("seed", range(40))
def test_indexer_tile_ranges_cover_every_visible_entry(seed):
    rng = np.random.default_rng(1000 + seed)
    m = int(rng.choice([1, 2, 3, 4, 8]))
    s = int(rng.integers(m, 64))
    n = int(rng.integers(1, s // m + 1))
    b = int(rng.integers(1, 3))
    bq, bk = (int(x) for x in rng.choice([1, 2, 4, 8, 16], size=2))
    seg1 = _segments(rng, s)
    seg = None if seg1 is None else np.stack([seg1, np.roll(seg1, rng.integers(0, s))])[:b]
    valid = rng.random((b, n)) < 0.8
    lay = Layout(b=b, s=s, h=1, d=1, n=n, k=1, ratio=m, bq=bq, bk=bk, width=1)
    _, _, lo, hi = prepare(lay, valid, seg)
    lo = np.asarray(lo).reshape(b, lay.nq)
    hi = np.asarray(hi).reshape(b, lay.nq)
    assert np.all(lo <= hi) and np.all(hi <= lay.nk)

    t = np.arange(s)
    seg_e = None if seg is None else masks.entry_segments(seg, n, m)
    vis = masks.entry_visible(t, n, m, valid, seg, seg_e)             # [B, S, N]
    bi, ti, ei = np.nonzero(np.broadcast_to(vis, (b, s, n)))
    tile, qb = ei // bk, ti // bq
    inside = (lo[bi, qb] <= tile) & (tile < hi[bi, qb])
    assert inside.all(), (f"tiles miss visible (b, t, e) "
                          f"{list(zip(bi[~inside], ti[~inside], ei[~inside]))[:5]}")
