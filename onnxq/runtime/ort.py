"""ONNX Runtime sessions for float and quantized models.

ORT is onnxq's reference executor. Two of its behaviours shape this module:
- FP8 Q/DQ models fail to load on the CPU provider at ORT_ENABLE_EXTENDED or higher (a QDQ fusion
  receives float8 inputs), so sessions for them use ORT_ENABLE_BASIC;
- Q/DQ with FP16 scales (``--high-precision fp16``) give wrong results on the CPU provider at
  ORT_ENABLE_BASIC and above (EfficientNet-Lite0 INT8: logit cosine 0.19 instead of 0.98; the
  graph is right: ``onnx.reference`` and ORT_DISABLE_ALL agree), so sessions for them run
  without graph optimizations;
- it refuses IR versions newer than it knows, so in-memory models go through
  :func:`onnxq.modelio.to_proto`, which sets the IR version the opset needs.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxq import modelio
from onnxq.errors import DataError, OnnxqError, UnsupportedModelError, one_line
from onnxq.progress import log

_FP8_TYPES = {
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}

# numpy dtype for each ORT input type string
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _uses_fp8(proto: onnx.ModelProto) -> bool:
    for init in proto.graph.initializer:
        if init.data_type in _FP8_TYPES:
            return True
    for node in proto.graph.node:
        if node.op_type == "QuantizeLinear":
            for attr in node.attribute:
                if attr.name == "output_dtype" and attr.i in _FP8_TYPES:
                    return True
    return False


def _uses_fp16_qdq(proto: onnx.ModelProto) -> bool:
    fp16_inits = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    return any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 1 and n.input[1] in fp16_inits
        for n in proto.graph.node
    )


# ONNX Runtime's ReluQuantFusion rewrite rule (rule name "ReluQuantRewrite", in the Level2 rule set
# that ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL run) deletes a Relu that feeds a QuantizeLinear unless
# the zero point is int8 -128 or uint8 != 0; it does not know float8 zero points, so it deletes the
# Relu before an FP8 QuantizeLinear too, and negative values pass through the signed FP8 grid.
# Measured with onnxruntime 1.32 (docs/benchmarks.md#fp8-in-a-default-ort-session).
ORT_FP8_BAD_RULE = "ReluQuantRewrite"


def fp8_relu_quantize_nodes(model: ir.Model) -> list[str]:
    """FP8 QuantizeLinear nodes fed by a Relu: the pattern ORT's ReluQuantRewrite computes wrong
    at ORT_ENABLE_EXTENDED and above (its default level is ALL)."""
    found = []
    for node in model.graph.all_nodes():
        if node.op_type != "QuantizeLinear" or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        zero, producer = node.inputs[2], node.inputs[0].producer() if node.inputs[0] is not None else None
        if producer is not None and producer.op_type == "Relu" and zero.dtype in _FP8_IR_TYPES:
            found.append(node.name)
    return found


PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}

# The providers of sessions made without an explicit list (calibration, the closing comparison):
# set for the duration of a job by :func:`use_providers`.
_DEFAULT_PROVIDERS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("onnxq_providers", default=("CPUExecutionProvider",))


def select_providers(requested: Sequence[str], have: Sequence[str] | None = None) -> list[str]:
    """The ORT providers to run on, in preference order, from short names (``cuda``, ``cpu``,
    ``tensorrt``): those this onnxruntime has (``have``: ``ort.get_available_providers()``), CPU
    last as the fallback of every other. A provider it lacks is skipped with a message; an
    unknown name is an error."""
    have = list(ort.get_available_providers() if have is None else have)
    chosen = []
    for short in requested:
        full = PROVIDER_ALIASES.get(short.strip().lower())
        if full is None:
            raise OnnxqError(f"unknown provider {short!r}; choose from {', '.join(PROVIDER_ALIASES)}")
        if full not in have:
            log(f"onnxq: {full} is not available in this onnxruntime (it has {', '.join(have)}); install the onnxruntime build that provides it (e.g. onnxruntime-gpu); falling back")
            continue
        chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    log(f"onnxq: ONNX Runtime providers: {', '.join(chosen)}")
    return list(dict.fromkeys(chosen))


@contextlib.contextmanager
def use_providers(requested: Sequence[str] | None) -> Iterator[None]:
    """Sessions made without ``providers`` inside the block use :func:`select_providers` of
    ``requested`` (None or empty: CPU only, without a message)."""
    token = _DEFAULT_PROVIDERS.set(tuple(select_providers(requested)) if requested else ("CPUExecutionProvider",))
    try:
        yield
    finally:
        _DEFAULT_PROVIDERS.reset(token)


def session_options(*, fp8: bool = False, fp16_qdq: bool = False, threads: int | None = None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if fp16_qdq:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif fp8:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def create_session(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for a path, an ``ir.Model`` or a ModelProto.

    An ``ir.Model`` is written to a temporary file with its weights in a side file, which ORT
    reads: no protobuf copy of the weights is made (a proto's bytes would be a second copy and a
    third with ORT's own). Raises :class:`UnsupportedModelError` with ORT's reason when ORT cannot load the model (an op
    or type it does not implement, an invalid graph).
    """
    providers = list(providers or _DEFAULT_PROVIDERS.get())
    tmpdir = None
    try:
        if isinstance(model, ir.Model):
            tmpdir = tempfile.TemporaryDirectory(prefix="onnxq-session-")
            model = _saved_for_session(model, tmpdir.name)
        if isinstance(model, onnx.ModelProto):
            fp8, fp16_qdq = _uses_fp8(model), _uses_fp16_qdq(model)
            unranked = _unranked_inputs(model)
            if model.ByteSize() < modelio.EXTERNAL_DATA_THRESHOLD:
                source: bytes | str = model.SerializeToString()
            else:
                tmpdir = tempfile.TemporaryDirectory(prefix="onnxq-session-")
                source = os.path.join(tmpdir.name, "model.onnx")
                onnx.save(model, source, save_as_external_data=True, location="model.onnx.data")
        else:
            source = str(model)
            if not Path(source).is_file():
                from onnxq.errors import ModelLoadError

                raise ModelLoadError(f"{source}: no such model file")
            try:
                header = onnx.load(source, load_external_data=False)
            except Exception as exc:  # protobuf's DecodeError and friends
                from onnxq.errors import ModelLoadError

                raise ModelLoadError(f"{source} is not a readable ONNX model ({type(exc).__name__}: {exc}); check that the file is complete and really is ONNX") from None
            fp8, fp16_qdq = _uses_fp8(header), _uses_fp16_qdq(header)
            unranked = _unranked_inputs(header)
        opts = session_options(fp8=fp8, fp16_qdq=fp16_qdq, threads=threads)
        try:
            session = ort.InferenceSession(source, sess_options=opts, providers=providers)
            # ORT reports an input without a shape as rank 0 (shape []): input_spec needs to know
            session.onnxq_unranked_inputs = unranked
            return session
        except Exception as exc:
            reason = one_line(exc)
            raise UnsupportedModelError(
                f"ONNX Runtime cannot load this model: {reason}. Run it with onnxruntime first; "
                "replace or exclude the op it names, or upgrade onnxruntime"
            ) from None
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def _saved_for_session(model: ir.Model, folder: str) -> str:
    """``model`` saved in ``folder`` (weights in ``model.onnx.data``, page-aligned) at the IR
    version ORT needs; the model itself is left as it was."""
    path = os.path.join(folder, "model.onnx")
    saved_version = model.ir_version
    model.ir_version = modelio.required_ir_version(model)
    try:
        ir.save(model, path, external_data="model.onnx.data", alignment=4096)
    finally:
        model.ir_version = saved_version
    return path


