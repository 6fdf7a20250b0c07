"""FP8 E4M3FN: numerics against onnx.reference and ORT, FP8 ranges, per-node mixed INT8/FP8 plans."""

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import synthetic

import onnxq
from onnxq.calibrators.histogram import Histogram
from onnxq.calibrators.methods import CalibrationMethodError, compute_range
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.placement import place
from onnxq.plan import QuantPlan
from onnxq.runtime.ort import create_session
from onnxq.grids import FP8_MAX, quantize_weight, to_fp8

FP8 = ml_dtypes.float8_e4m3fn


def _edge_values() -> np.ndarray:
    """Every finite E4M3FN value, every midpoint between neighbours (ties), values just off the
    midpoints, saturation (448, the 448/480 midpoint, beyond), half the smallest subnormal, NaN, ±inf."""
    grid = np.unique(np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2
    tiny = float(np.float32(2.0**-9))
    special = [0.0, -0.0, tiny, -tiny, tiny / 2, tiny * 1.5, 448.0, -448.0, 464.0, -464.0, 465.0, 480.0, 1e6, -1e30, np.inf, -np.inf, np.nan]
    return np.concatenate([grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), special]).astype(np.float32)


def _qdq_model(scale: np.ndarray, axis: int | None, shape) -> onnx.ModelProto:
    zero = np.zeros(scale.shape, dtype=FP8)
    attrs = {"axis": axis} if axis is not None else {}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], **attrs),
    ]
    graph = helper.make_graph(
        nodes, "fp8_qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [numpy_helper.from_array(scale.astype(np.float32), "scale"), helper.make_tensor("zero", TensorProto.FLOAT8E4M3FN, list(scale.shape), zero.view(np.uint8).tolist(), raw=False)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


@pytest.mark.parametrize("scale", [1.0, 0.37, 2.0**-4])
def test_fp8_rounding_and_saturation_match_onnx_reference_and_ort(scale):
    rng = np.random.default_rng(0)
    x = np.concatenate([_edge_values() * scale, rng.normal(0, 40, 4000).astype(np.float32) * scale, rng.standard_cauchy(1000).astype(np.float32)])
    model = _qdq_model(np.array(scale, dtype=np.float32), None, x.shape)
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    ort_y = create_session(model).run(None, {"x": x})[0]
    ours = to_fp8(x / np.float32(scale)).astype(np.float32) * np.float32(scale)
    np.testing.assert_array_equal(ours, ref)  # NaN positions compare equal
    np.testing.assert_array_equal(ort_y, ref)
    assert np.abs(ours[np.isfinite(ours)]).max() == np.float32(FP8_MAX) * np.float32(scale)  # saturates, never NaN for finite/inf input
    assert np.isnan(ours).sum() == 1


def test_fp8_per_channel_weight_matches_onnx_reference():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (16, 24)).astype(np.float32) * rng.uniform(0.01, 10, (1, 24)).astype(np.float32)
    w[3, 5] = 0.0
    q, scale = quantize_weight(w, axis=1, dtype="float8e4m3fn")
    assert q.dtype == FP8 and scale.shape == (24,)
    np.testing.assert_allclose(np.abs(q.astype(np.float32)).max(axis=0), FP8_MAX)  # amax/448: the channel max hits 448
    ref = ReferenceEvaluator(_qdq_model(scale, 1, w.shape)).run(None, {"x": w})[0]
    np.testing.assert_array_equal(q.astype(np.float32) * scale, ref)


