"""Block sizes of the fused indexer score + top-k kernels (a frozen dataclass, validated)."""
from __future__ import annotations

import dataclasses


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class IndexerTopkConfig:
    """block_q: queries per program. TPU: a multiple of 8 (sublane tile of the [block_q, L]
               top-k state); the score matmul has block_q * Hi rows. GPU: a power of two with
               block_q * Hi >= 16 (Triton dot M).
    block_k:   compressed keys scored per step. TPU: None = the merge width L (the tile is
               merged as one bitonic row; L = next_pow2(k), at least 128 when compiled); GPU: a
               power of two >= 16 and <= L (a [block_q * Hi, block_k] fp32 score tile lives in
               registers), None = min(64, L).
    num_warps, num_stages: Triton launch parameters (GPU only).
    vmem_limit_bytes: Mosaic scoped-VMEM limit (TPU only; None = compiler default).
    """
    block_q: int = 8
    block_k: int | None = None
    num_warps: int = 4
    num_stages: int = 1
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        for name in ("block_q", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"IndexerTopkConfig.{name}={v!r} is invalid: must be an int >= 1")
        if self.block_k is not None and (not isinstance(self.block_k, int)
                                         or not _is_pow2(self.block_k) or self.block_k < 8):
            raise ValueError(f"IndexerTopkConfig.block_k={self.block_k!r} is invalid: None or a "
                             "power of two >= 8")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"IndexerTopkConfig.num_warps={self.num_warps} must be a power of 2")
        if self.vmem_limit_bytes is not None and self.vmem_limit_bytes < (1 << 20):
            raise ValueError(f"IndexerTopkConfig.vmem_limit_bytes={self.vmem_limit_bytes} is "
                             "invalid: None or at least 1 MiB")

    def merge_width(self, k: int, *, backend: str, compiled: bool) -> int:
        """L: width of the sorted top-k state (a power of two >= k)."""
        floor = 128 if (backend == "tpu" and compiled) else (16 if backend == "gpu" else 8)
        return max(floor, next_pow2(k))

    def key_block(self, k: int, *, backend: str, compiled: bool) -> int:
        width = self.merge_width(k, backend=backend, compiled=compiled)
        if backend == "tpu":
            if self.block_k is not None and self.block_k != width:
                raise ValueError(f"IndexerTopkConfig.block_k={self.block_k} is invalid for the TPU "
                                 f"kernel with k={k}: must be None or the merge width {width}")
            return width
        bk = self.block_k if self.block_k is not None else min(64, width)
        if bk > width:
            raise ValueError(f"IndexerTopkConfig.block_k={bk} is invalid for k={k}: must be <= "
                             f"the merge width {width}")
        return bk

    def validate_for(self, backend: str, *, compiled: bool, k: int, heads: int, dim: int) -> None:
        """Tile constraints of the compiled kernels; interpret mode has none beyond the above."""
        if self.block_q % 8 and backend == "tpu":
            raise ValueError(f"IndexerTopkConfig.block_q={self.block_q} is invalid for the TPU "
                             "kernel: must be a multiple of 8 (sublane tile)")
        self.key_block(k, backend=backend, compiled=compiled)
        if not compiled:
            return
        if backend == "tpu":
            if dim % 128:
                raise ValueError(f"index head dim Di={dim} is unsupported by the compiled TPU "
                                 "kernel: must be a multiple of 128 (lane tile)")
            if heads % 16:
                raise ValueError(f"index heads Hi={heads} is unsupported by the compiled TPU "
                                 "kernel: must be a multiple of 16 (the [block_q, Hi, Di] query "
                                 "block is flattened to matmul rows; bf16 packs 16 sublanes)")
        elif backend == "gpu":
            if not _is_pow2(self.block_q) or not _is_pow2(heads) or self.block_q * heads < 16:
                raise ValueError(f"block_q={self.block_q} x Hi={heads} is unsupported by the "
                                 "compiled GPU kernel: both powers of two with a product >= 16 "
                                 "(Triton dot M)")
            if not _is_pow2(dim) or dim < 16:
                raise ValueError(f"index head dim Di={dim} is unsupported by the compiled GPU "
                                 "kernel: must be a power of two >= 16")
            bk = self.key_block(k, backend=backend, compiled=compiled)
            if bk < 16:
                raise ValueError(f"IndexerTopkConfig.block_k={bk} is invalid for the compiled GPU "
                                 "kernel: must be >= 16 (Triton dot N)")
        else:
            raise ValueError(f"backend={backend!r} is invalid: allowed values 'tpu', 'gpu'")


def default_config(backend: str, *, compiled: bool) -> IndexerTopkConfig:
    if backend == "tpu":
        return IndexerTopkConfig(block_q=8)
    return IndexerTopkConfig(block_q=8 if not compiled else 2, block_k=None, num_warps=4,
                             num_stages=1)