def _unranked_inputs(model: onnx.ModelProto) -> frozenset[str]:
    """Graph inputs whose type has no shape at all (any rank)."""
    return frozenset(i.name for i in model.graph.input if i.type.HasField("tensor_type") and not i.type.tensor_type.HasField("shape"))


def input_spec(session: ort.InferenceSession) -> dict[str, tuple[type, list]]:
    """name -> (numpy dtype, shape with None/str for dynamic dims; None for an input without a
    shape in the model)."""
    spec = {}
    for arg in session.get_inputs():
        if arg.type not in _ORT_TYPES:
            raise UnsupportedModelError(f"model input {arg.name!r} has type {arg.type}, which onnxq cannot feed")
        # a negative size (Paddle's -1) is a dynamic dimension, as in model_input_spec
        shape = [None if isinstance(d, int) and d < 0 else d for d in arg.shape]
        spec[arg.name] = (_ORT_TYPES[arg.type], None if arg.name in getattr(session, "onnxq_unranked_inputs", ()) else shape)
    return spec


def model_input_spec(model: ir.Model) -> dict[str, tuple[type, list | None]]:
    """The same as :func:`input_spec`, read from the graph without building a session; the shape
    of an input the graph gives none (not even a rank) is None: any shape is accepted."""
    spec = {}
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue  # an initializer exposed as an input: optional to feed
        type_name = f"tensor({_IR_TYPE_NAMES.get(value.dtype, str(value.dtype))})"
        if type_name not in _ORT_TYPES:
            raise UnsupportedModelError(f"model input {value.name!r} has type {value.dtype}, which onnxq cannot feed")
        # Paddle's converter writes a dynamic dimension as -1: any negative size is dynamic too
        shape = [d if isinstance(d, int) and d >= 0 else None for d in value.shape] if value.shape is not None else None
        spec[value.name] = (_ORT_TYPES[type_name], shape)
    return spec


