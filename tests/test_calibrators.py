"""Histogram calibration: streaming histograms, range methods with known answers, ORT's entropy
threshold, per-channel abs-max, and the calibration table (round trip, wrong model, corruption)."""

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
import synthetic

from onnxq.calibrators import (
    CalibrationTable,
    CalibrationTableError,
    Histogram,
    collect,
    compute_range,
)
from onnxq import grids
from onnxq.calibrators.histogram import BINS
from onnxq.calibrators.methods import CalibrationMethodError, entropy_window
from onnxq.errors import OnnxqError
from onnxq.passes import preprocess
from onnxq.calibration import activation_params, all_calibration_tensors, calibrate
from onnxq.pipeline import quantize
from onnxq.passes.preprocess import load_and_preprocess

HIST_METHODS = ("percentile", "entropy", "mse")


def _hist(x, batches=1):
    h = Histogram()
    for part in np.array_split(np.asarray(x, dtype=np.float32), batches):
        h.update(part)
    return h


def _ranges(x, symmetric, batches=4):
    h = _hist(x, batches)
    lo, hi = float(x.min()), float(x.max())
    return {m: compute_range(lo, hi, h, m, symmetric=symmetric) for m in ("minmax", *HIST_METHODS)}


# --- histogram -------------------------------------------------------------------------------
def test_histogram_merged_over_batches_equals_one_shot_histogram():
    rng = np.random.default_rng(0)
    # growing ranges: every batch forces a re-binning of the ones before
    batches = [rng.normal(0, 0.01 * 4**i, 5000).astype(np.float32) for i in range(6)]
    h = Histogram()
    for b in batches:
        h.update(b)
    x = np.concatenate(batches)
    assert h.range == 2.0 ** np.ceil(np.log2(np.abs(x).max()))
    one_shot, _ = np.histogram(x, bins=BINS, range=(-h.range, h.range))
    assert h.total == x.size
    assert np.abs(h.counts - one_shot).sum() <= 2  # an element exactly on an edge may go either way
    # order does not matter either
    h2 = Histogram()
    for b in batches[::-1]:
        h2.update(b)
    np.testing.assert_array_equal(h.counts, h2.counts)
    # nor does merging separately built histograms
    h3, h4 = _hist(np.concatenate(batches[:3])), _hist(np.concatenate(batches[3:]))
    h3.merge(h4)
    np.testing.assert_array_equal(h.counts, h3.counts)


def test_histogram_abs_counts_and_json_round_trip():
    x = np.array([-3.0, -0.5, 0.0, 0.0, 0.25, 3.5], dtype=np.float32)
    h = _hist(x)
    assert h.range == 4.0
    a = h.abs_counts()
    assert a.sum() == x.size and a[0] == 2  # both zeros in the first |x| bin
    back = Histogram.from_json(json.loads(json.dumps(h.to_json())))
    np.testing.assert_array_equal(back.counts, h.counts)
    assert back.range == h.range


# --- methods with known answers ---------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_uniform_every_method_returns_about_the_max(symmetric):
    x = np.random.default_rng(1).uniform(-2, 2, 400_000).astype(np.float32)
    amax = float(np.abs(x).max())
    for method, (lo, hi) in _ranges(x, symmetric).items():
        assert hi == pytest.approx(amax, rel=0.02), method
        assert lo == pytest.approx(-amax, rel=0.02), method


@pytest.mark.parametrize("symmetric", [True, False])
def test_gaussian_with_outliers_is_clipped_by_histogram_methods(symmetric):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 1_000_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 50.0]
    r = _ranges(x, symmetric)
    assert r["minmax"] == (-35.0, 50.0)
    # |N(0,1)| 99.99th percentile = 3.89; the INT8 KL/MSE optima of a Gaussian lie near 3-5 sigma
    assert 3.7 < r["percentile"][1] < 4.2
    for method in ("percentile", "entropy"):
        lo, hi = r[method]
        assert 3.0 < hi < 5.0 and -5.0 < lo < -3.0, (method, lo, hi)
    # MSE trades the three outliers' clipping error against a million samples' rounding error:
    # its answer is the brute-force optimum on the raw data, far below the outliers
    lo, hi = r["mse"]
    assert hi < 20 and lo > -20
    if symmetric:
        _assert_mse_optimal(x, hi)


