"""--attention-probs: attention's P·V products (found from the Softmax they read) at FP8 or in
float inside an INT8 plan, written into the plan and replayed byte for byte (fast tier: a
synthetic GQA decoder)."""

import json

import numpy as np
import onnx
import pytest
from llama_synthetic import llama_decoder
from synthetic import save

from onnxq.cli import main
from onnxq.recipe import Recipe, RecipeError

SEQ, VOCAB = 16, 96  # head dim 16, 16 keys: P·V and Q·Kᵀ large enough for the policy to quantize


def _quantize(tmp_path, probs: str, extra=()):
    path = save(llama_decoder(hidden=64, seq=SEQ), tmp_path / "llama.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=np.random.default_rng(2).integers(0, VOCAB, (8, SEQ)).astype(np.int64))
    a, b, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    argv = ["quantize", str(path), "-o", str(a), "--calib", str(calib), "--attention-probs", probs, "--save-plan", str(plan), "-q", *extra]
    assert main(argv) == 0
    assert main(["quantize", str(path), "-o", str(b), "--plan", str(plan), "--no-eval", "-q"]) == 0
    assert a.read_bytes() == b.read_bytes()
    return json.loads(plan.read_text())["nodes"], onnx.load(a).graph


def _dq_types(graph: onnx.GraphProto, node_name: str) -> list[int | None]:
    """The element type each input of ``node_name`` is dequantized from (None: not dequantized)."""
    producer = {o: n for n in graph.node for o in n.output}
    quantized_type = {}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            zero = next(i for i in graph.initializer if i.name == n.input[2])
            quantized_type[n.output[0]] = zero.data_type
    node = next(n for n in graph.node if n.name == node_name)
    types = []
    for tensor in node.input:
        dq = producer.get(tensor)
        types.append(quantized_type.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None)
    return types


@pytest.mark.parametrize("probs", ["fp8", "float"])
def test_pv_at_the_asked_precision_replays_byte_for_byte(tmp_path, probs):
    nodes, graph = _quantize(tmp_path, probs, ["--rotate", "--rotate-online", "32"])
    pv = sorted(n for n in nodes if n.endswith(".pv"))
    assert len(pv) == 2 and all(nodes[n]["precision"] == probs for n in pv)
    others = [d["precision"] for n, d in nodes.items() if n not in pv and d["precision"] != "float"]
    assert others and set(others) == {"int8"}  # the projections and Q·Kᵀ stay INT8
    expected = [onnx.TensorProto.FLOAT8E4M3FN] * 2 if probs == "fp8" else [None, None]
    assert all(_dq_types(graph, n) == expected for n in pv)
    assert _dq_types(graph, "layers.0.qk") == [onnx.TensorProto.INT8] * 2


def test_default_keeps_pv_int8(tmp_path):
    nodes, graph = _quantize(tmp_path, "int8")
    assert nodes["layers.0.pv"]["precision"] == "int8"
    assert _dq_types(graph, "layers.0.pv") == [onnx.TensorProto.INT8] * 2


def test_fp8_probabilities_need_tensorrt_and_int8():
    with pytest.raises(RecipeError, match="tensorrt"):
        Recipe(target="ort", attention_probs="fp8").validated()
    with pytest.raises(RecipeError, match="precision int8"):
        Recipe(precision="fp8", attention_probs="float").validated()
    assert Recipe(target="ort", attention_probs="float").validated().attention_probs == "float"


def test_pv_is_found_through_data_moves_only():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from onnxq.placement.attention import probability_products

    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("Cast", ["p"], ["pc"], name="cast", to=f),
        helper.make_node("Transpose", ["pc"], ["pt"], name="move", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["pt", "v"], ["c"], name="pv"),
        helper.make_node("Relu", ["p"], ["pr"], name="relu"),  # not a data move
        helper.make_node("MatMul", ["pr", "v"], ["d"], name="not_pv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, f, [1, 4, 4]) for n in ("s", "v")],
                              [helper.make_tensor_value_info(n, f, None) for n in ("c", "d")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert probability_products(model) == ["pv"]


# --- --attention-probs unnormalized: E = exp(s - rowmax) into P·V, P·V divided by E's row sums ---


def _float_outputs(proto: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: ids})[0]


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMax's axes: an attribute before 18, an input from 18
def test_unnormalized_probabilities_compute_the_same_function(opset):
    import onnx_ir as ir

    from onnxq import emit
    from onnxq.placement.attention import unnormalized_pairs
    from onnxq.plan import AttentionPlan, QuantPlan

    proto = llama_decoder(hidden=64, seq=SEQ)
    if opset != 17:
        proto = onnx.version_converter.convert_version(proto, opset)
    model = ir.from_proto(proto)
    pairs = unnormalized_pairs(model)
    assert pairs == [[f"layers.{i}.softmax", f"layers.{i}.pv"] for i in range(2)]
    plan = QuantPlan(target="tensorrt", attention=AttentionPlan(unnormalized=pairs))
    rewritten = ir.to_proto(emit.emit(model, plan, ["rotate"]))
    onnx.checker.check_model(rewritten)
    assert "Softmax" not in {n.op_type for n in rewritten.graph.node}
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, SEQ)).astype(np.int64)
    expected, got = _float_outputs(proto, ids), _float_outputs(rewritten, ids)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_unnormalized_pv_reads_e_at_int8_and_replays_byte_for_byte(tmp_path):
    nodes, graph = _quantize(tmp_path, "unnormalized", ["--calib-method", "minmax"])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["attention"]["unnormalized"] == [[f"layers.{i}.softmax", f"layers.{i}.pv"] for i in range(2)]
    assert nodes["layers.0.pv"]["precision"] == "int8"
    assert _dq_types(graph, "layers.0.pv") == [onnx.TensorProto.INT8] * 2
    producer = {o: n for n in graph.node for o in n.output}
    dq = producer[next(n for n in graph.node if n.name == "layers.0.pv").input[0]]
    assert producer[producer[dq.input[0]].input[0]].op_type == "Exp"  # P·V's first input quantizes E
    scale = onnx.numpy_helper.to_array(next(i for i in graph.initializer if i.name == dq.input[1]))
    assert abs(float(scale) * 127 - 1) < 1e-3  # every row of E peaks at exactly 1
    divide = next(n for n in graph.node if n.name == "layers.0.pv/normalize")
    assert divide.op_type == "Div" and producer[divide.input[1]].op_type == "ReduceSum"


