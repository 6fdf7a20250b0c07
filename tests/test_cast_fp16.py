"""FP16 high-precision regions: explicit Casts, what stays FP32 and why, accuracy vs FP32.

ONNX Runtime's CPU provider computes many FP16 ops in FP32 internally (it inserts its own Casts
and fuses RMSNorm), which hides FP16 overflow; onnx.reference computes FP16 ops in FP16, as a
strongly typed TensorRT engine would, so the rules are checked with it.
"""

import warnings

import numpy as np
import onnx
import pytest
import synthetic
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import onnxq
from onnxq import modelio
from onnxq.passes.cast_fp16 import CastFloat16Pass
from onnxq.placement.fp16 import fp32_nodes
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.runtime.ort import create_session


def _fp16_reference_run(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # FP16 overflow is what is measured
        return ReferenceEvaluator(modelio.to_proto(model)).run(None, {"x": x})[0]


def test_rules_keep_what_overflows_fp16(tmp_path):
    path = synthetic.save(synthetic.rmsnorm_attention(), tmp_path / "rms.onnx")
    x = np.random.default_rng(0).normal(0, 1, (1, 16, 32)).astype(np.float32)
    ref = ReferenceEvaluator(str(path)).run(None, {"x": x})[0]
    results = {}
    for rules in (True, False):
        model = load_and_preprocess(path)
        cast_pass = CastFloat16Pass(fp32_nodes(model.graph) if rules else {})
        cast_pass(model)
        results[rules] = (_fp16_reference_run(model, x), cast_pass.kept, model)
    got, kept, model = results[True]
    assert {"rms_pow", "rms_mean", "rms_add", "rms_sqrt", "rms_rcp", "softmax", "scale_scores", "add_mask"} <= set(kept)
    assert "rms_mul" not in kept and "q_proj" not in kept
    # measured: 3e-3 with the rules; without them the squares overflow FP16 and the output is all zeros
    assert np.abs(got - ref).max() < 0.02 * np.abs(ref).max()
    unruled = results[False][0]
    assert np.abs(unruled - ref).max() > 0.5 * np.abs(ref).max()
    # every precision change is an explicit Cast; the graph type-checks strictly
    proto = modelio.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*proto.graph.value_info, *proto.graph.input, *proto.graph.output)}
    assert types["x"] == onnx.TensorProto.FLOAT and types["y"] == onnx.TensorProto.FLOAT
    by_name = {n.name: n for n in proto.graph.node}
    assert types[by_name["q_proj"].output[0]] == onnx.TensorProto.FLOAT16
    assert types[by_name["rms_mean"].output[0]] == onnx.TensorProto.FLOAT
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert len(casts) == len({(n.input[0], n.attribute[0].i) for n in casts})  # one Cast per value and direction


def test_measured_ranges_keep_overflowing_tensors_fp32(tmp_path):
    path = synthetic.save(synthetic.tiny_attention(), tmp_path / "att.onnx")
    model = load_and_preprocess(path)
    kept = fp32_nodes(model.graph, {"q": 1e5, "k": 10.0})
    assert {"q_proj", "qk"} <= set(kept) and "k_proj" not in kept


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantize_high_precision_fp16(attention_case, tmp_path, precision):
    model, calib, evald = attention_case
    res = {}
    for hp in ("fp32", "fp16"):
        out = tmp_path / f"{hp}.onnx"
        res[hp] = onnxq.quantize(model, out, calib, eval=evald, precision=precision, high_precision=hp, quiet=True)
    m = onnx.load(tmp_path / "fp16.onnx")
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version >= 19
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    values = {v.name: v.type.tensor_type.elem_type for v in m.graph.value_info}
    # Q/DQ scales follow the dtype of the tensor they quantize
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear":
            want = np.float16 if values.get(n.input[0]) == onnx.TensorProto.FLOAT16 else np.float32
            assert inits[n.input[1]].dtype == want
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # weights feed FP16 MatMuls
            assert inits[n.input[1]].dtype == np.float16
    # the FP16 regions cost little accuracy (measured: cosine within 1e-4 of the FP32-region model)
    assert res["fp16"].accuracy[0].cosine_mean > res["fp32"].accuracy[0].cosine_mean - 1e-3
    assert res["fp16"].to_json()["high_precision"] == "fp16"


def test_fp16_float_model_stays_close_in_ort(attention_case, tmp_path):
    model_path, _, evald = attention_case
    model = load_and_preprocess(model_path)
    CastFloat16Pass()(model)
    x = np.load(evald)["x"][:1]
    ref = create_session(model_path).run(None, {"x": x})[0]
    got = create_session(model).run(None, {"x": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=0.02 * np.abs(ref).max())


def test_ort_sessions_for_fp16_qdq_models_run_unoptimized(cnn_case, tmp_path):
    """ORT's CPU provider miscomputes FP16-scaled Q/DQ at ORT_ENABLE_BASIC and above (measured on
    EfficientNet-Lite0); create_session turns graph optimizations off for such models."""
    import onnxruntime as ort

    from onnxq.runtime.ort import _uses_fp16_qdq, session_options

    model, calib, _ = cnn_case
    out = tmp_path / "q.onnx"
    onnxq.quantize(model, out, calib, high_precision="fp16", quiet=True, evaluate=False)
    assert _uses_fp16_qdq(onnx.load(out)) and not _uses_fp16_qdq(onnx.load(model))
    assert session_options(fp16_qdq=True, fp8=True).graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
