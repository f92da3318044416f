"""Grouped matmul (MoE expert product) registry: ragged_dot reference, Mosaic TPU and Pallas
Triton kernels with a custom_vjp, optional tokamax.

    from kernels_pallas.grouped_matmul import grouped_matmul
    out = grouped_matmul(lhs, rhs, group_sizes, implementation=None)   # see api.py

Files: api.py (registry, validation), config.py (tiles), plan.py (visit lists), reference.py
(lax.ragged_dot), tpu.py (gmm/tgmm Mosaic kernels), gpu.py (Triton kernels), vjp.py.
"""
from kernels_pallas.grouped_matmul.api import (IMPLEMENTATIONS, default_implementation,
                                               grouped_matmul, grouped_matmul_transposed,
                                               tokamax_available, validate_inputs)
from kernels_pallas.grouped_matmul.config import GroupedMatmulConfig

__all__ = ["IMPLEMENTATIONS", "GroupedMatmulConfig", "default_implementation", "grouped_matmul",
           "grouped_matmul_transposed", "tokamax_available", "validate_inputs"]
