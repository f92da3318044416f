"""Low-precision storage formats of the released DeepSeek-V4 checkpoints (spec §10), in NumPy.

* FP8: `float8_e4m3fn` weights [out, in] with one power-of-two scale per 128x128 block, stored as
  ue8m0 (`float8_e8m0fnu`: the byte b means 2**(b - 127); 0xFF is NaN) in a grid
  [ceil(out/128), ceil(in/128)]. Edge blocks of shapes that are not multiples of 128 are partial.
* FP4: e2m1 values packed two per byte (int8/uint8 [out, in/2]; the low nibble holds the even
  column, the high nibble the odd one) with one ue8m0 scale per 32 consecutive inputs
  ([out, ceil(in/32)]).

Dequantisation is exact: every FP8/FP4 value times a power of two is representable in float32
(down to float32 subnormals), so the float32 result is the true value; a cast to bfloat16 after
that is the only rounding. Products that overflow float32 (large values with scales near 2**127)
and NaN codes are errors naming the tensor, never silently inf/NaN.

Scales stored as float32 (the DeepSeek-V3 style `scale_fmt=None`) are accepted as well.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = (128, 128)
FP4_BLOCK = 32

# e2m1: sign bit 3, exponent bits 2-1, mantissa bit 0. Index = the 4-bit code.
FP4_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


class QuantError(ValueError):
    """A quantised tensor cannot be decoded; the message names the tensor."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def e8m0_to_float32(scale: np.ndarray, name: str = "scale") -> np.ndarray:
    """ue8m0 scales (float8_e8m0fnu or raw uint8 bytes) or float32 scales -> float32 2**(b-127)."""
    if scale.dtype == np.float32:
        return scale
    if scale.dtype == ml_dtypes.float8_e8m0fnu:
        raw = scale.view(np.uint8)
    elif scale.dtype in (np.uint8, np.int8):
        raw = scale.view(np.uint8)
    else:
        raise QuantError(f"{name}: scale dtype {scale.dtype} is not supported "
                         "(expected float8_e8m0fnu, uint8 holding ue8m0 bytes, or float32)")
    if np.any(raw == 0xFF):
        raise QuantError(f"{name}: ue8m0 scale byte 0xFF is NaN")
    # ldexp is exact for every exponent in [-127, 127] (2**-127 is a float32 subnormal).
    return np.ldexp(np.float32(1.0), raw.astype(np.int32) - 127).astype(np.float32)


def _check_finite(out: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(out)):
        bad = np.argwhere(~np.isfinite(out))[0]
        raise QuantError(f"{name}: dequantised value at index {tuple(int(i) for i in bad)} is not "
                         "finite (a NaN code, or value x scale overflows float32)")
    return out


def _expand_block_scales(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int],
                         name: str) -> np.ndarray:
    rows, cols = shape
    br, bc = block
    want = (_ceil_div(rows, br), _ceil_div(cols, bc))
    if tuple(scale.shape) != want:
        raise QuantError(f"{name}: scale grid has shape {tuple(scale.shape)}, expected {want} "
                         f"for a weight of shape {shape} with {br}x{bc} blocks")
    return np.repeat(np.repeat(scale, br, axis=0)[:rows], bc, axis=1)[:, :cols]


def dequant_fp8(weight: np.ndarray, scale: np.ndarray, *, block: tuple[int, int] = FP8_BLOCK,
                name: str = "weight") -> np.ndarray:
    """weight [out, in] float8_e4m3fn (or its raw uint8 bytes); scale [ceil(out/br), ceil(in/bc)]
    ue8m0 or float32 -> float32 [out, in], exactly weight * scale of its block."""
    if weight.ndim != 2:
        raise QuantError(f"{name}: FP8 weight must be 2-D [out, in], got shape {weight.shape}")
    if weight.dtype in (np.uint8, np.int8):
        weight = weight.view(np.uint8).view(ml_dtypes.float8_e4m3fn)
    if weight.dtype != ml_dtypes.float8_e4m3fn:
        raise QuantError(f"{name}: expected float8_e4m3fn weight, got {weight.dtype}")
    s = _expand_block_scales(e8m0_to_float32(scale, name + " scale"), weight.shape, block, name)
    with np.errstate(over="ignore", invalid="ignore"):
        out = weight.astype(np.float32) * s
    return _check_finite(out, name)


def unpack_fp4(packed: np.ndarray, name: str = "weight") -> np.ndarray:
    """[..., n/2] bytes holding two e2m1 codes each (low nibble first) -> float32 [..., n]."""
    if packed.dtype not in (np.int8, np.uint8):
        raise QuantError(f"{name}: packed FP4 weight must be int8/uint8, got {packed.dtype}")
    raw = packed.view(np.uint8)
    out = np.empty(raw.shape[:-1] + (2 * raw.shape[-1],), np.float32)
    out[..., 0::2] = FP4_E2M1_VALUES[raw & 0x0F]
    out[..., 1::2] = FP4_E2M1_VALUES[raw >> 4]
    return out