def _sq_err(x, t, unsigned=False):
    # symmetric INT8 grid over [-t, t], or (unsigned, x >= 0) the UINT8 grid over [0, t]
    s, lo, hi = (t / 255, 0, 255) if unsigned else (t / 127, -127, 127)
    return float(np.sum((x - np.clip(np.rint(x / s), lo, hi) * s) ** 2, dtype=np.float64))


def _assert_mse_optimal(x, t, unsigned=False):
    amax = float(np.abs(x).max())
    grid = np.linspace(amax / 16, amax, 200)
    errs = [_sq_err(x, g, unsigned) for g in grid]
    assert _sq_err(x, t, unsigned) <= min(errs) * 1.03, (t, grid[int(np.argmin(errs))])


def test_non_negative_tensor_keeps_zero_and_clips_the_top():
    rng = np.random.default_rng(3)
    x = np.maximum(rng.normal(0, 1, 1_000_000), 0).astype(np.float32)
    x[:2] = 30.0
    for symmetric in (True, False):
        r = _ranges(x, symmetric)
        for method in ("percentile", "entropy"):
            lo, hi = r[method]
            assert lo == 0.0 and 3.0 < hi < 5.0, (symmetric, method, lo, hi)
        lo, hi = r["mse"]
        assert lo == 0.0 and hi < 25.0
        _assert_mse_optimal(x, hi, unsigned=not symmetric)


def test_mse_minimises_the_squared_error_it_claims():
    rng = np.random.default_rng(4)
    x = rng.laplace(0, 1, 300_000).astype(np.float32)
    h = _hist(x)
    _, hi = compute_range(x.min(), x.max(), h, "mse", symmetric=True)
    _assert_mse_optimal(x, hi)
    assert hi < 0.9 * float(np.abs(x).max())  # a Laplace tail is worth clipping


def test_zero_range_tensor_gives_a_safe_range_for_every_method():
    zeros = np.zeros(1000, dtype=np.float32)
    h = _hist(zeros)
    assert h.range == 0.0 and h.total == 1000
    for method in ("minmax", *HIST_METHODS):
        for symmetric in (True, False):
            lo, hi = compute_range(0.0, 0.0, h, method, symmetric=symmetric)
            assert (lo, hi) == (0.0, 0.0)
            params = activation_params(lo, hi, "int8" if symmetric else "uint8")
            assert params.scale == 1.0
    # a constant non-zero tensor: the range is its value, never inverted
    const = np.full(1000, 3.0, dtype=np.float32)
    for method in HIST_METHODS:
        lo, hi = compute_range(3.0, 3.0, _hist(const), method, symmetric=False)
        assert lo <= hi and hi == 3.0


def test_unknown_method_and_bad_percentile_are_clear_errors():
    h = _hist(np.arange(10, dtype=np.float32))
    with pytest.raises(CalibrationMethodError, match="choose one of"):
        compute_range(0, 9, h, "kl", symmetric=True)
    with pytest.raises(CalibrationMethodError, match="percentile"):
        compute_range(0, 9, h, "percentile", symmetric=True, percentile=101)
    with pytest.raises(CalibrationMethodError, match="recalibrate"):
        compute_range(0, 9, None, "entropy", symmetric=True)


