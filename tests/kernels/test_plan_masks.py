"""The kernels' tile-level masks against the one masks module (`sparse_lm.ops.masks`), on random
shapes (S, W, N, ratio, block sizes, packed documents, invalid entries), as splash tests its
mask info against its mask functions:
  * block-sparse attention (`block_sparse_attention/mask.py`): every (query, key) pair the masks
    module calls visible lies in a block the forward map visits, and in one the dkv map visits;
    every block a map calls full is visible for all its (real query, key) pairs;
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
