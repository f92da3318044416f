"""Block sizes of the block-sparse (HCA / SWA) attention kernels: a frozen, validated dataclass.

Rows of every kernel tile are (query, head) pairs: a query block of `block_q` positions is a
[block_q * H, D] matrix (all H query heads share the single K = V head, so they sit on the
matmul's M dimension). `block_kv` keys of the concatenated `[window keys | compressed entries]`
form one key block. The forward, dq and dkv kernels each have their own pair of sizes.
"""
from __future__ import annotations

import dataclasses
import math

PLATFORMS = ("tpu", "gpu")


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (in query positions and keys) plus launch parameters.

    block_q, block_kv:         forward kernel (query positions per block, keys per block).
    block_q_dq, block_kv_dq:   dq kernel (None = the forward sizes).
    block_q_dkv, block_kv_dkv: dkv kernel (None = the forward sizes).
    num_warps, num_stages:     Triton launch parameters (GPU only).
    vmem_limit_bytes:          Mosaic scoped-VMEM limit (TPU only; None = compiler default).
    block_rows, block_rows_dq, block_rows_dkv: GPU only: at most this many (query, head) rows per
                               matmul tile of the forward / dq / dkv kernel (None = the whole
                               block_q* x heads rows). A query block's rows are split into tiles
                               (forward and dq: one program per tile; dkv: one inner step per
                               tile), which bounds the shared memory of the q / dout operands
                               (64 rows x 512 x bf16 = 64 KiB each). Must divide the rows.

    Tile constraints checked before a compiled launch (`check_tiling`):
      TPU: block_kv* multiple of 128 (lanes of the [rows, keys] logits); block_q* x heads a
           multiple of 8 (16 for 16-bit inputs: sublanes); block_q_dkv x heads a multiple of 128
           (the dkv kernel holds query rows on lanes).
      GPU: block_q* x heads, block_kv* and the head dim powers of two >= 16 (Triton dot tiles).
    """
    block_q: int = 8
    block_kv: int = 512
    block_q_dq: int | None = None
    block_kv_dq: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    num_warps: int = 4
    num_stages: int = 2
    vmem_limit_bytes: int | None = None
    block_rows: int | None = None
    block_rows_dq: int | None = None
    block_rows_dkv: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_kv", "num_warps", "num_stages"):
            _check_int(name, getattr(self, name))
        for name in ("block_q_dq", "block_kv_dq", "block_q_dkv", "block_kv_dkv", "block_rows",
                     "block_rows_dq", "block_rows_dkv"):
            v = getattr(self, name)
            if v is not None:
                _check_int(name, v)
        if not _is_pow2(self.num_warps):
            raise ValueError(f"BlockSizes.num_warps={self.num_warps} is invalid: must be a power "
                             "of two")
        if self.vmem_limit_bytes is not None and (not isinstance(self.vmem_limit_bytes, int)
                                                  or self.vmem_limit_bytes < (1 << 20)):
            raise ValueError(f"BlockSizes.vmem_limit_bytes={self.vmem_limit_bytes!r} is invalid: "
                             "None or an int of at least 1 MiB")

    # The three kernels' (query block, key block) pairs, with None filled in.
    @property
    def fwd(self) -> tuple[int, int]:
        return self.block_q, self.block_kv

    @property
    def dq(self) -> tuple[int, int]:
        return self.block_q_dq or self.block_q, self.block_kv_dq or self.block_kv

    @property
    def dkv(self) -> tuple[int, int]:
        return self.block_q_dkv or self.block_q, self.block_kv_dkv or self.block_kv

    def rows(self, kernel: str, num_heads: int) -> int:
        """Rows per matmul tile of `kernel` ("fwd", "dq", "dkv") with `num_heads` heads: the
        block_rows* cap, or all block_q* x heads rows; ValueError naming the field if the cap
        does not divide them."""
        fields = {"fwd": ("block_rows", self.fwd), "dq": ("block_rows_dq", self.dq),
                  "dkv": ("block_rows_dkv", self.dkv)}
        if kernel not in fields:
            raise ValueError(f"kernel={kernel!r} is invalid: allowed values {tuple(fields)}")
        name, (bq, _) = fields[kernel]
        total = bq * num_heads
        cap = getattr(self, name)
        if cap is None or cap >= total:
            return total
        if total % cap:
            raise ValueError(f"BlockSizes.{name}={cap} is invalid with {num_heads} heads: it must "
                             f"divide the {total} rows (block_q x heads) of a query block")
        return cap

    @property
    def q_multiple(self) -> int:
        """Query padding unit: every kernel's query block divides it."""
        return math.lcm(self.fwd[0], self.dq[0], self.dkv[0])

    @property
    def kv_multiple(self) -> int:
        """Key padding unit of each region: every kernel's key block divides it."""
        return math.lcm(self.fwd[1], self.dq[1], self.dkv[1])

    def check_tiling(self, platform: str, *, num_heads: int, head_dim: int, itemsize: int) -> None:
        """Raise ValueError naming the field if a compiled kernel for `platform` cannot tile."""
        if platform not in PLATFORMS:
            raise ValueError(f"platform={platform!r} is invalid: allowed values {PLATFORMS}")
        pairs = {"block_q/block_kv": self.fwd, "block_q_dq/block_kv_dq": self.dq,
                 "block_q_dkv/block_kv_dkv": self.dkv}
        if platform == "tpu":
            sub = 8 if itemsize >= 4 else 16
            for name, (bq, bk) in pairs.items():
                if bk % 128:
                    raise ValueError(f"BlockSizes {name}={bq}/{bk} is invalid for the compiled TPU "
                                     "kernel: the key block must be a multiple of 128 (lanes)")
                if (bq * num_heads) % sub:
                    raise ValueError(f"BlockSizes {name}={bq}/{bk} with {num_heads} heads is invalid "
                                     f"for the compiled TPU kernel: block_q x heads = "
                                     f"{bq * num_heads} must be a multiple of {sub} (sublanes)")
            bq = self.dkv[0]
            if (bq * num_heads) % 128:
                raise ValueError(f"BlockSizes block_q_dkv={bq} with {num_heads} heads is invalid for "
                                 f"the compiled TPU kernel: block_q_dkv x heads = {bq * num_heads} "
                                 "must be a multiple of 128 (query rows sit on lanes in dkv)")
        else:
            if not _is_pow2(head_dim) or head_dim < 16:
                raise ValueError(f"head_dim={head_dim} is not supported by the compiled GPU kernel: "
                                 "it must be a power of two >= 16 (Triton tiles)")
            for (name, (bq, bk)), kernel in zip(pairs.items(), ("fwd", "dq", "dkv")):
                rows = bq * num_heads
                if not _is_pow2(rows) or rows < 16:
                    raise ValueError(f"BlockSizes {name}={bq}/{bk} with {num_heads} heads is invalid "
                                     f"for the compiled GPU kernel: block_q x heads = {rows} must be "
                                     "a power of two >= 16 (Triton dot tile); the head count must be "
                                     "a power of two")
                tile = self.rows(kernel, num_heads)
                if not _is_pow2(tile) or tile < 16:
                    raise ValueError(f"BlockSizes row tile of the {kernel} kernel = {tile} with "
                                     f"{num_heads} heads is invalid for the compiled GPU kernel: "
                                     "block_rows* must be a power of two >= 16 (Triton dot tile)")
                if not _is_pow2(bk) or bk < 16:
                    raise ValueError(f"BlockSizes {name}={bq}/{bk} is invalid for the compiled GPU "
                                     "kernel: the key block must be a power of two >= 16")


