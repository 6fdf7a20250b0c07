"""Weight-only INT4/INT8 (--precision w4a16 | w8a16): blocked grids against onnx.reference and
numpy, the emitted blocked DequantizeLinear in ONNX Runtime, placement on a synthetic decoder."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

import synthetic
from onnxq.cli import main
from onnxq.grids import GRIDS, dequantize_blocked, fake_quant_blocked, quantize_blocked
from onnxq.recipe import Recipe, RecipeError


def _edge_weight(k: int = 40, n: int = 6, seed: int = 0) -> np.ndarray:
    """A [K, N] weight whose blocks hit the grid's edges: an all-zero column, one-sided blocks,
    exact block maxima, and K not a multiple of the block sizes used."""
    w = np.random.default_rng(seed).normal(0, 1, (k, n)).astype(np.float32)
    w[:, 0] = 0.0
    w[:, 1] = np.abs(w[:, 1])
    w[:, 2] = -np.abs(w[:, 2])
    w[5, 3] = 7.0
    return w


def _dq_model(q, scale, zero, axis, block) -> onnx.ModelProto:
    """A model of one blocked DequantizeLinear whose initializers onnx_ir serialized (packing)."""
    names = ["q", "scale"] + (["zero"] if zero is not None else [])
    values = [ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in zip(names, (q, scale, zero))]
    dq = ir.node("DequantizeLinear", values, attributes={"axis": axis, "block_size": block})
    dq.outputs[0].name, dq.outputs[0].dtype = "w", ir.DataType.FLOAT
    graph = ir.Graph([], [dq.outputs[0]], nodes=[dq], initializers=values, opset_imports={"": 21})
    return ir.serde.serialize_model(ir.Model(graph, ir_version=10))


@pytest.mark.parametrize("dtype", ["int4", "uint4", "int8", "uint8"])
@pytest.mark.parametrize("axis, block", [(0, 16), (0, 32), (1, 4)])
def test_blocked_packing_round_trip_matches_reference_and_numpy(dtype, axis, block):
    w = _edge_weight()
    g = GRIDS[dtype]
    q, scale, zero = quantize_blocked(w, axis, block, g)
    assert scale.shape[axis] == -(-w.shape[axis] // block) and scale.shape[1 - axis] == w.shape[1 - axis]
    lowest = -g.qmax if g.symmetric else g.qmin
    assert q.astype(np.int32).min() >= lowest and q.astype(np.int32).max() <= g.qmax
    model = _dq_model(q, scale, None if g.symmetric else zero, axis, block)
    if dtype.endswith("4"):  # two values per byte, low nibble first
        raw = model.graph.initializer[0].raw_data
        flat = q.reshape(-1).astype(np.int32) & 0xF
        assert len(raw) == (flat.size + 1) // 2 and raw[0] == flat[0] | (flat[1] << 4)
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]).astype(np.int32), q.astype(np.int32))
    expected = dequantize_blocked(q, scale, zero, axis, block)
    assert np.array_equal(expected, fake_quant_blocked(w, axis, block, g))
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {})[0], expected)
    np.testing.assert_array_equal(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0], expected)
    # per block: the error is at most half a step (symmetric: the block's maximum is on the grid)
    step = np.repeat(scale, block, axis=axis).take(np.arange(w.shape[axis]), axis=axis)
    assert np.all(np.abs(expected - w) <= step / 2 + 1e-6)


def _quantize(model, out, *extra):
    assert main(["quantize", str(model), "-o", str(out), "--no-eval", "-q", *extra]) == 0
    return onnx.load(str(out))


def _float_reference(model_path, plan_path) -> onnx.ModelProto:
    """The float model with each planned weight replaced by its numpy fake quantization."""
    model = onnx.load(str(model_path))
    plan = json.loads(plan_path.read_text())
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        entry = plan["weights"].get(f"{node.name}:1")
        if entry is None:
            continue
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init)
        fq = fake_quant_blocked(w, entry["axis"], entry["block_size"], GRIDS[entry["dtype"]])
        init.CopyFrom(numpy_helper.from_array(fq, init.name))
    return model


@pytest.mark.parametrize("target, dtype", [("tensorrt", "int4"), ("ort", "uint4")])
def test_w4a16_emits_blocked_dq_that_ort_runs_like_numpy(decoder_case, tmp_path, target, dtype):
    model, calib, _ = decoder_case
    # the MatMulNBits form and the quantized head (the ort default): test_matmulnbits.py
    form = ["--ort-weight-form", "dq", "--no-quantize-head"] if target == "ort" else []
    q = _quantize(model, tmp_path / "q.onnx", "--precision", "w4a16", "--block-size", "32", "--target", target, *form, "--save-plan", str(tmp_path / "p.json"))
    plan = json.loads((tmp_path / "p.json").read_text())
    assert {d["precision"] for d in plan["nodes"].values()} == {"w4", "float"}
    assert plan["nodes"]["head"]["precision"] == "float" and "LM head" in plan["nodes"]["head"]["reason"]
    assert plan["nodes"]["qk"]["precision"] == "float"  # two activations
    assert all(w["dtype"] == dtype and w["block_size"] == 32 and w["axis"] == 0 for w in plan["weights"].values())
    assert q.opset_import[0].version == 21 and not [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 and all(len(n.input) == (2 if target == "tensorrt" else 3) for n in dqs)
    inits = {i.name: i for i in q.graph.initializer}
    assert {inits[n.input[0]].data_type for n in dqs} == {getattr(onnx.TensorProto, dtype.upper())}
    x = np.load(calib)["x"][:1]
    reference = _float_reference(model, tmp_path / "p.json")
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    want = ort.InferenceSession(reference.SerializeToString(), basic, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(q.SerializeToString(), basic, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_quantize_head_and_w8(decoder_case, tmp_path):
    model, _, _ = decoder_case
    q = _quantize(model, tmp_path / "q.onnx", "--precision", "w8a16", "--quantize-head", "--target", "tensorrt", "--save-plan", str(tmp_path / "p.json"))
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["nodes"]["head"]["precision"] == "w8"
    # the Gemm's transB=1 weight [N, K]: blocks run along its axis 1
    assert plan["weights"]["head:1"] == {"dtype": "int8", "axis": 1, "block_size": 128}
    assert plan["recipe"]["block-size"] == 128 and plan["recipe"]["quantize-head"] is True
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 8


@pytest.mark.parametrize("options, message", [
    ({"precision": "w4a16", "block_size": 48}, "--block-size takes one of [32, 64, 128]"),
    ({"precision": "w4a16", "per_tensor_weights": True}, "--per-tensor-weights does not apply to weight-only"),
    ({"precision": "w8a16", "smoothquant": 0.5}, "--smoothquant does not apply to weight-only"),
])
def test_bad_weight_only_recipe(options, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Recipe.from_options(options)


def test_weight_only_needs_no_calibration_data(tmp_path):
    path = synthetic.save(synthetic.tiny_decoder_block(), tmp_path / "m.onnx")
    q = _quantize(path, tmp_path / "q.onnx", "--precision", "w4a16")
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)


# --- AWQ ------------------------------------------------------------------------------------------


def _outlier_layer(seed: int = 0):
    """Rows with a few input channels 20-50x larger than the rest (as LLM activations have)
    and a weight whose rows are all of one size."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0, 1, (256, 128)).astype(np.float32)
    rows[:, [3, 40, 77, 100]] *= np.array([20.0, 35.0, 50.0, 25.0], dtype=np.float32)
    return rows, rng.normal(0, 0.05, (128, 96)).astype(np.float32)


