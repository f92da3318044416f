"""Block sizes of the CSA token-sparse attention kernels: a frozen dataclass, validated up front."""
from __future__ import annotations

import dataclasses


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Tile sizes. One instance serves both backends; each uses the fields it needs.

    block_q:    queries per TPU program (multiple of 8: the lse/out blocks' sublane tile). The
                window slab DMA'd per program is block_q + window - 1 (rounded up) rows, so a
                small block_q wastes little window compute; the GPU kernel runs one query per
                program (all heads on the matmul M dimension) and ignores it.
    block_k:    selected compressed rows gathered per step (TPU: multiple of 128 when compiled,
                the lane tile of the [heads, block_k] logits; GPU: power of two >= 16, the
                Triton dot minimum). The top-k list is padded with -1 to a multiple of it.
    num_warps, num_stages: Triton launch parameters (GPU only).
    vmem_limit_bytes: Mosaic scoped-VMEM limit (TPU only; None = compiler default).
    bwd_block_s: queries per TPU backward kernel call (multiple of block_q). The TPU backward
                writes fp32 dK rows [chunk, K, D] before XLA scatter-adds them, so the chunk
                bounds that buffer; None = about 1 GiB of it.
    bwd_block_k: GPU only: block_k of the backward kernel (None = block_k); its window is also
                walked in tiles of min(window tile, bwd_block_k) rows.
    bwd_heads:  GPU only: query heads per backward program (a power of two >= 16 dividing H when
                compiled; None = all H). Fewer heads shrink the q / dout tiles the backward keeps
                in shared memory ([H, D] each) at the cost of reading each KV row H / bwd_heads
                times; dK rows then accumulate over the head groups through the same atomics.
    """
    block_q: int = 8
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 1
    vmem_limit_bytes: int | None = None
    bwd_block_s: int | None = None
    bwd_heads: int | None = None
    bwd_block_k: int | None = None

    def __post_init__(self):
        for name in ("block_q", "block_k", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SparseAttentionConfig.{name}={v!r} is invalid: must be an int >= 1")
        if self.block_q % 8:
            raise ValueError(f"SparseAttentionConfig.block_q={self.block_q} is invalid: must be a "
                             "multiple of 8 (TPU sublane tile of the per-query outputs)")
        if self.bwd_block_s is not None and (not isinstance(self.bwd_block_s, int)
                                             or self.bwd_block_s < 1
                                             or self.bwd_block_s % self.block_q):
            raise ValueError(f"SparseAttentionConfig.bwd_block_s={self.bwd_block_s!r} is invalid: "
                             f"None or a positive multiple of block_q={self.block_q}")
        for name in ("bwd_heads", "bwd_block_k"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"SparseAttentionConfig.{name}={v!r} is invalid: None or an "
                                 "int >= 1")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"SparseAttentionConfig.num_warps={self.num_warps} must be a power of 2")
        if self.vmem_limit_bytes is not None and self.vmem_limit_bytes < (1 << 20):
            raise ValueError(f"SparseAttentionConfig.vmem_limit_bytes={self.vmem_limit_bytes} is "
                             "invalid: None or at least 1 MiB")

    def validate_for(self, backend: str, *, compiled: bool) -> None:
        """Check the tile constraints of a backend ("tpu" or "gpu"); interpret mode has none
        beyond the ones checked at construction."""
        if not compiled:
            return
        if backend == "tpu" and self.block_k % 128:
            raise ValueError(f"SparseAttentionConfig.block_k={self.block_k} is invalid for the "
                             "compiled TPU kernel: must be a multiple of 128 (lane tile)")
        for name in ("block_k", "bwd_block_k") if backend == "gpu" else ():
            v = getattr(self, name)
            if v is not None and (not _is_pow2(v) or v < 16):
                raise ValueError(f"SparseAttentionConfig.{name}={v} is invalid for the compiled "
                                 "GPU kernel: must be a power of two >= 16 (Triton dot tile)")
        if backend == "gpu" and self.bwd_heads is not None and (not _is_pow2(self.bwd_heads)
                                                                or self.bwd_heads < 16):
            raise ValueError(f"SparseAttentionConfig.bwd_heads={self.bwd_heads} is invalid for "
                             "the compiled GPU kernel: must be a power of two >= 16 (Triton dot "
                             "tile)")


def default_config(backend: str, *, compiled: bool, num_selected: int) -> SparseAttentionConfig:
    """Defaults per backend, shrunk for small top-k so interpret-mode tests stay cheap."""
    if backend == "tpu":
        bk = 128 if compiled else min(128, max(8, next_pow2(num_selected)))
        return SparseAttentionConfig(block_q=8, block_k=bk)
    bk = 64 if compiled else min(64, next_pow2(num_selected))
    if not compiled:
        return SparseAttentionConfig(block_q=8, block_k=bk, num_warps=4, num_stages=1)
    # Backward: 32 heads x 32 rows per step. Triton 3.6 compiled for sm_90 (the H100 failure
    # figures reproduced exactly on the CPU: 256 KiB for the old backward) gives 128 KiB of
    # shared memory at D = 512 for 32 x 32, but 256 KiB for 64 heads x 64 rows and 292 KiB for
    # 64 x 32 (q and dout then need a second copy in another layout); the limit is 227 KiB.
    return SparseAttentionConfig(block_q=8, block_k=max(bk, 16), num_warps=4, num_stages=1,
                                 bwd_block_k=32, bwd_heads=32)
