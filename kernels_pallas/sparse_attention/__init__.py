"""CSA token-sparse attention: window + top-k compressed entries + sink (TPU Mosaic, GPU Triton)."""
from kernels_pallas.sparse_attention.api import (IMPLEMENTATIONS, csa_attention,
                                                 default_implementation, validate_inputs)
from kernels_pallas.sparse_attention.config import SparseAttentionConfig
from kernels_pallas.sparse_attention.reference import csa_reference, csa_xla

__all__ = ["IMPLEMENTATIONS", "SparseAttentionConfig", "csa_attention", "csa_reference", "csa_xla",
           "default_implementation", "validate_inputs"]
