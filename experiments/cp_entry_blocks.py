"""Block counts of the block-sparse kernel's plan for context-parallel shards (host side, no
kernel run): per layer kind, the (query block, key block) pairs the forward map of each shard
visits in the compressed-entry region with the conservative plan (one static map over the
offset range, `entry_shift`) against a per-shard exact map (entry_shift = (offset, offset)),
and the window region's pairs. Default shapes: V4-Flash (S = 4096, context = 4, W = 128,
64 heads, TPU compiled block sizes).

    python -m experiments.cp_entry_blocks '{"seq": 4096, "context": 4}'   # prints JSON
"""
from __future__ import annotations

import json
import sys


from kernels_pallas.block_sparse_attention import mask as mask_lib
from kernels_pallas.block_sparse_attention.config import default_block_sizes
from sparse_lm.sharding.kernels import halo_length


def entry_pairs(geom: mask_lib.Geometry, bq: int, bk: int) -> int:
    """Visited (query block, key block) pairs in the compressed region of the forward map."""
    dense = mask_lib.decode(mask_lib.query_block_map(geom, bq, bk), geom.num_keys // bk)
    return int((dense[:, geom.win_pad // bk:] > 0).sum())


def window_pairs(geom: mask_lib.Geometry, bq: int, bk: int) -> int:
    dense = mask_lib.decode(mask_lib.query_block_map(geom, bq, bk), geom.num_keys // bk)
    return int((dense[:, :geom.win_pad // bk] > 0).sum())


def main(args: dict) -> dict:
    seq, context = args.get("seq", 4096), args.get("context", 4)
    window, heads = args.get("window", 128), args.get("heads", 64)
    ratios = args.get("ratios", {"hca": 128, "csa_dense": 4})
    cfg = default_block_sizes("tpu", num_heads=heads, compiled=True)
    bq, bk = cfg.fwd
    rows, halo = seq // context, halo_length(window)
    lo, hi = -halo, (context - 1) * rows - halo
    out = {"seq": seq, "context": context, "window": window, "heads": heads,
           "block_q": bq, "block_kv": bk, "kernel_rows": rows + halo, "offset_range": [lo, hi],
           "kinds": {}}
    for kind, m in ratios.items():
        n = seq // m
        make = lambda shift: mask_lib.make_geometry(  # noqa: E731
            rows + halo, window, n, m, q_multiple=cfg.q_multiple, kv_multiple=cfg.kv_multiple,
            entry_shift=shift)
        conservative = entry_pairs(make((lo, hi)), bq, bk)
        exact = [entry_pairs(make((i * rows - halo,) * 2), bq, bk) for i in range(context)]
        out["kinds"][kind] = {
            "ratio": m, "entries": n, "entry_blocks": -(-n // bk),
            "window_pairs_per_shard": window_pairs(make((lo, hi)), bq, bk),
            "entry_pairs_per_shard_conservative": conservative,
            "entry_pairs_per_shard_exact": exact,
            "conservative_over_exact": round(conservative * context / max(1, sum(exact)), 4),
            "old_list_int32_mb_per_shard": round(rows * n * 4 / 1e6, 3)}
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}), indent=1))
