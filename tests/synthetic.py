"""Small synthetic models built with onnx.helper, for unit tests that must not need the zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnxruntime refuses onnx 1.23's default IR version


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def residual_cnn(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[1,16,8,8] → Pad → Conv(16→32) → BN → Relu → Conv(32→16) → Add(x) → Conv(16→3, tiny) → GAP → Flatten → Gemm(3→10)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.normal(0, 0.2, (32, 16, 3, 3))),
        _init("b1", rng.normal(0, 0.1, (32,))),
        _init("bn_scale", rng.uniform(0.5, 1.5, (32,))),
        _init("bn_bias", rng.normal(0, 0.1, (32,))),
        _init("bn_mean", rng.normal(0, 0.1, (32,))),
        _init("bn_var", rng.uniform(0.5, 1.5, (32,))),
        _init("w2", rng.normal(0, 0.1, (16, 32, 1, 1))),
        _init("w3", rng.normal(0, 0.2, (3, 16, 1, 1))),
        _init("wfc", rng.normal(0, 0.3, (10, 3))),
        _init("bfc", rng.normal(0, 0.1, (10,))),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["x_pad"], name="pad", mode="constant"),
        helper.make_node("Conv", ["x_pad", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["c2", "x"], ["res"], name="residual_add"),
        helper.make_node("Conv", ["res", "w3"], ["c3"], name="conv_tiny"),
        helper.make_node("GlobalAveragePool", ["c3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def tiny_attention(opset: int = 17, seed: int = 0, seq: int = 16, hidden: int = 32) -> onnx.ModelProto:
    """x[1,seq,hidden] → Q,K,V MatMuls sharing x → softmax(QKᵀ)·V → out-proj MatMul → + x."""
    rng = np.random.default_rng(seed)
    inits = [_init(n, rng.normal(0, 0.2, (hidden, hidden))) for n in ("wq", "wk", "wv", "wo")]
    inits.append(_init("scale", np.array(1.0 / np.sqrt(hidden))))
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores_raw"], name="qk"),
        helper.make_node("Mul", ["scores_raw", "scale"], ["scores"], name="scale_scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
        helper.make_node("MatMul", ["ctx", "wo"], ["proj"], name="o_proj"),
        helper.make_node("Add", ["proj", "x"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def random_npz(path: Path, name: str, shape: tuple[int, ...], n: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, **{name: rng.normal(0, 1, (n, *shape[1:])).astype(np.float32)})
    return path


def tied_embedding_lm(vocab: int = 64, hidden: int = 32, seq: int = 8, seed: int = 0) -> onnx.ModelProto:
    """ids → Gather(E) → MatMul(W1) → MatMul(Transpose(E)) → logits: E is read by Gather and, transposed, by the head."""
    rng = np.random.default_rng(seed)
    inits = [_init("embed", rng.normal(0, 0.5, (vocab, hidden))), _init("w1", rng.normal(0, 0.2, (hidden, hidden)))]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h0"], name="embed_lookup"),
        helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mlp"),
        helper.make_node("Transpose", ["embed"], ["embed_t"], name="head_transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h1", "embed_t"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied_lm",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, seq, vocab])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def attention_reference(x: np.ndarray, w: dict[str, np.ndarray], q: np.ndarray | None = None) -> np.ndarray:
    """numpy forward of :func:`tiny_attention` (hidden 32), with ``q`` replacing ``x @ wq`` if given."""
    q = x @ w["wq"] if q is None else q
    k, v = x @ w["wk"], x @ w["wv"]
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(32)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v) @ w["wo"] + x


def rmsnorm_attention(opset: int = 18, seed: int = 0, seq: int = 16, hidden: int = 32, gain: float = 400.0) -> onnx.ModelProto:
    """x·gain (a residual stream beyond FP16's square root range) → RMSNorm (Pow → ReduceMean →
    Add → Sqrt → Reciprocal → Mul) → Q/K/V MatMuls → masked softmax (mask −3.4e38) → out MatMul."""
    rng = np.random.default_rng(seed)
    inits = [_init(n, rng.normal(0, 0.2, (hidden, hidden))) for n in ("wq", "wk", "wv", "wo")]
    mask = np.where(np.tril(np.ones((seq, seq))) > 0, 0.0, np.finfo(np.float32).min)
    inits += [
        _init("gain", np.array(gain)), _init("two", np.array(2.0)), _init("eps", np.array(1e-6)),
        _init("scale", np.array(1.0 / np.sqrt(hidden))), _init("mask", mask[None]),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "gain"], ["h"], name="residual"),
        helper.make_node("Pow", ["h", "two"], ["sq"], name="rms_pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="rms_mean", keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="rms_add"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms_sqrt"),
        helper.make_node("Reciprocal", ["rms"], ["inv_rms"], name="rms_rcp"),
        helper.make_node("Mul", ["h", "inv_rms"], ["hn"], name="rms_mul"),
        helper.make_node("MatMul", ["hn", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["hn", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["hn", "wv"], ["v"], name="v_proj"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores_raw"], name="qk"),
        helper.make_node("Mul", ["scores_raw", "scale"], ["scores"], name="scale_scores"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
        helper.make_node("MatMul", ["ctx", "wo"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "rmsnorm_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
def tiny_decoder_block(seq: int = 16, hidden: int = 32, ffn: int = 48, seed: int = 0) -> onnx.ModelProto:
    """A Llama-style block with the patterns SmoothQuant folds into, and outlier channels:

    x → RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul weight) → Q, K, V (V with a bias Add) →
    softmax(QKᵀ)·V → o_proj → + x → LayerNormalization → gate, up → Mul(SiLU(gate), up) → down
    → + h → Gemm(transB) head (its input also feeds a Relu output: no producer may absorb there).
    """
    rng = np.random.default_rng(seed)
    norm_w = rng.uniform(0.5, 1.5, (hidden,))
    norm_w[[3, 17]] = [30.0, -20.0]  # outlier channels, as real LLM norms have
    ln_w = rng.uniform(0.5, 1.5, (hidden,))
    ln_w[5] = 25.0
    inits = [_init(n, rng.normal(0, 0.2, (hidden, hidden))) for n in ("wq", "wk", "wv", "wo")]
    inits += [
        _init("bv", rng.normal(0, 0.1, (hidden,))),
        _init("norm_w", norm_w),
        _init("two", np.array(2.0)),
        _init("eps", np.array(1e-6)),
        _init("att_scale", np.array(1.0 / np.sqrt(hidden))),
        _init("ln_w", ln_w),
        _init("ln_b", rng.normal(0, 0.1, (hidden,))),
        _init("wg", rng.normal(0, 0.2, (hidden, ffn))),
        _init("wu", rng.normal(0, 0.2, (hidden, ffn))),
        _init("wd", rng.normal(0, 0.2, (ffn, hidden))),
        _init("whead", rng.normal(0, 0.2, (24, hidden))),
        _init("bhead", rng.normal(0, 0.1, (24,))),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="rms_pow"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="rms_mean", axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="rms_add"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="rms_sqrt"),
        helper.make_node("Div", ["x", "rms"], ["xn"], name="rms_div"),
        helper.make_node("Mul", ["xn", "norm_w"], ["h_norm"], name="rms_weight"),
        helper.make_node("MatMul", ["h_norm", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h_norm", "wk"], ["k"], name="k_proj"),
        helper.make_node("MatMul", ["h_norm", "wv"], ["v0"], name="v_proj"),
        helper.make_node("Add", ["v0", "bv"], ["v"], name="v_bias"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores_raw"], name="qk"),
        helper.make_node("Mul", ["scores_raw", "att_scale"], ["scores"], name="scale_scores"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"], name="pv"),
        helper.make_node("MatMul", ["ctx", "wo"], ["proj"], name="o_proj"),
        helper.make_node("Add", ["proj", "x"], ["h"], name="residual1"),
        helper.make_node("LayerNormalization", ["h", "ln_w", "ln_b"], ["h_ln"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h_ln", "wg"], ["gate"], name="gate_proj"),
        helper.make_node("MatMul", ["h_ln", "wu"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["gate"], ["gate_sig"], name="silu_sigmoid"),
        helper.make_node("Mul", ["gate", "gate_sig"], ["gate_act"], name="silu_mul"),
        helper.make_node("Mul", ["gate_act", "up"], ["mlp"], name="swiglu"),
        helper.make_node("MatMul", ["mlp", "wd"], ["down"], name="down_proj"),
        helper.make_node("Add", ["down", "h"], ["y"], name="residual2"),
        helper.make_node("Reshape", ["y", "flat_shape"], ["y2"], name="flatten"),
        helper.make_node("Gemm", ["y2", "whead", "bhead"], ["logits"], name="head", transB=1),
        helper.make_node("Relu", ["y2"], ["y_relu"], name="side_relu"),
    ]
    inits.append(numpy_helper.from_array(np.array([seq, hidden], dtype=np.int64), "flat_shape"))
    graph = helper.make_graph(
        nodes,
        "tiny_decoder_block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, hidden])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [seq, 24]),
            helper.make_tensor_value_info("y_relu", TensorProto.FLOAT, [seq, hidden]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def vad_like_if(seed: int = 0, chunk: int = 64, hidden: int = 32) -> onnx.ModelProto:
    """A streaming VAD-like model whose layers sit inside ``If`` branches (as in Silero VAD).

    Inputs x[1, 16, chunk] and sr (int64 scalar); ``If(sr == 16000)`` picks one of two branches,
    each Conv(16→hidden, k=3) → Relu → Conv(hidden→hidden, k=3) → Relu → ReduceMean → Gemm(hidden→1)
    → Sigmoid. The convolution weights live in the main graph (outer scope), as torch exports
    them; the branch's second weight is a Constant node inside the branch.
    """
    rng = np.random.default_rng(seed)

    def branch(tag: str) -> onnx.GraphProto:
        w2 = numpy_helper.from_array(rng.normal(0, 0.15, (hidden, hidden, 3)).astype(np.float32), f"w2_{tag}")
        nodes = [
            helper.make_node("Conv", ["x", f"w1_{tag}", f"b1_{tag}"], [f"c1_{tag}"], name=f"conv1_{tag}", pads=[1, 1]),
            helper.make_node("Relu", [f"c1_{tag}"], [f"r1_{tag}"], name=f"relu1_{tag}"),
            helper.make_node("Constant", [], [f"w2_{tag}"], name=f"const_w2_{tag}", value=w2),
            helper.make_node("Conv", [f"r1_{tag}", f"w2_{tag}"], [f"c2_{tag}"], name=f"conv2_{tag}", pads=[1, 1]),
            helper.make_node("Relu", [f"c2_{tag}"], [f"r2_{tag}"], name=f"relu2_{tag}"),
            helper.make_node("ReduceMean", [f"r2_{tag}"], [f"m_{tag}"], name=f"mean_{tag}", axes=[2], keepdims=0),
            helper.make_node("Gemm", [f"m_{tag}", f"wfc_{tag}"], [f"logit_{tag}"], name=f"fc_{tag}", transB=1),
            helper.make_node("Sigmoid", [f"logit_{tag}"], [f"p_{tag}"], name=f"sigmoid_{tag}"),
        ]
        out = helper.make_tensor_value_info(f"p_{tag}", TensorProto.FLOAT, None)
        return helper.make_graph(nodes, f"branch_{tag}", [], [out])

    inits = [numpy_helper.from_array(np.array(16000, dtype=np.int64), "sr16k")]
    for tag in ("16k", "8k"):
        inits += [_init(f"w1_{tag}", rng.normal(0, 0.3, (hidden, 16, 3))), _init(f"b1_{tag}", rng.normal(0, 0.1, (hidden,))),
                  _init(f"wfc_{tag}", rng.normal(0, 0.5, (1, hidden)))]
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="is16k"),
        helper.make_node("If", ["is16k"], ["prob"], name="by_rate", then_branch=branch("16k"), else_branch=branch("8k")),
    ]
    graph = helper.make_graph(
        nodes, "vad_like",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, chunk]), helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 1])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def loop_matmul(seed: int = 0, hidden: int = 32, steps: int = 3, rows: int = 4) -> onnx.ModelProto:
    """h[rows, hidden] → Loop(steps) { h = Relu(MatMul(h, W)) } → h: a MatMul inside a Loop body."""
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
            helper.make_node("MatMul", ["h_in", "w_loop"], ["mm"], name="loop_matmul"),
            helper.make_node("Relu", ["mm"], ["h_out"], name="loop_relu"),
        ],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [rows, hidden])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [rows, hidden])],
    )
    w = rng.normal(0, 1.0 / np.sqrt(hidden), (hidden, hidden)) + np.eye(hidden)
    inits = [_init("w_loop", w), numpy_helper.from_array(np.array(steps, dtype=np.int64), "steps"),
             numpy_helper.from_array(np.array(True), "true")]
    graph = helper.make_graph(
        [helper.make_node("Loop", ["steps", "true", "h0"], ["h"], name="loop", body=body)], "loop_matmul",
        [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [rows, hidden])], [helper.make_tensor_value_info("h", TensorProto.FLOAT, [rows, hidden])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: the disposition a terminal's
    Ctrl-C meets. A child inherits an ignored SIGINT from a shell that started the test run in the
    background (``cmd &`` without job control), and Python then installs no handler for it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
