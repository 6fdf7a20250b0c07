"""TensorRT engines from Q/DQ ONNX models, through polygraphy's TensorRT loaders.

The network is strongly typed: precision comes only from the graph's Q/DQ nodes and types (TensorRT
10 deprecated, and 11 removed, the weakly typed INT8/FP16 builder flags), so the builder config
sets no precision flags. ``tensorrt`` and ``polygraphy.backend.trt`` are imported only inside the
functions that build or run an engine; option parsing, optimization profiles and the manifest work
without them.

Engines are written atomically, with a manifest beside them (``<engine>.manifest.json``): the
sha256 of the ONNX file, the TensorRT and CUDA versions, the GPU name and the build options, so a
deployment can tell which model and toolchain an engine came from.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from onnxq import modelio
from onnxq.errors import OnnxqError, one_line

Shape = tuple[int, ...]


class TensorRTUnavailableError(OnnxqError):
    """TensorRT cannot be used here (not installed, or no GPU)."""


# --- options -------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1048576"`` → bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise OnnxqError(f"workspace size {text!r} is not a size; write e.g. 512M or 2G")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def _parse_shape(text: str, where: str) -> Shape:
    parts = text.strip().lower().split("x")
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise OnnxqError(f"{where}: shape {text!r} is not a list of positive dimensions joined by 'x' (e.g. 1x128)")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class InputShapes:
    """min/opt/max shapes of one network input, as an optimization profile holds them."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_shapes(specs: Sequence[str]) -> list[InputShapes]:
    """``--shapes name:min,opt,max`` (each shape written ``1x128``) → one entry per input.

    The three shapes must have the same rank and satisfy min ≤ opt ≤ max in every dimension;
    an input may be named once.
    """
    out: dict[str, InputShapes] = {}
    for spec in specs:
        name, sep, shapes = str(spec).rpartition(":")
        where = f"--shapes {spec!r}"
        if not sep or not name:
            raise OnnxqError(f"{where}: write NAME:MIN,OPT,MAX, e.g. input_ids:1x16,1x128,8x128")
        parts = shapes.split(",")
        if len(parts) != 3:
            raise OnnxqError(f"{where}: give three shapes MIN,OPT,MAX separated by commas, e.g. input_ids:1x16,1x128,8x128")
        lo, opt, hi = (_parse_shape(p, where) for p in parts)
        if not len(lo) == len(opt) == len(hi):
            raise OnnxqError(f"{where}: MIN, OPT and MAX have different ranks")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise OnnxqError(f"{where}: need MIN <= OPT <= MAX in every dimension")
        if name in out:
            raise OnnxqError(f"{where}: input {name!r} is given twice")
        out[name] = InputShapes(name, lo, opt, hi)
    return list(out.values())


def check_shapes_against_model(shapes: Sequence[InputShapes], model_inputs: Mapping[str, list]) -> None:
    """Every named input exists, ranks agree, static dims are respected, and every dynamic input has a range."""
    for s in shapes:
        if s.name not in model_inputs:
            raise OnnxqError(f"--shapes names {s.name!r}, which is not a model input; the inputs are {list(model_inputs)}")
        dims = model_inputs[s.name]
        if dims is None:  # no shape in the model: any rank
            continue
        if len(dims) != len(s.min):
            raise OnnxqError(f"--shapes {s.name}: rank {len(s.min)}, the model input has rank {len(dims)}")
        for i, d in enumerate(dims):
            if isinstance(d, int) and not (s.min[i] == s.opt[i] == s.max[i] == d):
                raise OnnxqError(f"--shapes {s.name}: dimension {i} is fixed to {d} in the model")
    named = {s.name for s in shapes}
    dynamic = [n for n, dims in model_inputs.items() if (dims is None or any(not isinstance(d, int) for d in dims)) and n not in named]
    if dynamic:
        raise OnnxqError(
            f"inputs {dynamic} have dynamic dimensions; give their range with --shapes NAME:MIN,OPT,MAX "
            "(e.g. --shapes input_ids:1x16,1x128,8x128)"
        )


def make_profile(shapes: Sequence[InputShapes]):
    """A polygraphy ``Profile`` (one optimization profile) for the given input ranges, or None."""
    if not shapes:
        return None
    from polygraphy.backend.trt import Profile  # needs no tensorrt until the build

    profile = Profile()
    for s in shapes:
        profile.add(s.name, min=s.min, opt=s.opt, max=s.max)
    return profile


# --- environment -----------------------------------------------------------------------------


