"""Tile sizes of the grouped-matmul kernels: a frozen dataclass, validated up front."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tiles of `out[rows of group g] = lhs[rows] @ rhs[g]` ([M, K] x [G, K, N] -> [M, N]).

    block_m: rows per tile (a tile can hold the end of one group and the start of the next: it is
             visited once per group it touches and each visit stores only its own rows).
             TPU compiled: a multiple of 8 (16 for bf16); GPU compiled: a power of two >= 16.
    block_k: contraction tile. TPU compiled: a multiple of 128; GPU: a power of two >= 16.
    block_n: output-column tile. TPU compiled: a multiple of 128; GPU: a power of two >= 16.
    num_warps, num_stages: Triton launch parameters (GPU only).
    vmem_limit_bytes: Mosaic scoped-VMEM limit (TPU only; None = compiler default).

    Shapes that are not multiples of the tiles are zero-padded by the wrapper (and the output
    cropped), so any M, K, N work; padding costs a copy, so pick tiles that divide the model's
    hidden and expert widths.
    """
    block_m: int = 128
    block_k: int = 128
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GroupedMatmulConfig.{name}={v!r} is invalid: must be an "
                                 "int >= 1")
        if self.block_m % 8:
            raise ValueError(f"GroupedMatmulConfig.block_m={self.block_m} is invalid: must be a "
                             "multiple of 8 (sublane tile)")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"GroupedMatmulConfig.num_warps={self.num_warps} must be a power of 2")
        if self.vmem_limit_bytes is not None and self.vmem_limit_bytes < (1 << 20):
            raise ValueError(f"GroupedMatmulConfig.vmem_limit_bytes={self.vmem_limit_bytes} is "
                             "invalid: None or at least 1 MiB")

    def validate_for(self, backend: str, *, compiled: bool, dtype=None) -> None:
        """Tile constraints of the compiled kernels ("tpu" or "gpu"); interpret mode has none
        beyond the construction checks."""
        if not compiled:
            return
        if backend == "tpu":
            sub = 8 * (4 // jnp.dtype(dtype).itemsize) if dtype is not None else 8
            if self.block_m % sub:
                raise ValueError(f"GroupedMatmulConfig.block_m={self.block_m} is invalid for the "
                                 f"compiled TPU kernel with {dtype}: must be a multiple of {sub}")
            for name in ("block_k", "block_n"):
                if getattr(self, name) % 128:
                    raise ValueError(f"GroupedMatmulConfig.{name}={getattr(self, name)} is invalid "
                                     "for the compiled TPU kernel: must be a multiple of 128 "
                                     "(lane tile)")
        elif backend == "gpu":
            for name in ("block_m", "block_k", "block_n"):
                v = getattr(self, name)
                if not _is_pow2(v) or v < 16:
                    raise ValueError(f"GroupedMatmulConfig.{name}={v} is invalid for the compiled "
                                     "GPU kernel: must be a power of two >= 16 (Triton dot tile)")
        else:
            raise ValueError(f"backend={backend!r} is invalid: allowed values 'tpu', 'gpu'")


def default_config(backend: str, *, compiled: bool, m: int, k: int, n: int) -> GroupedMatmulConfig:
    """Per-backend defaults; interpret mode shrinks the tiles to the problem so CPU tests stay
    cheap (the interpreter's cost grows with the padded size)."""
    if not compiled:
        def fit(x, cap):
            return max(8, min(cap, 1 << max(3, (int(x) - 1).bit_length())))
        return GroupedMatmulConfig(block_m=fit(m, 32), block_k=fit(k, 64), block_n=fit(n, 64))
    if backend == "tpu":
        return GroupedMatmulConfig(block_m=128, block_k=_divisor_tile(k), block_n=_divisor_tile(n))
    return GroupedMatmulConfig(block_m=64, block_k=64, block_n=128, num_warps=4, num_stages=3)


def _divisor_tile(x: int) -> int:
    """The largest of 512, 256, 128 that divides x rounded up to 128 (no padding beyond that)."""
    padded = max(128, -(-int(x) // 128) * 128)
    return next(t for t in (512, 256, 128) if padded % t == 0)
