"""--rotate: the residual stream of a pre-norm decoder rotated by an orthogonal matrix folded into
the weights (fast tier: a synthetic GQA decoder)."""

import json

import numpy as np
import onnx
import pytest

import onnxq
from llama_synthetic import llama_decoder
from onnxq import emit, modelio
from onnxq.cli import main
from onnxq.errors import UnsupportedModelError
from onnxq.localize import layer_snr
from onnxq.mixed_precision.solver import solve
from onnxq.mixed_precision.sweep import sweep
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.plan import QuantPlan, RotationPlan
from onnxq.rotation import find_residual_stream, hadamard, hadamard_factors, rotation_matrix
from onnxq.runtime import ort as ort_rt
from synthetic import save, tiny_decoder_block

VOCAB, SEQ = 96, 12


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 48, 64, 576, 960, 1536, 2048])
def test_hadamard_of_the_hidden_sizes(n):
    h = hadamard(hadamard_factors(n))
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", [36, 100])
def test_sizes_without_hadamard_get_a_random_orthogonal_matrix(n):
    assert hadamard_factors(n) is None
    q = rotation_matrix(RotationPlan(kind="orthogonal", size=n, seed=3))
    assert np.abs(q @ q.T - np.eye(n)).max() < 1e-12


def _ids(n: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, 1, SEQ)).astype(np.int64)


def _rotated(model_path):
    """(float model, rotated model, rotation plan) from the file."""
    model = load_and_preprocess(model_path)
    reference = modelio.to_proto(model)
    plan = QuantPlan(target="tensorrt")
    plan.rotation = find_residual_stream(model)
    emit.emit(model, plan, ["rotate"])
    return reference, modelio.to_proto(model), plan.rotation


def _reader_inputs(proto: onnx.ModelProto, rotation: RotationPlan) -> list[str]:
    readers = {r for n in rotation.norms for r in n.readers}
    return sorted({n.input[0] for n in proto.graph.node if n.name in readers})


