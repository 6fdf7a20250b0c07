"""Raise the model's default-domain opset to the minimum that quantization needs.

Rule: if the model imports the default ONNX domain (``""`` or its alias ``"ai.onnx"``) at a
version below ``min_opset``, convert the whole model to ``target_opset`` (``min_opset`` unless
given). A model already at ``min_opset`` or newer is left exactly as it is: the pass never
downgrades and never upgrades a model that is new enough.

Why 13: per-channel ``QuantizeLinear``/``DequantizeLinear`` (the ``axis`` attribute) arrive in
opset 13. FP8 Q/DQ (``float8e4m3fn`` zero points) need opset 19; FP8 work asks for
``UpgradeOpsetPass(min_opset=19)``.

Built on :class:`onnxscript.version_converter.ConvertVersionPass`. Its own converter only covers
opsets 18 and newer, so the pass runs with ``fallback=True``: older models go through
``onnx.version_converter`` (the C API), with large initializers stripped from the proto while it
runs, so models over 2 GB convert too. That converter replaces ``model.graph`` with a new graph
object (values held from before the pass are stale) and may emit ``Constant`` nodes (e.g. the
``axes`` input of ``Unsqueeze``/``Squeeze``/``ReduceSum`` at 13): run
:class:`~onnxq.passes.lift_constants.LiftConstantsPass` after it. Model-local functions are
inlined first (the converter works on inlined models only).

The library pass reports a failed conversion only as a log warning and leaves the model as it
was; this pass checks the resulting opset and raises :class:`~onnxq.errors.UnsupportedModelError`
instead, with the converter's reason.
"""

from __future__ import annotations

__all__ = ["UpgradeOpsetPass", "default_opset", "require_opset"]

import contextlib
import logging
from collections.abc import Iterator

import onnx
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

from onnxq.errors import UnsupportedModelError

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONVERTER_LOGGER = "onnxscript.version_converter"


def default_opset(model: ir.Model) -> int | None:
    """The version of the default ONNX domain the model imports, or None if it imports none."""
    for domain in _DEFAULT_DOMAINS:
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


class _ConverterLog(logging.Filter):
    """Collects the version converter's warnings instead of printing them.

    The library logs "not supported by the onnxscript version converter, fallback enabled" for
    every model below opset 18 (expected here, not worth a warning), and reports a failed
    conversion only as a logged exception, which this pass turns into an error.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = str(exc).strip()
            self.failures.append(f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}")
        else:
            logger.debug("version converter: %s", record.getMessage())
        return False


@contextlib.contextmanager
def _capture_converter_log() -> Iterator[_ConverterLog]:
    capture = _ConverterLog()
    conv_logger = logging.getLogger(_CONVERTER_LOGGER)
    conv_logger.addFilter(capture)
    try:
        yield capture
    finally:
        conv_logger.removeFilter(capture)


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Upgrade a model whose default-domain opset is below ``min_opset`` to ``target_opset``.

    Attributes:
        min_opset: Models importing the default domain below this version are converted.
        target_opset: The version converted models end at; defaults to ``min_opset``. Must not be
            below ``min_opset``.

    A model that imports no default-domain opset at all (it uses no standard ONNX op) gets an
    import of ``target_opset`` added, so that later passes can insert standard ops.
    """

    def __init__(self, min_opset: int = 13, target_opset: int | None = None) -> None:
        super().__init__()
        target = min_opset if target_opset is None else target_opset
        if target < min_opset:
            raise ValueError(f"target_opset ({target}) must not be below min_opset ({min_opset})")
        newest = onnx.defs.onnx_opset_version()
        if target > newest:
            raise ValueError(
                f"target_opset {target} is newer than the installed onnx knows ({newest})"
            )
        self.min_opset = min_opset
        self.target_opset = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = default_opset(model)
        if current is None:
            nodes = ir.traversal.RecursiveGraphIterator(model.graph)
            if any(node.domain in _DEFAULT_DOMAINS for node in nodes):
                raise UnsupportedModelError(
                    "the model uses standard ONNX ops but imports no ONNX opset; re-export it "
                    f"(e.g. torch.onnx.export(..., opset_version={self.target_opset}))"
                )
            model.opset_imports[""] = self.target_opset
            return ir.passes.PassResult(model, modified=True)
        if current >= self.min_opset:
            return ir.passes.PassResult(model, modified=False)

        with _capture_converter_log() as log:
            try:
                ConvertVersionPass(target_version=self.target_opset, fallback=True)(model)
            except Exception as exc:  # VersionConverterError, onnx's ConvertError, ...
                log.failures.append(f"{type(exc).__name__}: {exc}")
        reached = default_opset(model)
        if reached != self.target_opset:
            reason = log.failures[-1] if log.failures else "no reason given"
            raise UnsupportedModelError(
                f"cannot convert the model from opset {current} to {self.target_opset} "
                f"({reason}); re-export it with opset_version={self.target_opset} or newer"
            )
        logger.info("Converted the model from opset %d to %d", current, self.target_opset)
        return ir.passes.PassResult(model, modified=True)


def require_opset(model: ir.Model, min_opset: int) -> bool:
    """Raise the model's opset to at least ``min_opset`` (for ops a later pass inserts, e.g. FP8
    or FP16-scaled Q/DQ at 19), lifting the constants a converter may emit. True if changed."""
    from onnxq.passes.lift_constants import LiftConstantsPass

    modified = UpgradeOpsetPass(min_opset=min_opset)(model).modified
    if modified:
        LiftConstantsPass()(model)
    return modified


class RequireOpsetPass(ir.passes.InPlacePass):
    """Raise the opset to at least ``min_opset`` (:func:`require_opset`): the plan's ``min_opset``,
    so that a model prepared for FP8 keeps the opset its measurements were made at."""

    def __init__(self, min_opset: int):
        super().__init__()
        self.min_opset = min_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, require_opset(model, self.min_opset))
