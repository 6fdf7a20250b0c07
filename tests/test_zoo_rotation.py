"""--rotate on SmolLM2 6 layers: the rotated float model (residual stream, the per-head rotation
between V and o_proj, the online Hadamard before down_proj and on Q/K) computes the same logits, the tied embedding/LM head gets two rotated copies,
and the activations entering the quantized products lose their outliers."""

import numpy as np
import onnx
import pytest

from onnxq import emit, modelio
from onnxq.passes.preprocess import load_and_preprocess
from onnxq.plan import QuantPlan
from onnxq.rotation import find_residual_stream
from onnxq.runtime import ort as ort_rt

pytestmark = pytest.mark.zoo
pytest.importorskip("torch", reason="the zoo exports PyTorch models: install the zoo extra")

from onnxq import zoo  # noqa: E402


def _run(proto: onnx.ModelProto, tensors: list[str], ids: np.ndarray) -> dict[str, np.ndarray]:
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    names = ["logits", *tensors]
    return dict(zip(names, ort_rt.create_session(proto).run(names, {"input_ids": ids})))


def test_smollm2_rotation_is_exact_and_spreads_the_outliers():
    entry = zoo.get("smollm2-6l")
    ids = entry.eval_data(1)["input_ids"][:, :64]
    model = load_and_preprocess(entry.onnx_path())
    plan = QuantPlan(target="tensorrt")
    plan.rotation = find_residual_stream(model, online_block=128)
    rotation = plan.rotation
    assert rotation.size == 576 and rotation.kind == "hadamard" and rotation.factors == [72, 8]
    assert len(rotation.writers) == 12 and len(rotation.online) == 6 and len(rotation.norms) == 13
    readers = {r for n in rotation.norms for r in n.readers}
    assert len(readers) == 6 * 5 + 1  # q, k, v, gate, up per layer; the LM head
    head = rotation.head  # 9 query heads sharing 3 KV heads of 64 channels
    assert head.size == 64 and len(head.values) == len(head.outputs) == len(head.scores) == 6 and not head.value_biases
    assert set(head.values) <= readers and set(head.outputs) == set(rotation.writers) - set(rotation.online)
    quantized_inputs = lambda proto: sorted({n.input[0] for n in proto.graph.node if n.name in readers or n.name in rotation.online})  # noqa: E731
    reference = modelio.to_proto(model)
    before = _run(reference, quantized_inputs(reference), ids)
    emit.emit(model, plan, ["rotate"])
    rotated = modelio.to_proto(model)
    after = _run(rotated, quantized_inputs(rotated), ids)
    error = np.abs(after["logits"] - before["logits"]).max() / np.abs(before["logits"]).max()
    assert error < 1e-4, error
    names = {i.name for i in rotated.graph.initializer}
    assert "lm.lm_head.weight" not in names and sum(n.endswith("lm.lm_head.weight_rotated") for n in names) == 2
    amax = lambda values: max(np.abs(v).max() for k, v in values.items() if k != "logits")  # noqa: E731
    # the largest activation entering a quantized MatMul (SmolLM2: a down_proj input) falls
    assert amax(after) < 0.5 * amax(before), (amax(before), amax(after))
