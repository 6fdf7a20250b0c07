"""--dynamic (ort target): DynamicQuantizeLinear + MatMulInteger on a synthetic decoder, no
calibration data, next to ONNX Runtime's quantize_dynamic on the same model; byte-exact replay."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxq.cli import main
from onnxq.recipe import Recipe, RecipeError


def _outputs(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], {"x": x[i : i + 1]})[0] for i in range(len(x))])


def _cosine(a, b):
    return float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_dynamic_emits_matmulinteger_and_matches_quantize_dynamic(decoder_case, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, _, evald = decoder_case
    args = ["quantize", str(model), "--no-eval", "-q", "--target", "ort", "--dynamic"]
    assert main([*args, "-o", str(tmp_path / "d.onnx"), "--save-plan", str(tmp_path / "p.json")]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    dynamic = [n for n, d in plan["nodes"].items() if d["inputs"] == {"0": "dynamic", "1": "weight"}]
    assert len(dynamic) == 8 and plan["nodes"]["qk"]["precision"] == "float"  # two activations
    q = onnx.load(str(tmp_path / "d.onnx"))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulInteger") == 8 and "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert ops.count("DynamicQuantizeLinear") < 8  # shared by the readers of one tensor (q/k/v)
    assert not [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.name.endswith("weight")]
    assert main(["quantize", str(model), "--no-eval", "-q", "-o", str(tmp_path / "replay.onnx"), "--plan", str(tmp_path / "p.json")]) == 0
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "d.onnx").read_bytes()
    quantize_dynamic(str(model), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8)
    x = np.load(evald)["x"]
    ref = _outputs(model, x)
    ours, theirs = _cosine(ref, _outputs(tmp_path / "d.onnx", x)), _cosine(ref, _outputs(tmp_path / "ort.onnx", x))
    assert ours > 0.99 and ours >= theirs - 1e-3, (ours, theirs)


@pytest.mark.parametrize("options, message", [
    ({"dynamic": True}, "--dynamic is INT8 on the ort target"),
    ({"dynamic": True, "target": "ort", "precision": "w4a16"}, "--dynamic is INT8 on the ort target"),
])
def test_bad_dynamic_recipe(options, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_options(options)