# --- the reference: ORT's entropy threshold ---------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_entropy_threshold_equals_onnxruntime_on_the_same_histogram(seed):
    from onnxruntime.quantization.calibrate import HistogramCollector

    rng = np.random.default_rng(seed)
    x = rng.standard_t(3 + seed, 60_000).astype(np.float32) * (seed + 1)
    x[: 2 * seed] = 25 * (seed + 1)
    collector = HistogramCollector("entropy", False, 2048, 128, 99.99, "same")
    collector.collect_value({"t": [x]})
    histogram = collector.histogram_dict["t"]
    ort_lo, ort_hi = collector.get_entropy_threshold(histogram, 128)
    start, end = entropy_window(histogram[0], 128)
    edges = histogram[1]
    ours = (max(edges[start], histogram[2]), min(edges[end], histogram[3]))
    assert ours == (ort_lo, ort_hi)
    assert ort_hi < histogram[3] or seed == 0  # with outliers the search really clips


def _tensorrt_kl_reference(hist, n):
    """TensorRT's KL search written the obvious way (a loop over bins, scipy's entropy)."""
    from scipy.stats import entropy

    zero, best = hist.size // 2, (np.inf, None)
    for i in range(n // 2, zero + 1):
        s, e = zero - i, min(zero + i + 1, hist.size)
        window = hist[s:e].astype(np.float64)
        p = window.copy()
        p[0] += hist[:s].sum()
        p[-1] += hist[e:].sum()
        level = np.arange(window.size) * n // window.size
        q = np.zeros_like(p)
        for k in range(n):
            members = (level == k) & (p > 0)
            if members.any():
                q[members] = window[level == k].sum() / members.sum()
        kl = entropy(p, q) if q.sum() > 0 else np.inf
        if kl < best[0] - 1e-12:
            best = (kl, (s, e))
    return best[1]


@pytest.mark.parametrize("seed", range(3))
def test_entropy_closed_form_equals_the_obvious_loop(seed):
    rng = np.random.default_rng(10 + seed)
    x = np.concatenate([rng.normal(0, 1, 20_000), rng.exponential(0.5 + seed, 5_000)]).astype(np.float32)
    x[:seed] = 12.0
    hist, _ = np.histogram(x, bins=512, range=(-16, 16))
    assert entropy_window(hist, 64, ort_exact=False) == _tensorrt_kl_reference(hist, 64)


# --- collection through ORT -------------------------------------------------------------------
def _typed(proto):
    return preprocess(ir.from_proto(proto))


def test_collect_per_channel_amax_and_histograms_equal_numpy():
    proto = synthetic.tiny_attention()
    model = _typed(proto)
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.normal(0, 1 + i, (1, 16, 32)).astype(np.float32)} for i in range(5)]
    table = collect(model, ["x", "probs"], feeds, progress=False, histograms=True, channel_axes={"x": -1, "probs": -1})
    xs = np.concatenate([f["x"] for f in feeds])
    np.testing.assert_array_equal(table.tensors["x"].channel_amax, np.abs(xs).max(axis=(0, 1)))
    assert table.tensors["x"].channel_axis == -1
    np.testing.assert_array_equal(table.tensors["x"].histogram.counts, _hist(xs).counts)
    assert table.tensors["probs"].histogram.total == 5 * 16 * 16


