"""Block-sparse attention over `[window keys | compressed entries]` (HCA and SWA layers).

Public API: `block_sparse_attention` (see `api.py`), `BlockSizes` (tile sizes), the host-side
block map in `mask.py` and the pure-jnp `reference`.
"""
from kernels_pallas.block_sparse_attention.api import (IMPLEMENTATIONS, block_sparse_attention,
                                                        default_implementation)
from kernels_pallas.block_sparse_attention.config import BlockSizes, default_block_sizes

__all__ = ["IMPLEMENTATIONS", "BlockSizes", "block_sparse_attention", "default_block_sizes",
           "default_implementation"]