@pytest.mark.parametrize("grid", ["int4", "uint4"])
def test_awq_scale_and_clip_beat_rtn_on_outlier_channels(grid):
    from onnxq.awq import search_clip, search_scale
    from onnxq.grids import CLIP_RATIOS

    rows, w = _outlier_layer()
    train, held_out = rows[:128], rows[128:]
    ref = held_out @ w

    def error(out):
        return float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))

    rtn = error(held_out @ fake_quant_blocked(w, 0, 32, GRIDS[grid]))
    alpha, s, errors = search_scale(train, w, grid, 32)
    assert alpha > 0 and errors["0.00"] > min(errors.values())
    scaled = error((held_out / s) @ fake_quant_blocked(w * s[:, None], 0, 32, GRIDS[grid]))
    idx = search_clip(train / s, w * s[:, None], grid, 32)
    clip = np.asarray(CLIP_RATIOS, dtype=np.float32)[idx]
    clipped = error((held_out / s) @ fake_quant_blocked(w * s[:, None], 0, 32, GRIDS[grid], clip))
    # measured on held-out rows: scales cut RTN's error by > 25 %, clipping does not undo it
    assert scaled < 0.75 * rtn, (rtn, scaled)
    assert clipped <= scaled * 1.02, (scaled, clipped)