@pytest.mark.parametrize("dist", ["gauss_outliers", "laplace", "cauchy"])
def test_fp8_mse_range_is_the_optimum_on_the_fp8_grid(dist):
    rng = np.random.default_rng(2)
    x = {
        "gauss_outliers": lambda: np.concatenate([rng.normal(0, 1, 100_000), rng.normal(0, 1, 20) * 30]),
        "laplace": lambda: rng.laplace(0, 1, 100_000),
        "cauchy": lambda: rng.standard_cauchy(100_000),
    }[dist]().astype(np.float32)
    h = Histogram()
    h.update(x)
    lo, hi = float(x.min()), float(x.max())
    amax = max(-lo, hi)

    def clip_value(method, grid):
        return max(map(abs, compute_range(lo, hi, h, method, symmetric=True, grid=grid)))

    def fp8_mse(t):
        s = np.float32(t / FP8_MAX)
        return float(((x - to_fp8(x / s).astype(np.float32) * s) ** 2).mean())

    assert clip_value("minmax", "fp8") == amax
    t_fp8, t_int8 = clip_value("mse", "fp8"), clip_value("mse", "int8")
    brute = min(fp8_mse(t) for t in np.linspace(amax / 64, amax, 300))
    # the histogram search finds FP8's own optimum (measured: within 0.3% of a brute-force
    # search on the raw data), which the INT8 optimum rescaled to the FP8 grid is not
    assert fp8_mse(t_fp8) <= brute * 1.01
    assert fp8_mse(t_fp8) < fp8_mse(t_int8)
    with pytest.raises(CalibrationMethodError, match="entropy"):
        compute_range(lo, hi, h, "entropy", symmetric=True, grid="fp8")


def _qdq_on(model: onnx.ModelProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]