_FP8_IR_TYPES = {ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ, ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ}

_IR_TYPE_NAMES = {
    ir.DataType.FLOAT: "float",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.DOUBLE: "double",
    ir.DataType.INT64: "int64",
    ir.DataType.INT32: "int32",
    ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "uint8",
    ir.DataType.BOOL: "bool",
}


def _fits(actual: tuple[int, ...], wanted: list | None) -> bool:
    """The array shape ``actual`` fits the input's: same rank, equal static sizes (None: any)."""
    if wanted is None:
        return True
    return len(actual) == len(wanted) and all(not isinstance(d, int) or d == a for d, a in zip(wanted, actual))


def validate_feed(feed: Mapping[str, np.ndarray], spec: Mapping[str, tuple[type, list]], where: str) -> dict[str, np.ndarray]:
    """Check a feed dict against the model's inputs; return it with arrays as numpy.

    Names must match exactly; dtypes must match (ints are not silently cast to floats or back);
    static dimensions must agree (an input without a shape takes any).
    """
    missing = [n for n in spec if n not in feed]
    extra = [n for n in feed if n not in spec]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise DataError(
            f"{where}: input names do not match the model ({'; '.join(parts)}); the model's inputs "
            f"are {list(spec)}"
        )
    out = {}
    for name, (dtype, shape) in spec.items():
        arr = np.asarray(feed[name])
        if arr.dtype != dtype:
            raise DataError(
                f"{where}: input {name!r} has dtype {arr.dtype}, the model wants {np.dtype(dtype)}; "
                f"convert it (e.g. arr.astype(np.{np.dtype(dtype).name}))"
            )
        if not _fits(arr.shape, shape):
            raise DataError(
                f"{where}: input {name!r} has shape {list(arr.shape)}, the model wants "
                f"{[d if isinstance(d, int) else '?' for d in shape]}"
            )
        out[name] = arr
    return out


def run(session: ort.InferenceSession, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    try:
        return session.run(list(outputs) if outputs is not None else None, dict(feed))
    except Exception as exc:
        reason = one_line(exc)
        raise UnsupportedModelError(f"ONNX Runtime failed to run the model: {reason}") from None


def run_all(session: ort.InferenceSession, feeds: Iterable[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs for each feed, in order."""
    return [run(session, f) for f in feeds]


def model_path_or_proto(model: str | os.PathLike | ir.Model) -> str | onnx.ModelProto:
    if isinstance(model, ir.Model):
        return modelio.to_proto(model)
    return str(Path(model))