def dequant_fp4(packed: np.ndarray, scale: np.ndarray, *, block: int = FP4_BLOCK,
                name: str = "weight") -> np.ndarray:
    """packed [out, in/2] int8/uint8; scale [out, ceil(in/block)] ue8m0 or float32
    -> float32 [out, in]."""
    if packed.ndim != 2:
        raise QuantError(f"{name}: FP4 weight must be 2-D [out, in/2], got shape {packed.shape}")
    values = unpack_fp4(packed, name)
    s = _expand_block_scales(e8m0_to_float32(scale, name + " scale"), values.shape, (1, block),
                             name)
    with np.errstate(over="ignore", invalid="ignore"):
        out = values * s
    return _check_finite(out, name)


def dequant(weight: np.ndarray, scale: np.ndarray, *, fp8_block: tuple[int, int] = FP8_BLOCK,
            fp4_block: int = FP4_BLOCK, name: str = "weight") -> np.ndarray:
    """Dispatch on the stored dtype: float8_e4m3fn -> FP8 blocks; int8/uint8 -> packed FP4."""
    if weight.dtype == ml_dtypes.float8_e4m3fn:
        return dequant_fp8(weight, scale, block=fp8_block, name=name)
    if weight.dtype in (np.int8, np.uint8):
        return dequant_fp4(weight, scale, block=fp4_block, name=name)
    raise QuantError(f"{name}: has a scale companion but dtype {weight.dtype} is neither "
                     "float8_e4m3fn (FP8) nor int8 (packed FP4)")


# ---------------------------------------------------------------------------------------------
# Quantisers: used to build official-format test checkpoints. They round to nearest (ties to
# even for FP8 via ml_dtypes; to the nearest e2m1 code for FP4) with power-of-two block scales
# chosen so the block's max magnitude fits the format.
# ---------------------------------------------------------------------------------------------
def _pow2_scale_bytes(amax: np.ndarray, fmt_max: float) -> np.ndarray:
    """Smallest power-of-two scale with amax / scale <= fmt_max, as ue8m0 bytes."""
    amax = np.maximum(amax.astype(np.float64), np.finfo(np.float32).tiny)
    exp = np.ceil(np.log2(amax / fmt_max)).astype(np.int32)
    return np.clip(exp + 127, 0, 254).astype(np.uint8)


def quant_fp8(w: np.ndarray, block: tuple[int, int] = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] -> (float8_e4m3fn [out, in], ue8m0 scales [ceil(out/br), ceil(in/bc)])."""
    rows, cols = w.shape
    br, bc = block
    gr, gc = _ceil_div(rows, br), _ceil_div(cols, bc)
    padded = np.zeros((gr * br, gc * bc), np.float32)
    padded[:rows, :cols] = np.abs(w)
    amax = padded.reshape(gr, br, gc, bc).max(axis=(1, 3))
    sb = _pow2_scale_bytes(amax, 448.0)
    s = _expand_block_scales(np.ldexp(np.float32(1), sb.astype(np.int32) - 127), w.shape, block,
                             "w")
    q = (w.astype(np.float32) / s).astype(ml_dtypes.float8_e4m3fn)
    return q, sb.view(ml_dtypes.float8_e8m0fnu)


def quant_fp4(w: np.ndarray, block: int = FP4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float [out, in] (in even) -> (int8 [out, in/2] packed e2m1,
    ue8m0 scales [out, ceil(in/block)])."""
    rows, cols = w.shape
    if cols % 2:
        raise QuantError(f"FP4 packing needs an even number of columns, got {cols}")
    g = _ceil_div(cols, block)
    padded = np.zeros((rows, g * block), np.float32)
    padded[:, :cols] = np.abs(w)
    sb = _pow2_scale_bytes(padded.reshape(rows, g, block).max(axis=2), 6.0)
    s = _expand_block_scales(np.ldexp(np.float32(1), sb.astype(np.int32) - 127), w.shape,
                             (1, block), "w")
    x = w.astype(np.float32) / s
    mags = FP4_E2M1_VALUES[:8]
    code = np.argmin(np.abs(np.abs(x)[..., None] - mags), axis=-1).astype(np.uint8)
    code = code | np.where(np.signbit(x), 8, 0).astype(np.uint8)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).astype(np.uint8)
    return packed.view(np.int8), sb.view(ml_dtypes.float8_e8m0fnu)