def test_mixed_int8_fp8_plan_on_a_synthetic_model(attention_case, tmp_path):
    model_path, calib, evald = attention_case
    plan = place(load_and_preprocess(model_path), "tensorrt")
    plan.set_precision("k_proj", "fp8")
    plan.set_precision("pv", "fp8")
    plan_path = tmp_path / "plan.json"
    out = tmp_path / "mixed.onnx"
    res = onnxq.quantize(model_path, out, calib, eval=evald, plan=plan, save_plan=plan_path, method="minmax", quiet=True)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version >= 19 and m.ir_version <= 10
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    by_out = {o: n for n in m.graph.node for o in n.output}
    node = {n.name: n for n in m.graph.node}
    # x is read by q_proj, v_proj (int8) and k_proj (fp8): one pair per precision
    pairs = _qdq_on(m, "x")
    assert sorted(str(inits[q.input[2]].dtype) for q in pairs) == ["float8_e4m3fn", "int8"]
    for q in pairs:
        dq_out = next(n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        readers = sorted(n.name for n in m.graph.node if dq_out in n.input)
        fp8 = inits[q.input[2]].dtype == FP8
        assert readers == (["k_proj"] if fp8 else ["q_proj", "v_proj"])
        x_max = float(np.abs(np.load(calib)["x"]).max())
        assert inits[q.input[1]] == pytest.approx(x_max / (448 if fp8 else 127), rel=1e-6)
    # weights follow their node's precision
    for name, dtype in [("q_proj", np.int8), ("k_proj", FP8), ("v_proj", np.int8), ("o_proj", np.int8)]:
        dq = by_out[node[name].input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == dtype and inits[dq.input[2]].dtype == dtype
    # pv: both activation operands through FP8 pairs
    assert all(inits[by_out[by_out[i].input[0]].input[2]].dtype == FP8 for i in node["pv"].input)
    assert res.accuracy[0].cosine_mean > 0.999
    # the plan round-trips: precisions and both parameter sets survive
    saved = json.loads(plan_path.read_text())
    assert saved["nodes"]["k_proj"]["precision"] == "fp8" and saved["fp8_activations"]["x"]["dtype"] == "float8e4m3fn"
    assert saved["activations"]["x"]["dtype"] == "int8"
    again = QuantPlan.load(plan_path)
    assert again.activation("x", "fp8").scale == res.plan.activation("x", "fp8").scale
    out2 = tmp_path / "replay.onnx"
    onnxq.quantize(model_path, out2, calib, plan=plan_path, method="minmax", quiet=True, evaluate=False)
    x = np.load(evald)["x"][:1]
    np.testing.assert_array_equal(create_session(out).run(None, {"x": x})[0], create_session(out2).run(None, {"x": x})[0])


def test_fp8_node_alone_matches_numpy_fake_quant(attention_case, tmp_path):
    model_path, calib, evald = attention_case
    plan = place(load_and_preprocess(model_path), "tensorrt")
    for name in plan.nodes:
        plan.set_precision(name, "fp8" if name == "q_proj" else "float")
    out = tmp_path / "q.onnx"
    res = onnxq.quantize(model_path, out, calib, plan=plan, method="minmax", quiet=True, evaluate=False)
    w = {i.name: numpy_helper.to_array(i) for i in onnx.load(model_path).graph.initializer}
    x = np.load(evald)["x"][:1]
    s_x = np.float32(res.plan.activation("x", "fp8").scale)
    xq = to_fp8(x / s_x).astype(np.float32) * s_x
    s_w = np.abs(w["wq"]).max(axis=0) / np.float32(448)
    wq = to_fp8(w["wq"] / s_w).astype(np.float32) * s_w
    expected = synthetic.attention_reference(x, w, q=xq @ wq)
    np.testing.assert_allclose(create_session(out).run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_old_plan_without_fp8_fields_loads(cnn_case, tmp_path):
    model, calib, _ = cnn_case
    plan_path = tmp_path / "plan.json"
    onnxq.quantize(model, tmp_path / "a.onnx", calib, save_plan=plan_path, quiet=True, evaluate=False)
    data = json.loads(plan_path.read_text())
    del data["fp8_activations"]
    plan_path.write_text(json.dumps(data))
    plan = QuantPlan.load(plan_path)
    assert not plan.fp8_activations and plan.precisions() == {"int8"}
    data["nodes"]["conv2"]["precision"] = "fp4"
    plan_path.write_text(json.dumps(data))
    with pytest.raises(onnxq.OnnxqError, match="fp4"):
        QuantPlan.load(plan_path)


def test_cli_precision_fp8(cnn_case, tmp_path):
    from onnxq.cli import main

    model, calib, evald = cnn_case
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--eval", str(evald), "--precision", "fp8", "-q"]) == 0
    m = onnx.load(out)
    zps = [i for i in m.graph.initializer if i.name.endswith("_zero_point")]
    assert zps and all(i.data_type == TensorProto.FLOAT8E4M3FN for i in zps)
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["precision"] == "fp8" and report["evaluation"]["outputs"][0]["cosine_mean"] > 0.999


def _conv_chain() -> onnx.ModelProto:
    """A 3×3 conv (16→16), a depthwise 3×3 conv (16 groups) and a 7×7 conv (49 taps)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (16, 16, 3, 3)).astype(np.float32), "w_dense"),
        numpy_helper.from_array(rng.normal(0, 0.2, (16, 1, 3, 3)).astype(np.float32), "w_depthwise"),
        numpy_helper.from_array(rng.normal(0, 0.2, (16, 16, 7, 7)).astype(np.float32), "w_large"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_dense"], ["a"], name="dense", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w_depthwise"], ["b"], name="depthwise", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["b", "w_large"], ["y"], name="large", pads=[3, 3, 3, 3]),
    ]
    graph = helper.make_graph(
        nodes, "conv_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=synthetic.IR_VERSION)


def test_fp8_keeps_depthwise_and_large_filter_convs_out_of_fp8(tmp_path):
    path = synthetic.save(_conv_chain(), tmp_path / "convs.onnx")
    model = load_and_preprocess(path)
    fp8 = place(model, "tensorrt", precision="fp8").nodes
    assert fp8["dense"].precision == "fp8"
    assert fp8["depthwise"].precision == "float" and "per group" in fp8["depthwise"].reason
    assert fp8["large"].precision == "float" and "taps" in fp8["large"].reason
    int8 = place(model, "tensorrt", precision="int8").nodes
    assert all(int8[n].precision == "int8" for n in ("dense", "depthwise", "large"))


def test_weight_entries_are_keyed_by_their_reader(attention_case):
    """Weight entries name the node and input that read them, so a rewrite that renames an
    initializer (SmoothQuant's scaled copy of a shared weight) does not orphan them, and the
    entry carries the reader's dtype (float8e4m3fn for an FP8 node)."""
    model = load_and_preprocess(attention_case[0])
    plan = place(model, "tensorrt", precision="fp8")
    assert set(plan.weights) == {f"{n}:1" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    entry = plan.weight("q_proj", 1)
    assert entry.dtype == "float8e4m3fn" and entry.axis == 1
    init = next(n for n in model.graph if n.name == "q_proj").inputs[1]
    init.name = f"{init.name}_scaled"  # what a rewrite's new copy looks like
    assert plan.weight("q_proj", 1, init.name) is entry
