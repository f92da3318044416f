"""Fused lightning indexer: ReLU multi-head scores over compressed keys + exact streaming top-k,
never writing the [S, N] score matrix (TPU Mosaic, GPU Triton, interpret mode on CPU).

    from kernels_pallas.indexer_topk import indexer_topk
    idx = indexer_topk(q, weights, keys, k=512, ratio=4, segment_ids=None)   # see api.py

Files: api.py (entry point, validation), config.py (blocks), plan.py (segments, tile ranges),
reference.py (naive and query-chunked jnp), bitonic.py (the exact top-k merge network),
tpu.py, gpu.py, aot_memory.py (compiler-reported HBM at 64K vs the naive form).
"""
from kernels_pallas.indexer_topk.api import (IMPLEMENTATIONS, default_implementation,
                                             indexer_max_score, indexer_topk, validate_inputs)
from kernels_pallas.indexer_topk.config import IndexerTopkConfig
from kernels_pallas.indexer_topk.reference import indexer_topk_reference, indexer_topk_xla

__all__ = ["IMPLEMENTATIONS", "IndexerTopkConfig", "default_implementation", "indexer_max_score",
           "indexer_topk", "indexer_topk_reference", "indexer_topk_xla", "validate_inputs"]