def _cuda_driver() -> tuple[str | None, str | None, str]:
    """(GPU 0 name, CUDA driver version, reason when there is none) via the CUDA driver API."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, None, "no CUDA driver (libcuda.so.1) is installed, so there is no usable GPU"
    if cuda.cuInit(0) != 0:
        return None, None, "the CUDA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None, None, "the CUDA driver reports no GPU"
    version = ctypes.c_int(0)
    cuda.cuDriverGetVersion(ctypes.byref(version))
    dev = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    v = version.value
    return name.value.decode(errors="replace"), f"{v // 1000}.{(v % 1000) // 10}", ""


def unavailable_reason() -> str | None:
    """Why TensorRT engines cannot be built or run here, or None when they can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed (install TensorRT for your CUDA version on a machine with an NVIDIA GPU)"
    gpu, _, reason = _cuda_driver()
    if gpu is None:
        return reason
    return None


def require_tensorrt(what: str) -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise TensorRTUnavailableError(f"cannot {what}: {reason}")


def environment() -> dict:
    """TensorRT, CUDA and GPU identification for manifests and reports (None where absent)."""
    gpu, cuda_version, _ = _cuda_driver()
    trt_version = None
    if importlib.util.find_spec("tensorrt") is not None:
        import tensorrt as trt

        trt_version = trt.__version__
    return {"tensorrt": trt_version, "cuda_driver": cuda_version, "gpu": gpu}


# --- manifest --------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".manifest.json")


def make_manifest(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, options: Mapping, env: Mapping) -> dict:
    """What an engine was built from and with. ``env`` comes from :func:`environment`."""
    from onnxq import __version__

    onnx_path = Path(onnx_path)
    data = onnx_path.with_name(onnx_path.name + ".data")
    manifest = {
        "engine": Path(engine_path).name,
        "onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
        "tensorrt_version": env.get("tensorrt"),
        "cuda_version": env.get("cuda_driver"),
        "gpu": env.get("gpu"),
        "options": dict(options),
        "onnxq_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if data.exists():  # external weights are part of what the engine was built from
        manifest["onnx"]["data_sha256"] = sha256_file(data)
    return manifest


# --- build and run ---------------------------------------------------------------------------


@dataclass
class BuildResult:
    engine: Path
    manifest: Path


def build_engine(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    shapes: Sequence[str] | Sequence[InputShapes] = (),
    workspace: str | int | None = None,
    timing_cache: str | os.PathLike | None = None,
) -> BuildResult:
    """Build a strongly typed TensorRT engine from a Q/DQ ONNX model; write it and its manifest."""
    from onnxq.runtime.ort import model_input_spec

    model = Path(model)
    float_model = modelio.load(model)  # a clear error for a missing or broken file, before TensorRT
    spec = model_input_spec(float_model)
    del float_model
    ranges = parse_shapes(shapes) if shapes and isinstance(next(iter(shapes)), str) else list(shapes)
    check_shapes_against_model(ranges, {n: dims for n, (_, dims) in spec.items()})
    workspace_bytes = parse_size(workspace) if isinstance(workspace, str) else workspace
    output = Path(output)
    man_path = manifest_path(output)
    modelio.check_outputs([output, man_path], [model])
    require_tensorrt("build a TensorRT engine")

    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, SaveEngine

    profile = make_profile(ranges)
    config = CreateConfig(
        profiles=[profile] if profile is not None else None,
        load_timing_cache=str(timing_cache) if timing_cache and Path(timing_cache).exists() else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes} if workspace_bytes else None,
    )
    network = NetworkFromOnnxPath(str(model), strongly_typed=True)
    engine = EngineFromNetwork(network, config=config, save_timing_cache=str(timing_cache) if timing_cache else None)
    options = {
        "strongly_typed": True,
        "shapes": {s.name: s.to_json() for s in ranges},
        "workspace_bytes": workspace_bytes,
        "timing_cache": str(timing_cache) if timing_cache else None,
    }
    with modelio.transaction([output, man_path], [model]):  # the engine and its manifest, or neither
        try:
            with modelio.atomic_path(output) as tmp:
                SaveEngine(engine, path=str(tmp))()
        except OnnxqError:
            raise
        except Exception as exc:  # polygraphy reports parser/builder failures as PolygraphyException
            reason = one_line(exc)
            raise OnnxqError(f"TensorRT could not build an engine from {model}: {reason}") from None
        manifest = make_manifest(model, output, options, environment())
        with modelio.atomic_path(man_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1))
    return BuildResult(output, man_path)


def engine_runner(engine: str | os.PathLike, name: str | None = None):
    """A polygraphy ``TrtRunner`` for a serialized engine file."""
    engine = Path(engine)
    if not engine.is_file():
        raise OnnxqError(f"{engine}: no such engine file; build one with onnxq build MODEL.onnx -o {engine}")
    require_tensorrt(f"run the TensorRT engine {engine}")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name=name or engine.name)
