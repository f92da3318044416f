"""FP8 (e4m3, 128x128 ue8m0 blocks) and FP4 (e2m1 packed, per-32 ue8m0) dequantisation.

Expected values are written out by hand from the format definitions: e4m3fn = 1 sign, 4 exponent
(bias 7), 3 mantissa bits; e2m1 = 1 sign, 2 exponent (bias 1), 1 mantissa bit; ue8m0 byte b
means 2**(b - 127).
"""
import ml_dtypes
import numpy as np
import pytest

from sparse_lm.convert import quant

E4M3 = ml_dtypes.float8_e4m3fn


def codes(*bytes_):
    return np.array(bytes_, np.uint8).view(E4M3)


def ue8m0(rows):
    return np.array(rows, np.uint8).view(ml_dtypes.float8_e8m0fnu)


def test_e8m0_scales_are_powers_of_two_including_the_extremes():
    s = quant.e8m0_to_float32(ue8m0([0, 1, 126, 127, 128, 254]))
    assert s.dtype == np.float32
    assert s.tolist() == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127]
    assert s[0] > 0                                   # 2**-127 is a float32 subnormal, not 0
    with pytest.raises(quant.QuantError, match="0xFF is NaN"):
        quant.e8m0_to_float32(ue8m0([3, 255]))


def test_fp8_codes_decode_to_hand_computed_values_with_unit_scale():
    # 0x38 = 0 0111 000 = 1.0; 0x3C = 1.5; 0xB8 = -1.0; 0x7E = 448 (max); 0x01 = 2**-9 (min
    # subnormal); 0x80 = -0.0; 0x08 = 2**-6 (min normal).
    w = codes(0x38, 0x3C, 0xB8, 0x7E, 0x01, 0x80, 0x08, 0x00).reshape(1, 8)
    out = quant.dequant_fp8(w, ue8m0([[127]]), name="t")
    assert out.tolist() == [[1.0, 1.5, -1.0, 448.0, 2.0 ** -9, -0.0, 2.0 ** -6, 0.0]]
    assert np.signbit(out[0, 5]) and not np.signbit(out[0, 7])     # negative zero survives


def test_fp8_block_scales_on_an_odd_shape_use_each_blocks_own_scale():
    # [130, 257] -> a 2 x 3 grid of 128x128 blocks, the last row/column of blocks partial.
    w = np.full((130, 257), 0x38, np.uint8).view(E4M3)              # every value 1.0
    w[129, 256] = codes(0xB8)[0]                                    # one -1.0 in the corner block
    scale = ue8m0([[127, 128, 126], [130, 0, 254]])                 # 1, 2, 1/2 / 8, 2^-127, 2^127
    out = quant.dequant_fp8(w, scale, name="t")
    assert out.shape == (130, 257)
    assert out[0, 0] == out[127, 127] == 1.0
    assert out[0, 128] == out[127, 255] == 2.0
    assert out[0, 256] == out[127, 256] == 0.5
    assert out[128, 0] == out[129, 127] == 8.0
    assert out[128, 128] == out[129, 255] == np.float32(2.0 ** -127)
    assert out[128, 256] == np.float32(2.0 ** 127) and out[129, 256] == -np.float32(2.0 ** 127)


def test_fp8_smallest_value_times_smallest_scale_is_exact_and_overflow_is_an_error():
    out = quant.dequant_fp8(codes(0x01).reshape(1, 1), ue8m0([[0]]), name="t")
    assert out[0, 0] == np.float32(2.0 ** -136) and out[0, 0] > 0     # 2^-9 * 2^-127, subnormal
    with pytest.raises(quant.QuantError, match="blk.w.*not finite"):
        quant.dequant_fp8(codes(0x7E).reshape(1, 1), ue8m0([[254]]), name="blk.w")  # 448*2^127
    with pytest.raises(quant.QuantError, match="blk.w.*not finite"):
        quant.dequant_fp8(codes(0x7F).reshape(1, 1), ue8m0([[127]]), name="blk.w")  # NaN code


def test_fp8_rejects_a_scale_grid_of_the_wrong_shape_naming_the_tensor():
    w = np.zeros((130, 257), np.uint8).view(E4M3)
    with pytest.raises(quant.QuantError, match=r"layers.0.attn.wq_a.weight.*\(2, 3\)"):
        quant.dequant_fp8(w, ue8m0([[127, 127]]), name="layers.0.attn.wq_a.weight")


def test_fp4_nibbles_low_first_with_hand_computed_values_and_negative_zero():
    # byte 0x21: low nibble 1 (0.5) then high nibble 2 (1.0); 0x80: 0.0 then -0.0;
    # 0xF7: 7 (6.0) then 15 (-6.0); 0x3B: 11 (-1.5) then 3 (1.5).
    packed = np.array([[0x21, 0x80, 0xF7, 0x3B]], np.uint8).view(np.int8)
    out = quant.dequant_fp4(packed, ue8m0([[127]]), name="t")
    assert out.tolist() == [[0.5, 1.0, 0.0, -0.0, 6.0, -6.0, -1.5, 1.5]]
    assert np.signbit(out[0, 3]) and not np.signbit(out[0, 2])


def test_fp4_per_32_scales_on_an_odd_shape():
    # 3 rows x 66 values (33 bytes): blocks of 32 columns -> 3 scales per row, the last partial.
    packed = np.full((3, 33), 0x22, np.uint8).view(np.int8)          # every value 1.0
    scale = ue8m0([[127, 128, 0], [254, 126, 127], [125, 127, 129]])
    out = quant.dequant_fp4(packed, scale, name="t")
    assert out.shape == (3, 66)
    assert out[0, 0] == out[0, 31] == 1.0 and out[0, 32] == out[0, 63] == 2.0
    assert out[0, 64] == out[0, 65] == np.float32(2.0 ** -127)
    assert out[1, 0] == np.float32(2.0 ** 127) and out[1, 40] == 0.5
    assert out[2, 10] == 0.25 and out[2, 65] == 4.0
    with pytest.raises(quant.QuantError, match="scale grid"):
        quant.dequant_fp4(packed, ue8m0([[127, 127]] * 3), name="t")


def test_dequant_accepts_raw_uint8_scales_and_float32_scales_alike():
    w = codes(0x3C, 0xB8).reshape(1, 2)
    a = quant.dequant_fp8(w, np.array([[130]], np.uint8))
    b = quant.dequant_fp8(w, np.array([[8.0]], np.float32))
    c = quant.dequant_fp8(w, ue8m0([[130]]))
    assert a.tolist() == b.tolist() == c.tolist() == [[12.0, -8.0]]


@pytest.mark.parametrize("shape", [(5, 70), (130, 200)])
def test_quantisers_round_trip_representable_values_exactly_and_bound_the_error(shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * 3).astype(np.float32)
    q8, s8 = quant.quant_fp8(w)
    d8 = quant.dequant_fp8(q8, s8)
    assert np.array_equal(quant.dequant_fp8(*quant.quant_fp8(d8)), d8)    # idempotent
    assert np.all(np.abs(d8 - w) <= np.abs(w) * 2.0 ** -4 + 2.0 ** -9 * 2.0 ** 2)
    q4, s4 = quant.quant_fp4(w)
    d4 = quant.dequant_fp4(q4, s4)
    assert d4.shape == shape
    assert np.array_equal(quant.dequant_fp4(*quant.quant_fp4(d4)), d4)
    # e2m1 spacing is at most 2 (between 4 and 6) on a scale that maps the block max to <= 6.
    assert np.all(np.abs(d4 - w) <= np.abs(w).max() / 6 * 1.0 * 2)
