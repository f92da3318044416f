"""The static description of one kernel call (hashable), shared by the TPU and GPU kernels."""
from __future__ import annotations

import dataclasses

import numpy as np

from kernels_pallas.block_sparse_attention import mask as mask_lib
from kernels_pallas.block_sparse_attention.config import BlockSizes

# Logit of masked entries: finite (exp underflows to exactly 0 against any finite running max,
# and the running max never goes below the sink logit it starts from, so no inf - inf).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call.

    Kernel operands (rows = (query, head) pairs, head fastest; R_q = geom.q_pad * num_heads):
      q2 [B, R_q, D]; keys [B, K, D] = [window keys | compressed entries], both regions padded;
      kpos [B, K] int32 (per-key first visible query; NEVER for padding and invalid entries);
      kend (static, `mask.key_intervals`); kseg [B, K] / qseg [B, R_q] int32 segment ids or None;
      sink [H] fp32.
    always_mask: data-dependent visibility (segments or entry validity) exists, so every block,
      including positionally full ones, applies the in-kernel mask.
    """
    geom: mask_lib.Geometry
    num_heads: int
    head_dim: int
    scale: float
    blocks: BlockSizes
    platform: str          # "tpu" | "gpu": which kernel family
    interpret: bool
    has_segments: bool
    always_mask: bool

    @property
    def num_rows(self) -> int:
        return self.geom.q_pad * self.num_heads

    def qpos_rows(self) -> np.ndarray:
        """[R_q] int32: the query position of each (query, head) row."""
        return np.repeat(np.arange(self.geom.q_pad, dtype=np.int32), self.num_heads)

    def kend(self) -> np.ndarray:
        return mask_lib.key_intervals(self.geom)[1]

    def query_map(self, bq: int, bk: int) -> np.ndarray:
        return mask_lib.query_block_map(self.geom, bq, bk)

    def key_map(self, bq: int, bk: int) -> np.ndarray:
        return mask_lib.key_block_map(self.geom, bq, bk)


def grid_steps(packed: np.ndarray) -> int:
    """Grid extent along the visited axis: the longest row (at least 1)."""
    return max(1, int(mask_lib.steps_per_row(packed).max(initial=0)))