def _run(proto: onnx.ModelProto, outputs: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    """``outputs`` (graph outputs or intermediate tensors) over the samples, concatenated."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in outputs if t not in known)
    session = ort_rt.create_session(proto)
    results = [session.run(outputs, {"ids": x}) for x in ids]
    return {t: np.concatenate([r[i] for r in results]) for i, t in enumerate(outputs)}


@pytest.mark.parametrize("hidden", [32, 48, 36])  # Sylvester, Paley·Sylvester, random orthogonal
def test_rotation_is_exact_in_float_and_lowers_the_readers_amax(tmp_path, hidden):
    path = save(llama_decoder(hidden=hidden), tmp_path / "llama.onnx")
    reference, rotated, rotation = _rotated(path)
    assert rotation.kind == ("orthogonal" if hidden == 36 else "hadamard") and rotation.size == hidden
    assert len(rotation.writers) == 4 and len(rotation.biases) == 2 and len(rotation.norms) == 5
    assert sum(len(n.readers) for n in rotation.norms) == 2 * 5 + 1  # q, k, v, gate, up per layer; the head
    ids = _ids()
    inputs = _reader_inputs(reference, rotation)
    before = _run(reference, ["logits", *inputs], ids)
    after = _run(rotated, ["logits", *inputs], ids)
    error = np.abs(after["logits"] - before["logits"]).max() / np.abs(before["logits"]).max()
    assert error < 1e-4, error
    amax_before = np.array([np.abs(before[t]).max() for t in inputs])
    amax_after = np.array([np.abs(after[t]).max() for t in inputs])
    assert (amax_after < amax_before).all(), (amax_before, amax_after)


def test_int8_error_falls_with_rotation(tmp_path):
    path = save(llama_decoder(hidden=48), tmp_path / "llama.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=_ids(8, seed=2)[:, 0])
    ids = _ids(4, seed=5)
    reference = _run(onnx.load(path), ["logits"], ids)["logits"]
    errors = {}
    for rotate in (False, True):
        out = tmp_path / f"q{rotate}.onnx"
        onnxq.quantize(path, out, calib, rotate=rotate, calib_method="minmax", report=False, evaluate=False, quiet=True)
        got = _run(onnx.load(out), ["logits"], ids)["logits"]
        errors[rotate] = np.abs(got - reference).mean() / np.abs(reference).mean()
    assert errors[True] < errors[False], errors


@pytest.mark.parametrize("extra", [[], ["--smoothquant", "auto", "--precision", "fp8", "--rotate-online", "32"]])
def test_rotated_plan_replays_byte_for_byte(tmp_path, extra):
    path = save(llama_decoder(hidden=48), tmp_path / "llama.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=_ids(8, seed=2)[:, 0])
    a, b, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    assert main(["quantize", str(path), "-o", str(a), "--calib", str(calib), "--rotate", "--save-plan", str(plan), "-q", *extra]) == 0
    saved = json.loads(plan.read_text())["rotation"]
    assert saved["kind"] == "hadamard" and saved["size"] == 48 and len(saved["signs"]) == 12  # 48 bits in hex
    assert main(["quantize", str(path), "-o", str(b), "--plan", str(plan), "--no-eval", "-q"]) == 0
    assert a.read_bytes() == b.read_bytes()
    report = json.loads((tmp_path / "a.report.json").read_text())["rotation"]
    assert report["summary"].startswith("residual stream of size 48") and report["writers"] == saved["writers"]


def test_layernorm_model_is_refused_in_one_line(tmp_path, capsys):
    path = save(tiny_decoder_block(), tmp_path / "block.onnx")
    with pytest.raises(UnsupportedModelError, match="--rotate needs a pre-norm decoder.*LayerNormalization"):
        find_residual_stream(load_and_preprocess(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(size=(2, 1, 16, 32)).astype(np.float32)[:, 0])
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib), "--rotate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("onnxq: error: --rotate needs") and "LayerNormalization" in err, err


def test_online_rotation_before_down_proj_is_exact_and_lowers_its_amax(tmp_path):
    path = save(llama_decoder(hidden=48), tmp_path / "llama.onnx")  # MLP width 96 = 6 blocks of 16
    model = load_and_preprocess(path)
    reference = modelio.to_proto(model)
    plan = QuantPlan(target="tensorrt")
    plan.rotation = find_residual_stream(model, online_block=16)
    assert plan.rotation.online == ["layers.0.down_proj", "layers.1.down_proj"]  # not the o_projs
    assert plan.rotation.head.scores == ["layers.0.qk", "layers.1.qk"]  # queries and keys rotated online too
    emit.emit(model, plan, ["rotate"])
    rotated = modelio.to_proto(model)
    scores = {n.name: list(n.input) for n in rotated.graph.node if n.name.endswith(".qk")}
    assert all(q.endswith("_rotated") and k.endswith("_rotated") for q, k in scores.values())
    downs = {n.name: n.input[0] for n in rotated.graph.node if n.name.endswith("down_proj")}
    assert all(t.endswith("_rotated") for t in downs.values())
    ids = _ids()
    before = _run(reference, ["logits", "layers.0_m", "layers.1_m"], ids)
    after = _run(rotated, ["logits", *downs.values()], ids)
    assert np.abs(after["logits"] - before["logits"]).max() / np.abs(before["logits"]).max() < 1e-4
    for i in range(2):
        assert np.abs(after[downs[f"layers.{i}.down_proj"]]).max() < np.abs(before[f"layers.{i}_m"]).max()


def test_online_block_must_divide_the_width(tmp_path):
    path = save(llama_decoder(hidden=48), tmp_path / "llama.onnx")
    with pytest.raises(UnsupportedModelError, match="does not divide the width 96"):
        find_residual_stream(load_and_preprocess(path), online_block=64)


def test_check_layers_lists_rotated_tensors_as_unmatched(tmp_path):
    """Tensors in the rotated basis have no float counterpart: listed, not compared with the
    unrotated float tensors (which would report a meaningless SNR)."""
    path = save(llama_decoder(hidden=48), tmp_path / "llama.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=_ids(8, seed=2)[:, 0])
    out = tmp_path / "q.onnx"
    onnxq.quantize(path, out, calib, rotate=True, report=False, evaluate=False, quiet=True)
    proto = onnx.load(out)
    rotated = set(json.loads({p.key: p.value for p in proto.metadata_props}["onnxq.rotated"]))
    reference, _, rotation = _rotated(path)
    assert set(_reader_inputs(reference, rotation)) <= rotated
    assert {"layers.0_v", "layers.0_cr", "layers.1_cr"} <= rotated  # rotated per head up to o_proj
    layers = layer_snr(path, out, [{"ids": x} for x in _ids(2, seed=7)], progress=False)
    unmatched = dict(layers.unmatched)
    assert unmatched and set(unmatched) <= rotated and all("rotated by --rotate" in r for r in unmatched.values())
    assert all(s.pair.tensor not in rotated for s in layers.stats) and layers.matched + len(unmatched) == layers.total
    assert layers.matched > 0  # the attention and MLP internals are still compared


def test_sweep_and_solve_measure_and_keep_the_rotated_model(tmp_path):
    """sweep --rotate measures the rotated model; the solver repeats the rotation from the sweep's
    recipe, and the solved plan (rotation included) replays to the model the solver saved."""
    path = save(llama_decoder(hidden=48), tmp_path / "llama.onnx")
    calib, evald = tmp_path / "calib.npz", tmp_path / "eval.npz"
    np.savez(calib, ids=_ids(8, seed=2)[:, 0])
    np.savez(evald, ids=_ids(4, seed=9)[:, 0])
    plain = sweep(path, calib, tmp_path / "plain.json", eval=evald, quiet=True, plot=False)
    rotated = sweep(path, calib, tmp_path / "rot.json", eval=evald, rotate=True, rotate_online=16, quiet=True, plot=False)
    assert rotated.the_recipe().rotate and rotated.the_recipe().rotate_online == 16
    assert [la.name for la in rotated.layers] == [la.name for la in plain.layers]
    assert any(rotated.sensitivity(la.name, "int8") != plain.sensitivity(la.name, "int8") for la in plain.layers)
    saved, plan_path = tmp_path / "solved.onnx", tmp_path / "plan.json"
    result = solve(tmp_path / "rot.json", path, calib, plan_path, eval=evald, max_high_precision_layers=1, save_model=saved, quiet=True, plot=False)
    assert result.plan.rotation is not None and result.plan.rotation.online_block == 16
    # the inserted float MatMuls are each layer's float side MACs (seq 12, MLP width 96, block 16;
    # 4 heads of 12 on both sides of Q·Kᵀ) and count against the 8-bit share
    rotation = result.plan.rotation
    assert rotation.online and rotation.head is not None and rotation.head.scores
    expected = dict.fromkeys(rotation.online, 12 * 96 * 16) | dict.fromkeys(rotation.head.scores, 2 * (4 * 12 * 12) * 12)
    by_layer = {la.name: la for la in rotated.layers}
    for la in rotated.layers:
        assert la.float_side_macs == sum(expected.get(n, 0) for n in la.nodes)
    side = sum(la.float_side_macs for la in rotated.layers)
    total = sum(la.matmul_macs for la in rotated.layers) + side
    promoted = sum(by_layer[n].matmul_macs for n in result.chosen["promoted"])
    assert result.chosen["matmul_macs_8bit_fraction"] == pytest.approx(1 - (side + promoted) / total)
    replayed = tmp_path / "replayed.onnx"
    assert main(["quantize", str(path), "-o", str(replayed), "--plan", str(plan_path), "--no-eval", "-q"]) == 0
    assert replayed.read_bytes() == saved.read_bytes()


@pytest.mark.parametrize("hidden", [48, 36])  # heads of 12 (Paley Hadamard), of 9 (random orthogonal)
def test_per_head_rotation_between_values_and_o_proj_is_exact(tmp_path, hidden):
    """Each value head's channels are rotated by H (bias too; the KV heads' shared copies carry it
    to every attention head of the group) and o_proj's rows by Hᵀ: o_proj reads the context
    rotated head by head, and the logits are unchanged."""
    path = save(llama_decoder(hidden=hidden, value_bias=True), tmp_path / "llama.onnx")
    reference, rotated, rotation = _rotated(path)
    head = rotation.head
    assert head is not None and head.size == hidden // 4 and head.kind == ("hadamard" if hidden == 48 else "orthogonal")
    assert head.values == ["layers.0.v_proj", "layers.1.v_proj"] and head.value_biases == ["layers.0.v_bias", "layers.1.v_bias"]
    assert head.outputs == ["layers.0.o_proj", "layers.1.o_proj"]
    ids = _ids()
    before = _run(reference, ["logits", "layers.0_cr", "layers.1_cr"], ids)
    after = _run(rotated, ["logits", "layers.0_cr", "layers.1_cr"], ids)
    assert np.abs(after["logits"] - before["logits"]).max() / np.abs(before["logits"]).max() < 1e-4
    h = rotation_matrix(head)
    for i in range(2):
        context = before[f"layers.{i}_cr"]
        expected = (context.reshape(*context.shape[:-1], -1, head.size) @ h).reshape(context.shape)
        assert np.abs(after[f"layers.{i}_cr"] - expected).max() < 1e-4 * np.abs(context).max()
        assert np.abs(after[f"layers.{i}_cr"] - context).max() > 0.1 * np.abs(context).max()


def test_per_head_rotation_replays_from_the_plan(tmp_path):
    path = save(llama_decoder(hidden=48, value_bias=True), tmp_path / "llama.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, ids=_ids(8, seed=2)[:, 0])
    a, b, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    assert main(["quantize", str(path), "-o", str(a), "--calib", str(calib), "--rotate", "--save-plan", str(plan), "-q", "--no-eval"]) == 0
    assert json.loads(plan.read_text())["rotation"]["head"]["outputs"] == ["layers.0.o_proj", "layers.1.o_proj"]
    assert main(["quantize", str(path), "-o", str(b), "--plan", str(plan), "--no-eval", "-q"]) == 0
    assert a.read_bytes() == b.read_bytes()
