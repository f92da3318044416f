"""The block map of block-sparse attention over `[window keys | compressed entries]` (host side).

Everything here is NumPy on static shapes, computed once per geometry outside the traced path
(splash-style); nothing is ever an [S, keys] element mask.

Key space. The kernels attend over one concatenated key array:
    [ window region: S raw keys, padded to a multiple of the key block |
      compressed region: N entries, padded likewise ]
Every key k carries an interval of query positions that may see it, [kpos_k, kend_k]:
    window key j:        [j, j + W - 1]     (query t sees j iff j <= t and t - j < W)
    compressed entry e:  [(e + 1) * ratio - 1, +inf)  (t sees e iff e < (t + 1) // ratio)
(the rules of `sparse_lm.ops.masks`: `window_visible`, and `first_query_of_entry` /
`visible_entry_count` for entries; tests/kernels/test_plan_masks.py checks the maps against
that module on random shapes)
    padding:             empty
Both ends are non-decreasing in k inside a region, so for a query block [t0, t1] the key blocks
it touches form one contiguous range per region, and so do the *full* blocks (every query of the
block sees every key of the block, so no in-kernel mask is needed). Data-dependent visibility
(document segments, invalid compressed windows) is applied in the kernel from per-key arrays.

Kernel form. A map is stored as run-length-encoded rows: row r (a query block for the forward
and dq kernels, a key block for the dkv kernel) lists up to R runs of consecutive blocks of the
other axis, each run all-full or all-partial, as two int32 words:
    packed[r, j] = (start, length << 1 | full)          packed: int32 [rows, R, 2]
so a TPU kernel keeps the whole map in SMEM (rows x R x 2 words) whatever the sequence length.
(An earlier one-word form, start << 16 | length << 1 | full, capped runs at 2**15 blocks: the
GPU dkv map, one query of H heads per block, passed that at S = 32K.) Kernels read a run with
`read_run` from the flattened map.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from jax import lax

from sparse_lm.ops import masks

NEVER = 1 << 30          # kpos of keys no query sees (padding, invalid entries); kend of "forever"
MAX_BLOCKS = 1 << 30     # run starts and lengths (in blocks) must stay below this (int32 words)

PARTIAL, FULL = 1, 2     # block kinds in dense maps (0 = not visited)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static shape of one attention call (hashable: maps are cached per geometry).

    seq: S query positions (= raw keys); window: W >= 1 (values >= S mean "all earlier keys");
    num_entries: N compressed entries (0 = SWA); ratio: compression ratio m (entry e covers
    tokens [e*m, (e+1)*m)); q_pad: padded query count; win_pad, comp_pad: padded region sizes.
    entry_shift: (lo, hi), the range of a traced query offset (a context-parallel shard's rows:
    query row t sits at position offset + t for the entries, lo <= offset <= hi; the window
    region stays local). The compressed region's map then visits every entry block that some
    offset in the range sees and marks full only blocks full at every offset; the exact mask
    comes in-kernel from kpos shifted by the traced offset. (0, 0) = no offset.
    """
    seq: int
    window: int
    num_entries: int
    ratio: int
    q_pad: int
    win_pad: int
    comp_pad: int
    entry_shift: tuple[int, int] = (0, 0)

    @property
    def num_keys(self) -> int:
        return self.win_pad + self.comp_pad


def make_geometry(seq: int, window: int, num_entries: int, ratio: int, *, q_multiple: int,
                  kv_multiple: int, entry_shift: tuple[int, int] = (0, 0)) -> Geometry:
    """Pad queries to `q_multiple` and each key region to `kv_multiple`; entry_shift: see
    `Geometry`."""
    if seq < 1:
        raise ValueError(f"sequence length {seq} is invalid: must be >= 1")
    if window < 1:
        raise ValueError(f"window={window} is invalid: must be >= 1")
    if num_entries and ratio < 1:
        raise ValueError(f"ratio={ratio} is invalid with {num_entries} compressed entries: must be >= 1")
    lo, hi = (int(v) for v in entry_shift)
    if lo > hi:
        raise ValueError(f"entry_shift={entry_shift} is invalid: must be (lo, hi) with lo <= hi")
    window = min(window, seq)  # W >= S already reaches every earlier key
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    return Geometry(seq=seq, window=window, num_entries=num_entries,
                    ratio=ratio if num_entries else 0, q_pad=up(seq, q_multiple),
                    win_pad=up(seq, kv_multiple), comp_pad=up(num_entries, kv_multiple),
                    entry_shift=(lo, hi) if num_entries else (0, 0))


