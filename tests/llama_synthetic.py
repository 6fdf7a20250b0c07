"""A tiny Llama-style decoder built with onnx.helper (fast tests of the residual-stream rotation).

ids → Gather(E) → L × [RMSNorm → Q (bias), K, V (GQA: fewer KV heads, repeated) (and V a bias with
``value_bias``) → causal softmax attention → o_proj (bias) → + residual → RMSNorm → SiLU(gate)·up → down → + residual]
→ RMSNorm → MatMul(Transpose(E)) (a tied LM head). One residual channel of the embedding is
large and the norm weights have outlier channels, as real LLMs have.

Options for the calibration-block tests (the defaults build the model above, unchanged): the
embeddings as a graph input ``x`` instead of ids, the additive mask as a graph input (read by
every layer), a rotary-like factor ``rot = Cos(pos)`` computed in layer 1 from a graph input
``pos`` and multiplied into Q from layer 1 on (a tensor crossing later blocks), and a symbolic
batch dimension.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10


def _init(name: str, array: np.ndarray, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array).astype(dtype), name)


def _rmsnorm(x: str, prefix: str, hidden: int, rng, inits: list) -> tuple[list, str]:
    gamma = rng.uniform(0.5, 1.5, hidden)
    gamma[[1, hidden // 2]] = [8.0, -6.0]
    inits.append(_init(f"{prefix}.weight", gamma))
    nodes = [
        helper.make_node("Pow", [x, "two"], [f"{prefix}_sq"], name=f"{prefix}_pow"),
        helper.make_node("ReduceMean", [f"{prefix}_sq"], [f"{prefix}_ms"], name=f"{prefix}_mean", axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{prefix}_ms", "eps"], [f"{prefix}_mse"], name=f"{prefix}_add"),
        helper.make_node("Sqrt", [f"{prefix}_mse"], [f"{prefix}_rms"], name=f"{prefix}_sqrt"),
        helper.make_node("Reciprocal", [f"{prefix}_rms"], [f"{prefix}_inv"], name=f"{prefix}_rcp"),
        helper.make_node("Mul", [x, f"{prefix}_inv"], [f"{prefix}_n"], name=f"{prefix}_mul"),
        helper.make_node("Mul", [f"{prefix}.weight", f"{prefix}_n"], [f"{prefix}_out"], name=f"{prefix}_weight"),
    ]
    return nodes, f"{prefix}_out"


def _heads(x: str, prefix: str, heads: int, repeat: int, head_dim: int, perm: list[int]) -> list:
    """[1, S, heads·d] → (repeated to heads·repeat) → transposed by ``perm``."""
    nodes = [helper.make_node("Reshape", [x, f"shape_{heads}_1"], [f"{prefix}_r"], name=f"{prefix}_reshape")]
    if repeat > 1:
        nodes += [
            helper.make_node("Expand", [f"{prefix}_r", f"expand_{heads}"], [f"{prefix}_e"], name=f"{prefix}_expand"),
            helper.make_node("Reshape", [f"{prefix}_e", "shape_all"], [f"{prefix}_a"], name=f"{prefix}_merge"),
        ]
    src = f"{prefix}_a" if repeat > 1 else f"{prefix}_r"
    nodes.append(helper.make_node("Transpose", [src], [f"{prefix}_t"], name=f"{prefix}_transpose", perm=perm))
    return nodes


def _layer(i: int, x: str, dims: dict, rng, inits: list) -> tuple[list, str]:
    hidden, heads, kv, d, ffn, seq = dims["hidden"], dims["heads"], dims["kv"], dims["head_dim"], dims["ffn"], dims["seq"]
    p = f"layers.{i}"
    for name, shape in [("q", (hidden, heads * d)), ("k", (hidden, kv * d)), ("v", (hidden, kv * d)), ("o", (heads * d, hidden)), ("gate", (hidden, ffn)), ("up", (hidden, ffn)), ("down", (ffn, hidden))]:
        inits.append(_init(f"{p}.{name}.weight", rng.normal(0, 1 / np.sqrt(shape[0]), shape)))
    inits += [_init(f"{p}.q.bias", rng.normal(0, 0.1, heads * d)), _init(f"{p}.o.bias", rng.normal(0, 0.1, hidden))]
    v_out = f"{p}_v0" if dims["value_bias"] else f"{p}_v"
    rotate = dims["rotary"] and i >= 1
    nodes, hn = _rmsnorm(x, f"{p}.input_norm", hidden, rng, inits)
    nodes += [
        helper.make_node("MatMul", [hn, f"{p}.q.weight"], [f"{p}_q0"], name=f"{p}.q_proj"),
        helper.make_node("Add", [f"{p}_q0", f"{p}.q.bias"], [f"{p}_qb" if rotate else f"{p}_q"], name=f"{p}.q_bias"),
        helper.make_node("MatMul", [hn, f"{p}.k.weight"], [f"{p}_k"], name=f"{p}.k_proj"),
        helper.make_node("MatMul", [hn, f"{p}.v.weight"], [v_out], name=f"{p}.v_proj"),
    ]
    if dims["rotary"] and i == 1:
        nodes.append(helper.make_node("Cos", ["pos"], ["rot"], name="rotary"))
    if rotate:
        nodes.append(helper.make_node("Mul", [f"{p}_qb", "rot"], [f"{p}_q"], name=f"{p}.rotate"))
    if dims["value_bias"]:  # Qwen2-style: a bias on the values (its own random stream, after the weights)
        inits.append(_init(f"{p}.v.bias", np.random.default_rng(i + 100).normal(0, 0.5, kv * d)))
        nodes.append(helper.make_node("Add", [v_out, f"{p}.v.bias"], [f"{p}_v"], name=f"{p}.v_bias"))
    nodes += _heads(f"{p}_q", f"{p}_qh", heads, 1, d, [0, 2, 1, 3])
    nodes += _heads(f"{p}_k", f"{p}_kh", kv, heads // kv, d, [0, 2, 3, 1])
    nodes += _heads(f"{p}_v", f"{p}_vh", kv, heads // kv, d, [0, 2, 1, 3])
    nodes += [
        helper.make_node("MatMul", [f"{p}_qh_t", f"{p}_kh_t"], [f"{p}_s0"], name=f"{p}.qk"),
        helper.make_node("Mul", [f"{p}_s0", "att_scale"], [f"{p}_s1"], name=f"{p}.scale"),
        helper.make_node("Add", [f"{p}_s1", "mask"], [f"{p}_s"], name=f"{p}.mask"),
        helper.make_node("Softmax", [f"{p}_s"], [f"{p}_p"], name=f"{p}.softmax", axis=-1),
        helper.make_node("MatMul", [f"{p}_p", f"{p}_vh_t"], [f"{p}_c"], name=f"{p}.pv"),
        helper.make_node("Transpose", [f"{p}_c"], [f"{p}_ct"], name=f"{p}.ctx_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{p}_ct", "shape_ctx"], [f"{p}_cr"], name=f"{p}.ctx_r"),
        helper.make_node("MatMul", [f"{p}_cr", f"{p}.o.weight"], [f"{p}_o0"], name=f"{p}.o_proj"),
        helper.make_node("Add", [f"{p}_o0", f"{p}.o.bias"], [f"{p}_o"], name=f"{p}.o_bias"),
        helper.make_node("Add", [x, f"{p}_o"], [f"{p}_h"], name=f"{p}.residual1"),
    ]
    norm, hn2 = _rmsnorm(f"{p}_h", f"{p}.post_norm", hidden, rng, inits)
    nodes += norm + [
        helper.make_node("MatMul", [hn2, f"{p}.gate.weight"], [f"{p}_g"], name=f"{p}.gate_proj"),
        helper.make_node("MatMul", [hn2, f"{p}.up.weight"], [f"{p}_u"], name=f"{p}.up_proj"),
        helper.make_node("Sigmoid", [f"{p}_g"], [f"{p}_gs"], name=f"{p}.sigmoid"),
        helper.make_node("Mul", [f"{p}_g", f"{p}_gs"], [f"{p}_ga"], name=f"{p}.silu"),
        helper.make_node("Mul", [f"{p}_ga", f"{p}_u"], [f"{p}_m"], name=f"{p}.swiglu"),
        helper.make_node("MatMul", [f"{p}_m", f"{p}.down.weight"], [f"{p}_d"], name=f"{p}.down_proj"),
        helper.make_node("Add", [f"{p}_h", f"{p}_d"], [f"{p}_y"], name=f"{p}.residual2"),
    ]
    return nodes, f"{p}_y"


def llama_decoder(
    hidden: int = 48, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 96, seq: int = 12, seed: int = 0,
    value_bias: bool = False, *, embeddings_input: bool = False, mask_input: bool = False, rotary_input: bool = False,
    batch: int | str = 1,
) -> onnx.ModelProto:
    assert kv_heads < heads and heads % kv_heads == 0, "grouped-query attention: fewer KV heads than heads"
    rng = np.random.default_rng(seed)
    d = hidden // heads
    dims = {"hidden": hidden, "heads": heads, "kv": kv_heads, "head_dim": d, "ffn": 2 * hidden, "seq": seq, "value_bias": value_bias, "rotary": rotary_input}
    table = rng.normal(0, 1, (vocab, hidden))
    table[:, 3] *= 20.0  # a massive residual channel
    mask = np.where(np.tril(np.ones((seq, seq))) > 0, 0.0, -1e9)
    b = 1 if batch == 1 else 0  # Reshape: 0 copies the (symbolic) batch dimension
    inits = [
        _init("embed.weight", table), _init("two", np.array(2.0)), _init("eps", np.array(1e-6)),
        _init("att_scale", np.array(1 / np.sqrt(d))), *([] if mask_input else [_init("mask", mask[None, None])]),
        _init(f"shape_{heads}_1", [b, seq, heads, d], np.int64), _init(f"shape_{kv_heads}_1", [b, seq, kv_heads, 1, d], np.int64),
        _init(f"expand_{kv_heads}", [1, seq, kv_heads, heads // kv_heads, d], np.int64),
        _init("shape_all", [b, seq, heads, d], np.int64), _init("shape_ctx", [b, seq, heads * d], np.int64),
    ]
    if embeddings_input:
        nodes, x, inputs = [], "x", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, hidden])]
    else:
        nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["embedding"], name="embed_tokens")]
        x, inputs = "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, [batch, seq])]
    if mask_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [batch, 1, seq, seq]))
    if rotary_input:
        inputs.append(helper.make_tensor_value_info("pos", TensorProto.FLOAT, [batch, seq, heads * d]))
    for i in range(layers):
        layer, x = _layer(i, x, dims, rng, inits)
        nodes += layer
    final, xn = _rmsnorm(x, "final_norm", hidden, rng, inits)
    nodes += final + [
        helper.make_node("Transpose", ["embed.weight"], ["embed_t"], name="head_transpose", perm=[1, 0]),
        helper.make_node("MatMul", [xn, "embed_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "llama_decoder", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, vocab])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