@pytest.mark.parametrize("opset", [17, 18])  # the reductions' axes: an attribute before 18, an input from 18
def test_collect_conv_input_channel_amax(tmp_path, opset):
    model = _typed(synthetic.residual_cnn(opset=opset))
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.normal(0, 1, (1, 16, 8, 8)).astype(np.float32) * np.arange(1, 17, dtype=np.float32)[None, :, None, None]} for _ in range(3)]
    table = collect(model, ["x"], feeds, progress=False, channel_axes={"x": 1}, channel_ranges={"x"})
    xs = np.concatenate([f["x"] for f in feeds])
    np.testing.assert_array_equal(table.tensors["x"].channel_amax, np.abs(xs).max(axis=(0, 2, 3)))
    np.testing.assert_array_equal(table.tensors["x"].channel_min, xs.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(table.tensors["x"].channel_max, xs.max(axis=(0, 2, 3)))
    assert table.tensors["x"].histogram is None


# --- calibration table ------------------------------------------------------------------------
def test_table_round_trip_is_deterministic_and_complete(attention_case, tmp_path):
    model, calib, _ = attention_case
    t1 = calibrate(model, calib, tmp_path / "a.json", method="entropy", quiet=True)
    calibrate(model, calib, tmp_path / "b.json", method="entropy", quiet=True)
    a, b = (tmp_path / "a.json").read_text(), (tmp_path / "b.json").read_text()
    assert a == b
    back = CalibrationTable.load(tmp_path / "a.json")
    assert back.dumps() == t1.dumps() == a
    assert back.method == "entropy" and back.num_samples == 16 and len(back.model_sha256) == 64
    # a histogram for every tensor a target may quantize; min/max of every other FP32 tensor (FP16 regions)
    quantizable, _ = all_calibration_tensors(load_and_preprocess(model))
    assert all(back.tensors[t].histogram is not None for t in quantizable)
    assert set(back.tensors) - set(quantizable) and all(back.tensors[t].histogram is None for t in set(back.tensors) - set(quantizable))
    assert back.tensors["x"].channel_amax is not None  # x feeds the Q/K/V MatMuls


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "mse"])
def test_quantize_with_table_equals_quantize_with_calib(attention_case, tmp_path, method):
    model, calib, _ = attention_case
    calibrate(model, calib, tmp_path / "t.json", quiet=True)
    for target in ("tensorrt", "ort"):
        quantize(model, tmp_path / "direct.onnx", calib, target=target, method=method, evaluate=False, quiet=True)
        res = quantize(model, tmp_path / "table.onnx", table=tmp_path / "t.json", target=target, method=method, evaluate=False, quiet=True)
        assert (tmp_path / "direct.onnx").read_bytes() == (tmp_path / "table.onnx").read_bytes(), target
        assert res.table.num_samples == 16


def test_method_per_consumer_op_type(attention_case, tmp_path):
    model, calib, _ = attention_case
    res = quantize(model, tmp_path / "m.onnx", calib, method={"matmul": "percentile", "default": "minmax"}, percentile=90.0, evaluate=False, quiet=True)
    minmax = quantize(model, tmp_path / "n.onnx", calib, method="minmax", evaluate=False, quiet=True)
    for name, params in res.plan.activations.items():
        assert params.scale < minmax.plan.activations[name].scale  # every quantized tensor here feeds a MatMul
    with pytest.raises(OnnxqError, match="choose one of"):
        quantize(model, tmp_path / "x.onnx", calib, method={"matmul": "kl"}, evaluate=False, quiet=True)