def _region_keys(geom: Geometry) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(offset in the key space, kpos[real keys], kend[real keys])] per non-empty region, at
    query offset 0."""
    j = np.arange(geom.seq, dtype=np.int64)
    regions = [(0, j, j + geom.window - 1)]
    if geom.num_entries:
        e = np.arange(geom.num_entries, dtype=np.int64)
        regions.append((geom.win_pad, masks.first_query_of_entry(e, geom.ratio),
                        np.full(geom.num_entries, NEVER, np.int64)))
    return regions


def _planned_regions(geom: Geometry):
    """[(offset, kpos to visit by, kpos to call full by, kend)] per region: the compressed
    region's kpos at the largest query offset (visited at some offset) and at the smallest
    (full at every offset; kpos only falls as the offset grows)."""
    lo, hi = geom.entry_shift
    out = []
    for i, (off, kpos, kend) in enumerate(_region_keys(geom)):
        entries = i == 1          # [window, entries]: only the entries see the offset
        out.append((off, kpos - hi if entries else kpos, kpos - lo if entries else kpos, kend))
    return out


@functools.lru_cache(maxsize=64)
def key_intervals(geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(kpos, kend) int32 [num_keys]: the query interval that sees each key (empty for padding)."""
    kpos = np.full(geom.num_keys, NEVER, np.int64)
    kend = np.full(geom.num_keys, -1, np.int64)
    for off, p, e in _region_keys(geom):
        kpos[off:off + len(p)] = p
        kend[off:off + len(e)] = e
    return (np.minimum(kpos, NEVER).astype(np.int32), np.minimum(kend, NEVER).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class _RegionRanges:
    """Per query block, in region-local key blocks: visited [lo, hi) and full [flo, fhi)."""
    offset_blocks: int
    lo: np.ndarray
    hi: np.ndarray
    flo: np.ndarray
    fhi: np.ndarray
    num_blocks: int


def _ranges(geom: Geometry, bq: int, bk: int) -> tuple[np.ndarray, list[_RegionRanges]]:
    """Query blocks' (t0, t1) and, per region, the visited / full key-block ranges.

    With [kpos, kend] non-decreasing over a region's keys:
      visited: some key k has kpos_k <= t1 and kend_k >= t0  ->  blocks K0//bk .. K1//bk, where
               K1 = last key with kpos <= t1 and K0 = first key with kend >= t0 (a superset when
               K0 > K1 inside one block: that block is partial and masked, never wrong);
      full:    every key of the block has kpos <= t0 and kend >= t1, and the block is all real.
    All four bounds are non-decreasing in the query block (used by the transposed map).
    """
    if geom.q_pad % bq or geom.win_pad % bk or geom.comp_pad % bk:
        raise ValueError(f"block sizes {bq}/{bk} do not divide the padded geometry {geom}")
    nq = -(-geom.seq // bq)  # query blocks holding at least one real query
    t0 = np.arange(nq, dtype=np.int64) * bq
    t1 = np.minimum(t0 + bq, geom.seq) - 1
    out = []
    for off, kpos, kpos_full, kend in _planned_regions(geom):
        k1 = np.searchsorted(kpos, t1, side="right") - 1
        k0 = np.searchsorted(kend, t0, side="left")
        f1 = np.searchsorted(kpos_full, t0, side="right") - 1
        f0 = np.searchsorted(kend, t1, side="left")
        lo = k0 // bk
        hi = np.where(k1 >= 0, k1 // bk + 1, 0)
        lo = np.minimum(lo, hi)
        flo = np.maximum(-(-f0 // bk), lo)
        fhi = np.minimum((f1 + 1) // bk, hi)
        fhi = np.maximum(fhi, flo)
        out.append(_RegionRanges(off // bk, lo, hi, flo, fhi, -(-len(kpos) // bk)))
    return np.stack([t0, t1], axis=1), out


def _pack(starts: np.ndarray, lengths: np.ndarray, fulls: np.ndarray, what: str) -> np.ndarray:
    """Runs [rows, C] (start, length, full) -> packed int32 [rows, R, 2]: empty runs dropped (all
    zero words), the rest kept in order and moved to the front; R = the most runs any row has
    (>= 1)."""
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    if lengths.size and (starts.max() >= MAX_BLOCKS or lengths.max() >= MAX_BLOCKS):
        raise ValueError(f"{what} block map has a run (start {int(starts.max())}, length "
                         f"{int(lengths.max())}) beyond the packed limit of {MAX_BLOCKS} blocks: "
                         "use larger blocks")
    live = lengths > 0
    words = np.stack([np.where(live, starts, 0),
                      np.where(live, (lengths << 1) | fulls.astype(np.int64), 0)], axis=-1)
    order = np.argsort(~live, axis=1, kind="stable")
    words = np.take_along_axis(words, order[:, :, None], axis=1)
    r = max(1, int(live.sum(axis=1).max(initial=0)))
    return np.ascontiguousarray(words[:, :r]).astype(np.int32)


def read_run(map_ref, row, r, num_runs: int):
    """In-kernel read of run r of `row` from the flattened packed map (int32 [rows * R * 2]):
    (start, length, full) as int32 scalars; an empty run has length 0."""
    base = (row * num_runs + r) * 2
    word = map_ref[base + 1]
    return map_ref[base], lax.shift_right_logical(word, 1), word & 1


def _three_runs(lo, hi, flo, fhi, base):
    """partial [lo, flo), full [flo, fhi), partial [fhi, hi) -> (starts, lengths, fulls) [n, 3]."""
    starts = np.stack([lo, flo, fhi], axis=1).astype(np.int64) + base
    lengths = np.stack([flo - lo, fhi - flo, hi - fhi], axis=1).astype(np.int64)
    fulls = np.broadcast_to(np.array([False, True, False]), lengths.shape)
    return starts, lengths, fulls


@functools.lru_cache(maxsize=64)
def query_block_map(geom: Geometry, bq: int, bk: int) -> np.ndarray:
    """Forward / dq map: packed int32 [q_pad // bq, R, 2]; row i lists the key blocks query block i
    visits (window region first, then compressed). Padding query blocks have no runs."""
    _, regions = _ranges(geom, bq, bk)
    nq_all = geom.q_pad // bq
    parts = [_three_runs(r.lo, r.hi, r.flo, r.fhi, r.offset_blocks) for r in regions]
    starts, lengths, fulls = (np.concatenate([p[i] for p in parts], axis=1) for i in range(3))
    pad = ((0, nq_all - starts.shape[0]), (0, 0))
    return _pack(np.pad(starts, pad), np.pad(lengths, pad), np.pad(fulls, pad), "query")


@functools.lru_cache(maxsize=64)
def key_block_map(geom: Geometry, bq: int, bk: int) -> np.ndarray:
    """dkv map: packed int32 [num_keys // bk, R, 2]; row b lists the query blocks that visit key
    block b (the transpose of `query_block_map` for the same sizes)."""
    _, regions = _ranges(geom, bq, bk)
    nkb = geom.num_keys // bk
    starts = np.zeros((nkb, 3), np.int64)
    lengths = np.zeros((nkb, 3), np.int64)
    fulls = np.zeros((nkb, 3), bool)
    for reg in regions:
        b = np.arange(reg.num_blocks)
        # query blocks i with lo_i <= b < hi_i (all bounds are non-decreasing in i)
        vlo = np.searchsorted(reg.hi, b, side="right")
        vhi = np.maximum(np.searchsorted(reg.lo, b, side="right"), vlo)
        flo = np.clip(np.searchsorted(reg.fhi, b, side="right"), vlo, vhi)
        fhi = np.clip(np.searchsorted(reg.flo, b, side="right"), flo, vhi)
        rows = reg.offset_blocks + b
        starts[rows], lengths[rows], fulls[rows] = _three_runs(vlo, vhi, flo, fhi, 0)
    return _pack(starts, lengths, fulls, "key")


def decode(packed: np.ndarray, num_cols: int) -> np.ndarray:
    """Packed runs [rows, R, 2] -> dense kinds int8 [rows, num_cols] (0 / PARTIAL / FULL); for tests
    and inspection only (small shapes)."""
    dense = np.zeros((packed.shape[0], num_cols), np.int8)
    for i, row in enumerate(np.asarray(packed, np.int64)):
        for start, word in row:
            length, full = word >> 1, word & 1
            dense[i, start:start + length] = FULL if full else PARTIAL
    return dense


def steps_per_row(packed: np.ndarray) -> np.ndarray:
    """Blocks visited per row (the grid extent a row needs)."""
    return (np.asarray(packed, np.int64)[..., 1] >> 1).sum(axis=1)


def visited_fraction(geom: Geometry, bq: int, bk: int) -> float:
    """Share of (query block, key block) pairs the forward kernel computes."""
    packed = query_block_map(geom, bq, bk)
    return float(steps_per_row(packed).sum()) / ((geom.q_pad // bq) * (geom.num_keys // bk))
