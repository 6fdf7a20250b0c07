"""Load and save ONNX models through onnx_ir, atomically and with external data when large.

Inputs are never modified: loading reads the file, and saving refuses to write over the input.
Outputs are first written beside their destination and then renamed into place, so an interrupted
run leaves no partial file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxq.errors import ModelLoadError, OutputPathError

# Protobuf cannot serialize a message of 2 GiB or more; above this, weights go to a side file.
EXTERNAL_DATA_THRESHOLD = 1 << 30

# ONNX Runtime refuses models whose IR version is newer than it knows; onnx's newest helpers
# write such versions by default. The IR version a model needs follows from its opsets.
_IR_FOR_OPSET = {opset: ir_v for _, ir_v, opset, *_ in onnx.helper.VERSION_TABLE}


def required_ir_version(model: ir.Model) -> int:
    """The smallest IR version that can carry the model's default-domain opset."""
    opset = model.opset_imports.get("", 1)
    known = [o for o in _IR_FOR_OPSET if o >= opset]
    if not known:
        return max(_IR_FOR_OPSET.values())
    return _IR_FOR_OPSET[min(known)]


def load(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX model, with a clear error for a missing, truncated or non-ONNX file."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file; pass the path of an .onnx model")
    if path.is_dir():
        raise ModelLoadError(f"{path} is a directory; pass the path of an .onnx model file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path} is empty; re-export or re-copy the model")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "check that the file is complete and really is ONNX"
        ) from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise ModelLoadError(f"{path} holds no graph; it is probably not an ONNX model")
    try:
        # External weights are read lazily; touch them now so a missing side file fails here.
        for init in model.graph.initializers.values():
            if init.const_value is not None and isinstance(init.const_value, ir.ExternalTensor):
                init.const_value.numpy()
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: its external weight data cannot be read ({exc}); keep the data file "
            "next to the model"
        ) from None
    return model


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse to write an output over one of the inputs, or into a missing directory."""
    out = Path(output)
    for given in inputs:
        if given is None:
            continue
        src = Path(given)
        if src.exists() and out.exists() and os.path.samefile(out, src):
            raise OutputPathError(
                f"output {out} is the input model; choose another output path (inputs are never "
                "overwritten)"
            )
        if out.resolve() == src.resolve():
            raise OutputPathError(
                f"output {out} is the input model; choose another output path (inputs are never "
                "overwritten)"
            )
    if out.exists() and out.is_dir():
        raise OutputPathError(f"output {out} is a directory; give a file path ending in .onnx")
    if not out.parent.exists():
        raise OutputPathError(f"output directory {out.parent} does not exist; create it first")
    return out


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only on success."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; outputs are ordinary artifacts, so honour the umask instead.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically, with ORT-compatible IR version.

    Models whose weights exceed :data:`EXTERNAL_DATA_THRESHOLD` get their initializers in
    ``<name>.data`` beside the model (also written atomically).
    """
    path = Path(path)
    model.ir_version = required_ir_version(model)
    weight_bytes = sum(
        init.const_value.nbytes
        for init in model.graph.initializers.values()
        if init.const_value is not None
    )
    if weight_bytes < EXTERNAL_DATA_THRESHOLD:
        with atomic_path(path) as tmp:
            ir.save(model, tmp)
        return path
    data_name = path.name + ".data"
    data_dest = path.parent / data_name
    # ir.save writes the side file relative to the model path; write both under temp names.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmpdir:
        tmp_model = Path(tmpdir) / path.name
        ir.save(model, tmp_model, external_data=data_name)
        os.replace(Path(tmpdir) / data_name, data_dest)
        os.replace(tmp_model, path)
    return path


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """A ModelProto with ORT-compatible IR version (for in-memory sessions and checks)."""
    proto = ir.to_proto(model)
    proto.ir_version = required_ir_version(model)
    return proto