def _check_int(name: str, v) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"BlockSizes.{name}={v!r} is invalid: must be an int >= 1")


def default_block_sizes(platform: str, *, num_heads: int, compiled: bool = True) -> BlockSizes:
    """Defaults per platform: about 512 (TPU) / 64 (GPU) matmul rows per query block.

    In interpret mode (CPU) the sizes only set how many grid steps run; they are kept small.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r} is invalid: allowed values {PLATFORMS}")
    if not compiled:
        return BlockSizes(block_q=8, block_kv=16)
    if platform == "tpu":
        bq = max(1, 512 // num_heads)
        if (bq * num_heads) % 128:  # keep the dkv kernel's lane constraint satisfiable
            bq = 128 // math.gcd(128, num_heads) * max(1, bq * num_heads // 128)
        return BlockSizes(block_q=bq, block_kv=512)
    # Untuned (measured tuning is issue 8). With D = 512 a [64, 512] bf16 operand is 64 KiB of
    # shared memory. The first H100 run: forward 64 rows x 64 keys fits; the backward with 64
    # rows asked for 288 KiB (of 227 KiB per SM), since it holds q and dout (each in the layouts
    # of two matmuls) beside the key tile. The backward kernels therefore take 32-row tiles and
    # 32-key blocks, no multi-stage pipelining; every kernel caps its tile at 64 rows (V4-Pro's
    # 128 heads would otherwise put 128 rows in one tile).
    bq = max(1, 64 // num_heads)
    return BlockSizes(block_q=bq, block_kv=64, block_kv_dq=32, block_kv_dkv=32, num_warps=8,
                      num_stages=1, block_rows=64, block_rows_dq=32, block_rows_dkv=32)
