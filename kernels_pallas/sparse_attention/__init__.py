"""CSA token-sparse attention: window + top-k compressed entries + sink (TPU Mosaic, GPU Triton).

    from kernels_pallas.sparse_attention import csa_attention
    out, lse = csa_attention(q, kv, compressed, topk_idx, sink, window=128, scale=512**-0.5,
                             segment_ids=None, implementation=None)   # see api.py

Files: api.py (entry point, validation), config.py (block sizes), reference.py (dense and
gathered jnp), tpu.py (Mosaic: row-gather DMAs, scatter-free chunked backward + XLA
scatter-add), gpu.py (Pallas Triton: per-query programs, fp32 atomic backward), vjp.py
(custom_vjp), aot_memory.py (compiler-reported HBM at 64K on v5p vs the dense-mask form).
"""
from kernels_pallas.sparse_attention.api import (IMPLEMENTATIONS, csa_attention,
                                                 default_implementation, validate_inputs)
from kernels_pallas.sparse_attention.config import SparseAttentionConfig
from kernels_pallas.sparse_attention.reference import csa_reference, csa_xla

__all__ = ["IMPLEMENTATIONS", "SparseAttentionConfig", "csa_attention", "csa_reference", "csa_xla",
           "default_implementation", "validate_inputs"]
