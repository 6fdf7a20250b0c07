"""FP8 and FP16 high-precision regions on a real zoo model (MiniLM): the FP8 Q/DQ form, ORT at
ORT_ENABLE_BASIC, and task accuracy above floors measured on this machine (README, "FP8")."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import onnxq

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402
from onnxq.runtime import ort as ort_rt  # noqa: E402

NAME, N_CALIB, N_EVAL = "minilm-l6-v2", 16, 8


def _feeds(arrays):
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]


@pytest.fixture(scope="module")
def minilm():
    entry = zoo.get(NAME)
    return entry, entry.onnx_path(), _feeds(entry.calib_data(N_CALIB))


def test_minilm_fp8(minilm, tmp_path):
    entry, model, calib = minilm
    out = tmp_path / "fp8.onnx"
    onnxq.quantize(model, out, calib, precision="fp8", quiet=True, evaluate=False, report=False)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version >= 19 and m.ir_version <= 13
    inits = {i.name: i for i in m.graph.initializer}
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 80
    for n in qdq:
        zp = inits[n.input[2]]
        assert zp.data_type == TensorProto.FLOAT8E4M3FN and not any(onnx.numpy_helper.to_array(zp).astype(np.float32).ravel())
        if n.input[0] in inits:
            assert inits[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN
    # FP8 Q/DQ load on the CPU provider only at ORT_ENABLE_BASIC; the session picks it
    assert ort_rt._uses_fp8(m)
    metrics = entry.evaluate(out, model, n=N_EVAL)
    print("fp8", metrics)
    # measured 0.9965 with these 16/8 documents (0.9970 with 64/50; INT8 gives 0.98 there)
    assert metrics["cosine_vs_fp32"] > 0.99, metrics
    assert metrics["spearman"] > metrics["spearman_fp32"] - 0.05, metrics


def test_minilm_int8_with_fp16_regions(minilm, tmp_path):
    entry, model, calib = minilm
    out = tmp_path / "int8_fp16.onnx"
    onnxq.quantize(model, out, calib, high_precision="fp16", quiet=True, evaluate=False, report=False)
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    types = {v.name: v.type.tensor_type.elem_type for v in m.graph.value_info}
    layer_norms = [n for n in m.graph.node if n.op_type == "LayerNormalization"]
    assert layer_norms and all(types[n.output[0]] == TensorProto.FLOAT for n in layer_norms)
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul"]
    assert sum(types.get(n.output[0]) == TensorProto.FLOAT16 for n in matmuls) > 0.9 * len(matmuls)
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [TensorProto.FLOAT]
    metrics = entry.evaluate(out, model, n=N_EVAL)
    print("int8+fp16", metrics)
    # measured 0.9832 with these 16/8 documents (INT8 floor with FP32 regions: 0.97)
    assert metrics["cosine_vs_fp32"] > 0.97, metrics
