"""What every zoo model shares: the cached export, the export check, data helpers.

torch and transformers are imported only inside the functions that need them, so the registry can
be listed (and the core used) without them.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import ZooError
from onnxq.export import DEFAULT_OPSET, cosine  # noqa: F401  (cosine: the zoo metrics use it)

from . import _fetch

# Opset of the exported graphs (see onnxq.export).
OPSET = DEFAULT_OPSET


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
    # MODULE:FACTORY returning the torch module, for `onnxq export` and tools/export_and_build.py
    torch_factory: str | None = None
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

    def export_example(self) -> dict[str, np.ndarray]:
        """One real sample (by input name) to trace the export with and verify it on."""
        return {k: v[:1] for k, v in self.eval_data(1).items()}

    def torch_module_and_example(self):
        """(torch module, example feed, dynamic dims): everything ``onnxq.export`` needs."""
        return self.build_module(), self.export_example(), self.dynamic_dims()

    def dynamic_dims(self) -> list:
        """The dynamic axes of the export (:class:`onnxq.export.DynamicDim` list)."""
        return []

    def _export(self, path: Path) -> None:
        torch = require_torch()
        from onnxq import modelio
        from onnxq.export import ExportError, export

        _fetch.log(f"{self.name}: loading the torch model ...")
        start = time.perf_counter()
        module = self.build_module()
        example = self.export_example()
        load_s = time.perf_counter() - start
        t0 = time.perf_counter()
        _fetch.log(f"{self.name}: exporting and verifying against torch ...")
        try:
            # Verified on a real sample, plus one random feed within the dynamic ranges.
            result = export(
                module, example, path, input_names=self.inputs, output_names=self.outputs,
                dynamic=self.dynamic_dims(), opset=OPSET, random_checks=1,
                exporters=("dynamo", "torchscript"),
            )
        except ExportError as exc:
            raise ZooError(
                f"{self.name}: {exc}; check that torch==2.13.0, transformers and onnxscript are the "
                "versions pinned by onnxq[zoo]"
            ) from None
        export_s = time.perf_counter() - t0
        publish_mode(path)
        check = result.verification
        info = {
            "name": self.name,
            "exporter": result.exporter,
            "opset": result.opset,
            "ir_version": modelio.required_ir_version(modelio.load(path)),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "ort_vs_torch_cosine": check.worst_cosine,
            "ort_vs_torch_max_abs_diff": check.max_abs_error,
            "verification": check.to_json(),
            "load_seconds": round(load_s, 2),
            "export_seconds": round(export_s, 2),
            "failed_exporters": result.info["failed_exporters"],
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
            f"{self.name}: exported with {result.exporter} in {export_s:.1f}s "
            f"(ORT vs torch worst cosine {check.worst_cosine:.6f}) -> {path}"
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


def _as_model(model):
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise ZooError(f"{path}: no such model file; pass the path of an .onnx model")
        return path
    return model
