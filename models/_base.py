"""What every zoo model shares: the cached export, the export check, data helpers.

torch and transformers are imported only inside the functions that need them, so the registry can
be listed (and the core used) without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import ZooError

from . import _fetch

# Opset of the exported graphs. 18 is what torch's dynamo exporter (torchlib) is written for; the
# TorchScript fallback uses it too so both exporters give the same ops (ReduceMean with axes input).
OPSET = 18


def require_torch():
    """Import torch with a ZooError naming the extra to install."""
    try:
        import torch
    except ImportError as exc:
        raise ZooError(
            f"the model zoo needs torch ({exc}); install the zoo extra: "
            "pip install 'onnxq[zoo]' (torch==2.13.0 CPU wheel)"
        ) from None
    return torch


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    if den == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / den)


def take(arrays: Mapping[str, np.ndarray], n: int | None, default: int, what: str) -> dict[str, np.ndarray]:
    """The first ``n`` samples (``default`` when None) of a dict of sample-major arrays."""
    available = len(next(iter(arrays.values())))
    n = default if n is None else n
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ZooError(f"{what}: n must be a positive integer, got {n!r}")
    if n > available:
        raise ZooError(f"{what}: asked for {n} samples but only {available} are available; pass n <= {available}")
    return {k: np.array(v[:n], copy=True, order="C") for k, v in arrays.items()}  # callers may mutate


class ZooModel:
    """A zoo entry: a real model, exported once to ONNX, with its data and task metric.

    Subclasses set ``name``, ``description``, ``inputs``, ``outputs`` and implement
    :meth:`build_module` (a torch module whose forward takes the inputs, in order, and returns the
    single output), :meth:`export_example`, :meth:`calib_data`, :meth:`eval_data`, :meth:`evaluate`.
    """

    name: str = ""
    description: str = ""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    default_calib: int = 1
    default_eval: int = 1

    def __repr__(self) -> str:
        return f"<ZooModel {self.name}: {self.description}>"

    # ----------------------------------------------------------------------------- export
    def model_dir(self) -> Path:
        path = _fetch.cache_dir() / "models" / self.name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def onnx_path(self) -> Path:
        """The FP32 ONNX model, exported on first use and cached at ``<cache>/models/<name>/``."""
        path = self.model_dir() / "model.onnx"
        if not path.exists():
            self._export(path)
        return path

    def export_info(self) -> dict[str, Any]:
        """What the export note beside the model says (exporter, opset, versions, check)."""
        path = self.onnx_path().with_name("export.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def build_module(self):  # pragma: no cover - abstract
        """The torch module to export (eval mode, float32)."""
        raise NotImplementedError

    def export_example(self) -> tuple[tuple, dict | None, dict | None]:  # pragma: no cover - abstract
        """(example args, dynamo dynamic_shapes, torchscript dynamic_axes)."""
        raise NotImplementedError

    def check_feed(self) -> dict[str, np.ndarray]:
        """One real sample used to check ORT against torch after export."""
        return {k: v[:1] for k, v in self.eval_data(1).items()}

    def _export(self, path: Path) -> None:
        torch = require_torch()
        from onnxq import modelio

        _fetch.log(f"{self.name}: loading the torch model ...")
        start = time.perf_counter()
        module = self.build_module()
        feed = self.check_feed()
        with torch.no_grad():
            expected = module(*[torch.from_numpy(np.ascontiguousarray(feed[k])) for k in self.inputs])
        expected = expected.detach().numpy()
        args, dynamic_shapes, dynamic_axes = self.export_example()
        load_s = time.perf_counter() - start

        errors: dict[str, str] = {}
        for exporter in ("dynamo", "torchscript"):
            _fetch.log(f"{self.name}: exporting with the {exporter} exporter ...")
            t0 = time.perf_counter()
            try:
                with _quiet_exporter():
                    model = _torch_export(
                        module, args, exporter, self.inputs, self.outputs, dynamic_shapes, dynamic_axes
                    )
                export_s = time.perf_counter() - t0
                got, cos = _ort_check(model, feed, expected)
            except Exception as exc:  # the exporters raise all sorts of things
                msg = str(exc).strip().splitlines()
                errors[exporter] = f"{type(exc).__name__}: {msg[0] if msg else ''}"[:500]
                _fetch.log(f"{self.name}: {exporter} export failed ({errors[exporter]})")
                continue
            modelio.save(model, path)
            publish_mode(path)
            info = {
                "name": self.name,
                "exporter": exporter,
                "opset": model.opset_imports.get("", None),
                "ir_version": modelio.required_ir_version(model),
                "inputs": list(self.inputs),
                "outputs": list(self.outputs),
                "ort_vs_torch_cosine": cos,
                "ort_vs_torch_max_abs_diff": float(np.max(np.abs(got - expected))),
                "load_seconds": round(load_s, 2),
                "export_seconds": round(export_s, 2),
                "failed_exporters": errors,
                "torch": torch.__version__,
                "python": platform.python_version(),
            }
            try:
                import transformers

                info["transformers"] = transformers.__version__
            except ImportError:
                pass
            with modelio.atomic_path(path.with_name("export.json")) as tmp:
                tmp.write_text(json.dumps(info, indent=2) + "\n")
            publish_mode(path.with_name("export.json"))
            _fetch.log(
                f"{self.name}: exported with {exporter} in {export_s:.1f}s (ORT vs torch cosine {cos:.6f}) -> {path}"
            )
            return
        raise ZooError(
            f"{self.name}: export failed with both exporters ({'; '.join(f'{k}: {v}' for k, v in errors.items())}); "
            "check that torch==2.13.0, transformers and onnxscript are the versions pinned by onnxq[zoo]"
        )

    # ----------------------------------------------------------------------------- data / metric
    def calib_data(self, n: int | None = None) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def eval_data(self, n: int | None = None) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def evaluate(self, candidate, reference=None, n: int | None = None) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def _sessions(self, candidate, reference):
        """ORT sessions for the candidate and the reference (the cached FP32 export by default);
        either may already be a session (a caller evaluating many candidates keeps one reference)."""
        from onnxq.runtime.ort import create_session

        if reference is None:
            reference = self.onnx_path()
        return tuple(m if hasattr(m, "run") else create_session(_as_model(m)) for m in (candidate, reference))

    def _run(self, session, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        from onnxq.runtime.ort import run

        return run(session, feed)[0]


def publish_mode(path: Path) -> None:
    """rw-r--r-- for files written through temp files (mkstemp creates them rw-------)."""
    try:
        os.chmod(path, 0o644)
    except OSError:
        pass


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporters' warnings (torchvision ops missing, tracer notes); errors still raise."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "torch.fx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _as_model(model):
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise ZooError(f"{path}: no such model file; pass the path of an .onnx model")
        return path
    return model


def _torch_export(module, args, exporter, input_names, output_names, dynamic_shapes, dynamic_axes):
    """Export with torch.onnx.export; return an ``onnx_ir.Model``."""
    import tempfile

    import onnx_ir as ir
    import torch

    if exporter == "dynamo":
        prog = torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET, input_names=list(input_names),
            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
        model = prog.model
        # Named here, not through output_names: the exporter names values after FX nodes, so an
        # output called "embedding" would collide with the aten.embedding node's value.
        _rename_outputs(model, output_names)
    else:
        with tempfile.TemporaryDirectory(prefix="onnxq-export-") as tmp:
            out = os.path.join(tmp, "model.onnx")
            torch.onnx.export(
                module, args, out, dynamo=False, opset_version=OPSET, input_names=list(input_names),
                output_names=list(output_names), dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
            model = ir.load(out)
            # Pull external weights (if any) into memory before the folder goes away.
            for init in model.graph.initializers.values():
                if isinstance(init.const_value, ir.ExternalTensor):
                    init.const_value = ir.Tensor(init.const_value.numpy(), name=init.name)
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ZooError(
            f"exported graph has inputs {got_in} / outputs {got_out}, "
            f"wanted {list(input_names)} / {list(output_names)}"
        )
    return model


def _rename_outputs(model, names) -> None:
    import onnx_ir as ir

    graph = model.graph
    if len(graph.outputs) != len(names):
        raise ZooError(f"exported graph has {len(graph.outputs)} outputs, wanted {len(names)} ({list(names)})")
    wanted = set(names)
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        values.extend(node.outputs)
    outputs = set(id(v) for v in graph.outputs)
    taken = {v.name for v in values}
    for value in values:
        if id(value) not in outputs and value.name in wanted:
            k = 1
            while f"{value.name}_{k}" in taken:
                k += 1
            value.name = f"{value.name}_{k}"
            taken.add(value.name)
    for value, name in zip(graph.outputs, names):
        value.name = name


def _ort_check(model, feed, expected):
    from onnxq.runtime.ort import create_session, run

    session = create_session(model)
    got = run(session, feed)[0]
    if got.shape != expected.shape:
        raise ZooError(f"ORT output shape {got.shape} differs from torch's {expected.shape}")
    cos = cosine(got, expected)
    if not cos > 0.9999:
        raise ZooError(f"ORT output differs from torch's (cosine {cos:.6f} <= 0.9999)")
    return got, cos