def test_awq_folds_exactly_and_replays(decoder_case, tmp_path):
    """AWQ on the synthetic decoder: the folded float model computes what the original does, the
    quantized model is closer to FP32 than RTN's, and its plan replays byte for byte."""
    from onnxq.emit import emit
    from onnxq.modelio import to_proto
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.plan import QuantPlan

    model, calib, evald = decoder_case
    common = ["--precision", "w4a16", "--block-size", "32", "--target", "ort", "--no-quantize-head"]
    _quantize(model, tmp_path / "awq.onnx", *common, "--weight-method", "awq", "--calib", str(calib), "--save-plan", str(tmp_path / "p.json"))
    plan = QuantPlan.load(tmp_path / "p.json")
    assert plan.smoothquant.active() and all(g.absorber["kind"] != "inserted_mul" for g in plan.smoothquant.active())
    assert sum(w.clip is not None for w in plan.weights.values()) == 7
    _quantize(model, tmp_path / "replay.onnx", "--plan", str(tmp_path / "p.json"))
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "awq.onnx").read_bytes()
    _quantize(model, tmp_path / "rtn.onnx", *common)

    folded = to_proto(emit(load_and_preprocess(model), plan, ["fold"]))
    x = np.load(evald)["x"]

    def run(m, xs):
        session = ort.InferenceSession(m if isinstance(m, str) else m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(["logits"], {"x": xs[i : i + 1]})[0] for i in range(len(xs))])

    ref = run(str(model), x)
    np.testing.assert_allclose(run(folded, x), ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())
    err = {name: float(np.sum((run(str(tmp_path / f"{name}.onnx"), x) - ref) ** 2)) for name in ("awq", "rtn")}
    assert err["awq"] < 0.8 * err["rtn"], err


def test_awq_needs_calibration_data_and_weight_only(decoder_case, tmp_path, capsys):
    model, _, _ = decoder_case
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--precision", "w4a16", "--weight-method", "awq", "-q"]) == 2
    assert "--weight-method awq needs calibration data" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="--weight-method awq is for weight-only precisions"):
        Recipe.from_options({"weight_method": "awq"})


def test_inspect_and_diff_read_blocked_int4(decoder_case, tmp_path, capsys):
    model, _, _ = decoder_case
    _quantize(model, tmp_path / "ort.onnx", "--precision", "w4a16", "--block-size", "32", "--target", "ort")
    _quantize(model, tmp_path / "trt.onnx", "--precision", "w4a16", "--block-size", "32", "--target", "tensorrt")
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "trt.onnx")]) == 0
    text = capsys.readouterr().out
    assert "layers by precision: INT4 7, FP32 3" in text and "DQ INT4: 7" in text
    assert main(["diff", str(tmp_path / "ort.onnx"), str(tmp_path / "trt.onnx")]) == 1  # 1: the models differ
    text = capsys.readouterr().out
    assert "dtype uint4 -> int4" in text and "axis 0 block 32" in text


def _tied_lm(path, vocab: int = 100, hidden: int = 64):
    """ids → Gather(embedding) → MatMul → MatMul(Transpose(embedding)): a tied LM head."""
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    nodes = [
        onnx.helper.make_node("Gather", ["emb", "ids"], ["h"], name="embed"),
        onnx.helper.make_node("MatMul", ["h", "w"], ["h2"], name="proj"),
        onnx.helper.make_node("Transpose", ["emb"], ["emb_t"], name="tie", perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["h2", "emb_t"], ["logits"], name="head"),
    ]
    inits = [numpy_helper.from_array(rng.normal(0, 1, (vocab, hidden)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.normal(0, 0.1, (hidden, hidden)).astype(np.float32), "w")]
    graph = onnx.helper.make_graph(nodes, "tied", [onnx.helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
                                   [onnx.helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, vocab])], inits)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), str(path))
    return {i.name: numpy_helper.to_array(i) for i in inits}


