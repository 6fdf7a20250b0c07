"""Quantization grids (onnxq.grids): scales and zero points from ranges, fake-quantization error
bounds, FP8 rounding and saturation, per-channel weight scales. Pure numpy, no model."""

import ml_dtypes
import numpy as np
import pytest

from onnxq import grids
from onnxq.grids import FP8, FP8_MAX, INT8, UINT8


@pytest.fixture
def x():
    return np.random.default_rng(0).normal(0, 2.0, size=4096).astype(np.float32)


@pytest.mark.parametrize("g", [INT8, UINT8])
def test_integer_round_trip_error_is_at_most_half_a_step(x, g):
    lo, hi = float(x.min()), float(x.max())
    scale, zero = grids.scale_zero_point(lo, hi, g)
    xq = grids.fake_quant(x, scale, zero, g)
    assert np.abs(xq - x).max() <= scale / 2 * (1 + 1e-5)
    q = np.rint(xq / scale) + zero  # the integer codes behind the dequantized values
    assert q.min() >= g.qmin and q.max() <= g.qmax


def test_symmetric_int8_scale_is_amax_over_127():
    scale, zero = grids.scale_zero_point(-3.0, 12.7, INT8)
    assert zero == 0 and scale == pytest.approx(12.7 / 127)


def test_uint8_range_is_widened_to_hold_zero_and_zero_is_exact():
    scale, zero = grids.scale_zero_point(-1.0, 3.0, UINT8)
    assert scale == pytest.approx(4.0 / 255)
    assert zero == round(1.0 / scale)
    assert grids.fake_quant(np.zeros(3, np.float32), scale, zero, UINT8).tolist() == [0.0, 0.0, 0.0]


def test_zero_point_of_one_signed_ranges():
    # all positive (after ReLU): the range starts at 0, zero point 0, the whole grid above it
    scale, zero = grids.scale_zero_point(0.5, 6.0, UINT8)
    assert zero == 0 and scale == pytest.approx(6.0 / 255)
    # all negative: the range ends at 0, zero point at the top of the grid
    scale, zero = grids.scale_zero_point(-4.0, -1.0, UINT8)
    assert zero == 255 and scale == pytest.approx(4.0 / 255)
    xq = grids.fake_quant(np.array([-4.0, -1.0, 0.0], np.float32), scale, zero, UINT8)
    np.testing.assert_allclose(xq, [-4.0, -1.0, 0.0], atol=scale / 2)


@pytest.mark.parametrize("g", [INT8, UINT8, FP8])
def test_all_zero_range_gets_scale_one(g):
    assert grids.scale_zero_point(0.0, 0.0, g) == (1.0, 0)


def test_int8_activations_saturate_at_minus_128_weights_at_minus_127():
    scale = 1.0
    v = np.array([-200.0, -128.0, 127.0, 200.0], np.float32)
    assert grids.fake_quant(v, scale, 0, INT8).tolist() == [-128.0, -128.0, 127.0, 127.0]
    assert grids.fake_quant(v, scale, 0, INT8, restricted=True).tolist() == [-127.0, -127.0, 127.0, 127.0]


def test_fp8_saturates_at_448_and_keeps_nan():
    v = np.array([1000.0, -1e6, np.inf, -np.inf, 448.0, 449.0, np.nan], np.float32)
    q = grids.to_fp8(v)
    assert q.dtype == ml_dtypes.float8_e4m3fn
    out = q.astype(np.float32)
    assert out[:6].tolist() == [448.0, -448.0, 448.0, -448.0, 448.0, 448.0]
    assert np.isnan(out[6])


def test_fp8_round_trip_relative_error_is_at_most_half_an_ulp(x):
    scale, zero = grids.scale_zero_point(float(x.min()), float(x.max()), FP8)
    assert zero == 0 and scale == pytest.approx(float(np.abs(x).max()) / FP8_MAX)
    xq = grids.fake_quant(x, scale, zero, FP8)
    # 3 mantissa bits: half an ulp is 2^-4 of the value for normals; subnormals step by 2^-9
    bound = np.maximum(np.abs(x) * 2.0**-4, scale * 2.0**-10)
    assert np.all(np.abs(xq - x) <= bound * (1 + 1e-5))
    assert np.abs(xq).max() <= np.abs(x).max() * (1 + 1e-6)


def test_fp8_values_are_e4m3fn_numbers():
    v = np.array([0.1, 1.3, 17.0, 300.0], np.float32)
    q = grids.to_fp8(v).astype(np.float32)
    # every result is exactly representable: casting again changes nothing
    assert np.array_equal(q, q.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    assert q.tolist() == [float(np.float32(t).astype(ml_dtypes.float8_e4m3fn)) for t in v]


def test_per_channel_weight_scales_and_codes():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(6, 4, 3, 3)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None, None, None]
    w[2] = 0.0  # an all-zero channel
    q, scale = grids.quantize_weight(w, 0, "int8")
    expected = [float(np.abs(w[c]).max()) / 127 if np.abs(w[c]).max() > 0 else 1.0 for c in range(6)]
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    assert scale.dtype == np.float32 and q.dtype == np.int8
    assert [int(np.abs(q[c]).max()) for c in range(6)] == [127, 127, 0, 127, 127, 127]
    back = grids.fake_quant_weight(w, 0, "int8")
    assert np.all(np.abs(back - w) <= scale[:, None, None, None] / 2 * (1 + 1e-5))


def test_per_channel_fp8_weight_scales_on_another_axis():
    w = np.random.default_rng(2).normal(size=(8, 5)).astype(np.float32)
    q, scale = grids.quantize_weight(w, 1, "float8e4m3fn")
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / FP8_MAX, rtol=1e-6)
    np.testing.assert_array_equal(np.abs(q.astype(np.float32)).max(axis=0), FP8_MAX)


def test_per_tensor_weight_scale_and_zero_weight():
    w = np.array([[0.5, -2.0], [1.0, 0.25]], np.float32)
    q, scale = grids.quantize_weight(w, None, "int8")
    assert scale.shape == () and float(scale) == pytest.approx(2.0 / 127)
    q, scale = grids.quantize_weight(np.zeros((3, 2), np.float32), 1, "int8")
    assert scale.tolist() == [1.0, 1.0] and not q.any()


def test_weights_refuse_an_asymmetric_grid():
    with pytest.raises(ValueError, match="uint8"):
        grids.quantize_weight(np.ones((2, 2), np.float32), 0, "uint8")


def test_grid_table():
    assert grids.GRIDS["uint8"] is UINT8 and set(grids.WEIGHT_GRIDS) == {"int8", "float8e4m3fn"}
    assert (INT8.steps, UINT8.steps, FP8.steps) == (127, 255, FP8_MAX)
    assert FP8.is_float and not INT8.is_float