def test_unnormalized_needs_int8_and_keeps_shared_probabilities():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from onnxq.placement.attention import unnormalized_pairs

    with pytest.raises(RecipeError, match="precision int8"):
        Recipe(precision="fp8", attention_probs="unnormalized").validated()
    assert Recipe(target="ort", attention_probs="unnormalized").validated().attention_probs == "unnormalized"
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Softmax", ["s"], ["p"], name="shared", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["c"], name="pv"),
        helper.make_node("Relu", ["p"], ["r"], name="other_reader"),
        helper.make_node("Softmax", ["s"], ["q"], name="first_axis", axis=1),
        helper.make_node("MatMul", ["q", "v"], ["d"], name="pv_first_axis"),
        helper.make_node("Softmax", ["s"], ["t"], name="last_axis", axis=2),
        helper.make_node("MatMul", ["t", "v"], ["e"], name="pv_last_axis"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, f, [1, 4, 4]) for n in ("s", "v")],
                              [helper.make_tensor_value_info(n, f, None) for n in ("c", "r", "d", "e")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert unnormalized_pairs(model) == [["last_axis", "pv_last_axis"]]


def test_unnormalized_sweep_and_solve_replay(tmp_path):
    """The sweep and the solver fold the rewrite on their base (pipeline.fold_rotation): the
    solver's model replays byte for byte from its plan, which keeps the pairs."""
    from onnxq.mixed_precision.sweep import sweep

    path = save(llama_decoder(hidden=64, seq=SEQ), tmp_path / "llama.onnx")
    rng = np.random.default_rng(4)
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, ids=rng.integers(0, VOCAB, (8, SEQ)).astype(np.int64))
    np.savez(evald, ids=rng.integers(0, VOCAB, (4, SEQ)).astype(np.int64))
    common = ["--calib", str(calib), "--eval", str(evald)]
    assert main(["sweep", str(path), *common, "-o", str(tmp_path / "s.json"), "--attention-probs", "unnormalized", "--calib-method", "minmax", "-q"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["recipe"]["attention-probs"] == "unnormalized"
    # a --recipe file's key reaches the sweep too (it used to pass on a fixed list of fields)
    (tmp_path / "r.yaml").write_text("attention-probs: unnormalized\ncalib-method: minmax\n")
    sweep_api = sweep(path, calib, None, eval=evald, recipe=Recipe(attention_probs="unnormalized", calib_method="minmax"), quiet=True, plot=False)
    assert main(["sweep", str(path), *common, "-o", str(tmp_path / "s2.json"), "--recipe", str(tmp_path / "r.yaml"), "-q"]) == 0
    assert json.loads((tmp_path / "s2.json").read_text())["recipe"] == sweep_api.recipe
    assert main(["solve", str(tmp_path / "s.json"), str(path), *common, "-o", str(tmp_path / "plan.json"),
                 "--max-high-precision-layers", "1", "--save-model", str(tmp_path / "solved.onnx"), "-q"]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["attention"]["unnormalized"]
    assert main(["quantize", str(path), "-o", str(tmp_path / "replay.onnx"), "--plan", str(tmp_path / "plan.json"), "--no-eval", "-q"]) == 0
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "solved.onnx").read_bytes()