@pytest.mark.parametrize("head_bits", [8, 4])
def test_quantized_embedding_and_tied_head_leave_no_float_table(tmp_path, head_bits):
    """The table and the head take --head-bits (INT8 by default), the body INT4."""
    weights = _tied_lm(tmp_path / "lm.onnx")
    args = ["--precision", "w4a16", "--block-size", "32", "--target", "ort", "--quantize-head", "--quantize-embedding", "--head-bits", str(head_bits)]
    table = f"uint{head_bits}"
    q = _quantize(tmp_path / "lm.onnx", tmp_path / "q.onnx", *args, "--save-plan", str(tmp_path / "p.json"))
    assert sorted(n.op_type for n in q.graph.node if n.domain == "com.microsoft") == ["GatherBlockQuantized", "MatMulNBits", "MatMulNBits"]
    floats = [int(np.prod(i.dims)) for i in q.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(floats) == 200  # only scales ([100, 2] of the table) are float: no float table is left
    ids = (np.arange(8) * 7).reshape(1, 8)
    emb = fake_quant_blocked(weights["emb"], 1, 32, GRIDS[table])
    assert json.loads((tmp_path / "p.json").read_text())["weights"]["proj:1"]["dtype"] == "uint4" and json.loads((tmp_path / "p.json").read_text())["weights"]["head:1"]["dtype"] == table
    want = emb[ids] @ fake_quant_blocked(weights["w"], 0, 32, GRIDS["uint4"]) @ emb.T
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, want, rtol=0.02, atol=0.02 * np.abs(want).max())  # ORT's MatMulNBits: INT8 activations inside
    _quantize(tmp_path / "lm.onnx", tmp_path / "replay.onnx", "--plan", str(tmp_path / "p.json"))
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    with pytest.raises(RecipeError, match="--quantize-embedding is for weight-only precisions on the ort target"):
        Recipe.from_options({"precision": "w4a16", "quantize_embedding": True})


# --- W4A8 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, dtype", [("tensorrt", "int4"), ("ort", "uint4")])
def test_w4a8_blocked_int4_weights_and_fp8_activations(decoder_case, tmp_path, target, dtype):
    model, calib, evald = decoder_case
    common = ["--precision", "w4a8", "--block-size", "32", "--target", target, "--calib", str(calib)]
    q = _quantize(model, tmp_path / "q.onnx", *common, "--save-plan", str(tmp_path / "p.json"))
    plan = json.loads((tmp_path / "p.json").read_text())
    quantized = {n: d for n, d in plan["nodes"].items() if d["precision"] == "w4a8"}
    assert len(quantized) == 7 and all(d["inputs"] == {"0": "activation", "1": "weight"} for d in quantized.values())
    assert plan["fp8_activations"] and not plan["activations"]
    inits = {i.name: i for i in q.graph.initializer}
    dqs = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    blocked = [n for n in dqs if any(a.name == "block_size" for a in n.attribute)]
    assert len(blocked) == 7 and {inits[n.input[0]].data_type for n in blocked} == {getattr(onnx.TensorProto, dtype.upper())}
    fp8_qs = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert fp8_qs and {inits[n.input[2]].data_type for n in fp8_qs} == {onnx.TensorProto.FLOAT8E4M3FN}
    _quantize(model, tmp_path / "replay.onnx", "--plan", str(tmp_path / "p.json"))
    assert (tmp_path / "replay.onnx").read_bytes() == (tmp_path / "q.onnx").read_bytes()
    # FP8 activations cost little next to the INT4 weights: as close to FP32 as w4a16 (within 0.03)
    _quantize(model, tmp_path / "w4a16.onnx", *[c if c != "w4a8" else "w4a16" for c in common])
    x = np.load(evald)["x"]
    basic = ort.SessionOptions()
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC

    def logits(path):
        session = ort.InferenceSession(str(path), basic, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(["logits"], {"x": x[i : i + 1]})[0] for i in range(len(x))])

    ref = logits(model)
    cos = {k: float(np.sum(ref * (o := logits(tmp_path / f"{k}.onnx"))) / np.linalg.norm(ref) / np.linalg.norm(o)) for k in ("q", "w4a16")}
    assert cos["q"] > cos["w4a16"] - 0.03, cos


def test_w4a8_needs_calibration_data(decoder_case, tmp_path, capsys):
    model, _, _ = decoder_case
    assert main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--precision", "w4a8", "-q"]) == 2
    assert "calibration data" in capsys.readouterr().err