def test_table_from_another_model_is_a_clear_error(attention_case, tmp_path):
    model, calib, _ = attention_case
    other = synthetic.save(synthetic.tiny_attention(seed=1), tmp_path / "other.onnx")  # same graph, other weights
    calibrate(model, calib, tmp_path / "t.json", quiet=True)
    with pytest.raises(CalibrationTableError, match="another model"):
        quantize(other, tmp_path / "o.onnx", table=tmp_path / "t.json", evaluate=False, quiet=True)
    assert not (tmp_path / "o.onnx").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "onnxq", "quantize", str(other), "-o", str(tmp_path / "o.onnx"), "--table", str(tmp_path / "t.json")],
        check=False, capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "another model" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_or_incomplete_table_is_a_clear_error(attention_case, tmp_path):
    model, calib, _ = attention_case
    calibrate(model, calib, tmp_path / "t.json", quiet=True)
    text = (tmp_path / "t.json").read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(CalibrationTableError, match="not valid JSON"):
        quantize(model, tmp_path / "o.onnx", table=tmp_path / "trunc.json", quiet=True)
    data = json.loads(text)
    name = next(iter(data["tensors"]))
    data["tensors"][name]["histogram"]["counts"] = "garbage"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationTableError, match="corrupt"):
        quantize(model, tmp_path / "o.onnx", table=tmp_path / "bad.json", quiet=True)
    (tmp_path / "plan.json").write_text(json.dumps({"format": "onnxq.plan/1"}))
    with pytest.raises(CalibrationTableError, match="not an onnxq calibration table"):
        quantize(model, tmp_path / "o.onnx", table=tmp_path / "plan.json", quiet=True)
    data = json.loads(text)
    del data["tensors"]["probs"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(CalibrationTableError, match="recalibrate"):
        quantize(model, tmp_path / "o.onnx", table=tmp_path / "missing.json", quiet=True)
    assert not (tmp_path / "o.onnx").exists()


def test_cli_calibrate_then_quantize_with_table(attention_case, tmp_path):
    model, calib, evald = attention_case
    run = lambda *a: subprocess.run([sys.executable, "-m", "onnxq", *a], check=False, capture_output=True, text=True)
    proc = run("calibrate", str(model), "--calib", str(calib), "-o", str(tmp_path / "t.json"), "--calib-samples", "8", "--calib-method", "percentile", "--percentile", "99.9")
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["num_samples"] == 8 and table["method"] == "percentile" and table["percentile"] == 99.9
    proc = run("quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--table", str(tmp_path / "t.json"), "--eval", str(evald), "-q")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["calibration_method"] == "percentile" and report["calibration_samples"] == 8
    proc = run("quantize", str(model), "-o", str(tmp_path / "q2.onnx"), "--calib", str(calib), "--calib-method", "bogus")
    assert proc.returncode == 2


@pytest.mark.parametrize("grid,symmetric", [("int8", True), ("int8", False), ("fp8", True)])
def test_coarse_to_fine_mse_finds_the_exhaustive_range(monkeypatch, grid, symmetric):
    """The coarse-to-fine mse search gives the exhaustive search's range (within one bin) or one of
    equal error, on distributions activations take."""
    from onnxq.calibrators import methods

    rng = np.random.default_rng(0)
    samples = {
        "gauss": rng.normal(size=100000),
        "laplace": rng.laplace(size=100000),
        "outliers": np.concatenate([rng.normal(size=100000), 30 * rng.normal(size=20)]),
        "relu": np.maximum(rng.normal(size=100000), 0),
        "relu6": np.clip(3 * rng.normal(size=100000), 0, 6),
        "bimodal": np.concatenate([rng.normal(-3, 0.3, 50000), rng.normal(5, 0.2, 50000)]),
        "heavy": rng.standard_t(2, size=100000),
    }
    for seed in range(8):  # clusters of outliers (a LayerNorm's outlier channels): ripples with local minima
        r = np.random.default_rng(seed)
        k = int(r.integers(2, 6))
        bulk = r.normal(size=100000)
        clusters = [r.normal(r.uniform(-25, 25), r.uniform(0.2, 2), size=int(r.integers(5, 500))) for _ in range(k)]
        samples[f"clusters{seed}"] = np.concatenate([bulk, *clusters])
    for name, x in samples.items():
        h = Histogram()
        h.update(x.astype(np.float32))
        lo, hi = float(x.min()), float(x.max())
        got = methods._mse(h, lo, hi, symmetric, grid)
        monkeypatch.setattr(methods, "MSE_COARSE_STEP", 1)
        want = methods._mse(h, lo, hi, symmetric, grid)
        monkeypatch.undo()
        centres = (np.arange(4096) - 2048 + 0.5) * h.width
        g = {"int8": grids.INT8 if symmetric else grids.UINT8, "fp8": grids.FP8}[grid]

        def error(r, g=g, centres=centres, h=h):
            scale, zero = grids.scale_zero_point(*r, g)
            return float(((centres - grids.fake_quant(centres, scale, zero, g)) ** 2) @ h.counts)

        assert np.abs(np.subtract(got, want)).max() <= h.width or error(got) <= error(want) * (1 + 1e-9), name
