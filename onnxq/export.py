"""PyTorch → ONNX: one export and one verification, used by ``onnxq export`` and the model zoo.

Export runs ``torch.onnx.export(dynamo=True)`` (the onnxscript-based exporter); the zoo may fall
back to the TorchScript exporter. Verification runs the exported graph in ONNX Runtime against the
torch module on the example inputs and on fresh random inputs whose dynamic dimensions are drawn
within their declared ranges, and reports per output the max abs error and the cosine. Models over
the protobuf limit are saved with external data (:func:`onnxq.modelio.save`).

torch is imported inside the functions: the core package does not depend on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxq.errors import OnnxqError
from onnxq.metrics import cosine

# Opset of the exported graphs. 18 is what torch's dynamo exporter (torchlib) is written for; the
# TorchScript fallback uses it too so both exporters give the same ops (ReduceMean with axes input).
DEFAULT_OPSET = 18
# ORT vs torch: an export passes when every output's cosine is at least MIN_COSINE and its max abs
# error at most ATOL * max(1, max |torch output|) (float32 reductions reorder between the two).
DEFAULT_MIN_COSINE = 0.9999
DEFAULT_ATOL = 1e-3

_DTYPES = {
    "float32": np.float32, "float": np.float32, "float16": np.float16, "float64": np.float64,
    "int64": np.int64, "int32": np.int32, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class ExportError(OnnxqError):
    """The module cannot be loaded, exported, or its export does not match torch."""


@dataclass
class InputSpec:
    """One model input for the CLI: a name, a shape, a dtype, and the value range of random data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    low: float | None = None
    high: float | None = None

    def example(self, rng: np.random.Generator, shape: Sequence[int] | None = None) -> np.ndarray:
        return random_like_spec(rng, tuple(shape or self.shape), _DTYPES[self.dtype], self.low, self.high)


@dataclass
class DynamicDim:
    """Axis ``axis`` of input ``input`` is the dynamic dimension ``name`` in ``[min, max]``."""

    input: str
    axis: int
    name: str
    min: int | None = None
    max: int | None = None


_SPEC_HELP = "NAME:SHAPE:DTYPE[:LOW..HIGH], e.g. x:1x3x224x224:float32 or ids:1x128:int64:0..30522"


def parse_input(text: str) -> InputSpec:
    """``NAME:SHAPE:DTYPE[:LOW..HIGH]`` → :class:`InputSpec` (ExportError saying the form)."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0]:
        raise ExportError(f"input spec {text!r} does not parse; write {_SPEC_HELP}")
    name, shape_text, dtype = parts[:3]
    if not re.fullmatch(r"\d+(x\d+)*|", shape_text):
        raise ExportError(f"input spec {text!r}: shape {shape_text!r} is not dims joined by 'x' (e.g. 1x3x224x224); write {_SPEC_HELP}")
    shape = tuple(int(d) for d in shape_text.split("x")) if shape_text else ()
    if any(d < 1 for d in shape):
        raise ExportError(f"input spec {text!r}: every dimension must be >= 1")
    if dtype not in _DTYPES:
        raise ExportError(f"input spec {text!r}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    low = high = None
    if len(parts) == 4:
        m = re.fullmatch(r"(-?[\d.e+-]+)\.\.(-?[\d.e+-]+)", parts[3])
        try:
            low, high = float(m.group(1)), float(m.group(2))
        except (AttributeError, ValueError):
            raise ExportError(f"input spec {text!r}: value range {parts[3]!r} is not LOW..HIGH (e.g. 0..30522)") from None
        if not low < high:
            raise ExportError(f"input spec {text!r}: value range needs LOW < HIGH")
    return InputSpec(name, shape, dtype, low, high)


def parse_dynamic(text: str) -> DynamicDim:
    """``NAME:AXIS:DIM[=MIN..MAX]`` → :class:`DynamicDim`, e.g. ``input_ids:1:seq=2..512``."""
    m = re.fullmatch(r"([^:]+):(\d+):([A-Za-z_]\w*)(?:=(\d+)\.\.(\d+))?", text)
    if m is None:
        raise ExportError(f"dynamic spec {text!r} does not parse; write NAME:AXIS:DIM[=MIN..MAX], e.g. input_ids:1:seq=2..512")
    lo = int(m.group(4)) if m.group(4) else None
    hi = int(m.group(5)) if m.group(5) else None
    if lo is not None and not 1 <= lo <= hi:
        raise ExportError(f"dynamic spec {text!r}: need 1 <= MIN <= MAX")
    return DynamicDim(m.group(1), int(m.group(2)), m.group(3), lo, hi)


def random_like_spec(rng, shape, dtype, low=None, high=None) -> np.ndarray:
    """Random data: floats N(0, 1) (or uniform in [low, high)), ints uniform in [low, high) (default [0, 100)), bools fair."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        lo, hi = int(low if low is not None else 0), int(high if high is not None else 100)
        return rng.integers(lo, hi, shape).astype(dtype)
    if low is not None:
        return rng.uniform(low, high, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def load_factory(spec: str):
    """``module:function`` or ``path/to/file.py:function`` → the callable (ExportError otherwise)."""
    from onnxq.data import _import_callable

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ExportError(f"factory {spec!r} is not MODULE:FACTORY (e.g. onnxq.zoo.minilm:torch_module or models.py:build)")
    return _import_callable(spec, "factory", ExportError)


def build_module(spec: str):
    """Call the factory named by ``spec``; its exceptions become one ExportError line."""
    factory = load_factory(spec)
    try:
        module = factory()
    except OnnxqError:
        raise
    except Exception as exc:
        raise ExportError(f"factory {spec!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    torch = require_torch()
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def require_torch():
    try:
        import torch
    except ImportError as exc:
        raise ExportError(f"exporting from PyTorch needs torch ({exc}); install the zoo extra: pip install 'onnxq[zoo]'") from None
    return torch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ------------------------------------------------------------------------------------ export


@contextlib.contextmanager
def quiet_exporter():
    """Hide the exporters' warnings and log chatter (tracer notes, missing optional ops); errors still raise."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "torch.fx", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def torch_export(module, args: tuple, *, input_names: Sequence[str], output_names: Sequence[str] | None = None,
                 dynamic_shapes=None, dynamic_axes=None, opset: int = DEFAULT_OPSET, exporter: str = "dynamo"):
    """Export ``module`` called on ``args`` with torch.onnx.export; return an ``onnx_ir.Model``.

    ``dynamic_shapes`` (torch.export form, by input name) drives the dynamo exporter,
    ``dynamic_axes`` the TorchScript one. Output names are set on the graph afterwards (the dynamo
    exporter names values after FX nodes, so an output called "embedding" could collide with the
    aten.embedding node's value).
    """
    import onnx_ir as ir
    import torch

    if exporter == "dynamo":
        prog = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=list(input_names),
            dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
        )
        model = prog.model
        if output_names:
            _rename_outputs(model, output_names)
    elif exporter == "torchscript":
        with tempfile.TemporaryDirectory(prefix="onnxq-export-") as tmp:
            out = os.path.join(tmp, "model.onnx")
            torch.onnx.export(
                module, args, out, dynamo=False, opset_version=opset, input_names=list(input_names),
                output_names=list(output_names or []) or None, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )
            model = ir.load(out)
            # Pull external weights (if any) into memory before the folder goes away.
            for init in model.graph.initializers.values():
                if isinstance(init.const_value, ir.ExternalTensor):
                    init.const_value = ir.Tensor(init.const_value.numpy(), name=init.name)
    else:
        raise ExportError(f"unknown exporter {exporter!r}; use dynamo or torchscript")
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != list(input_names) or (output_names and got_out != list(output_names)):
        raise ExportError(
            f"exported graph has inputs {got_in} / outputs {got_out}, wanted {list(input_names)} / {list(output_names or got_out)}"
        )
    return model


def _rename_outputs(model, names) -> None:
    import onnx_ir as ir

    graph = model.graph
    if len(graph.outputs) != len(names):
        raise ExportError(f"exported graph has {len(graph.outputs)} outputs, wanted {len(names)} ({list(names)})")
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


# ------------------------------------------------------------------------------------ verify


@dataclass
class OutputCheck:
    output: str
    feed: str  # "example" or "random #k (shapes ...)"
    max_abs_error: float
    cosine: float
    max_abs_reference: float
    passed: bool


@dataclass
class Verification:
    checks: list[OutputCheck] = field(default_factory=list)
    min_cosine: float = DEFAULT_MIN_COSINE
    atol: float = DEFAULT_ATOL

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def worst_cosine(self) -> float:
        return min((c.cosine for c in self.checks), default=1.0)

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    def to_json(self) -> dict:
        return {
            "passed": self.passed, "min_cosine": self.min_cosine, "atol": self.atol,
            "worst_cosine": self.worst_cosine, "max_abs_error": self.max_abs_error,
            "checks": [asdict(c) for c in self.checks],
        }

    def failure(self) -> str:
        bad = [c for c in self.checks if not c.passed]
        c = min(bad, key=lambda c: c.cosine) if bad else None
        if c is None:
            return ""
        return (f"output {c.output!r} on the {c.feed} inputs: max abs error {c.max_abs_error:.3g} "
                f"(allowed {self.atol:g} x max(1, {c.max_abs_reference:.3g})), cosine {c.cosine:.6f} "
                f"(needed {self.min_cosine})")


def random_feeds(example: Mapping[str, np.ndarray], dynamic: Sequence[DynamicDim], count: int,
                 seed: int = 0, ranges: Mapping[str, tuple[float, float]] | None = None) -> list[dict[str, np.ndarray]]:
    """``count`` fresh random feeds shaped like ``example``, dynamic dims drawn within their ranges.

    A dynamic dimension takes one size per feed for every input that shares its name, drawn in
    ``[min, min(max, 2 x example size)]`` (min defaults to 1; at least 2 when the example's size is
    1, so that a size the exporter fixed to 1 is caught).
    Integer inputs draw values within the example's own ``[min, max]`` (token ids stay in the
    vocabulary, masks stay 0/1) unless ``ranges`` gives one; float inputs are N(mean, std) of the example.
    """
    rng = np.random.default_rng(seed)
    ranges = dict(ranges or {})
    feeds = []
    for k in range(count):
        sizes: dict[str, int] = {}
        for d in dynamic:
            if d.name in sizes:
                continue
            here = example[d.input].shape[d.axis]
            lo = d.min if d.min is not None else 1
            hi = min(d.max if d.max is not None else 2 * here, max(2 * here, lo))
            if here == 1 and hi >= 2:  # an example of 1: check that other sizes run
                lo = max(lo, 2)
            sizes[d.name] = int(rng.integers(lo, hi + 1))
        feed = {}
        for name, arr in example.items():
            shape = list(arr.shape)
            for d in dynamic:
                if d.input == name:
                    shape[d.axis] = sizes[d.name]
            if name in ranges:
                lo, hi = ranges[name]
                feed[name] = random_like_spec(rng, shape, arr.dtype, lo, hi)
            elif arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.integer):
                lo, hi = (int(arr.min()), int(arr.max()) + 1) if arr.size else (0, 2)
                feed[name] = random_like_spec(rng, shape, arr.dtype, lo, hi)
            else:
                mean, std = (float(arr.mean()), float(arr.std()) or 1.0) if arr.size else (0.0, 1.0)
                feed[name] = (rng.standard_normal(shape) * std + mean).astype(arr.dtype)
        feeds.append(feed)
    return feeds


def verify(model, module, feeds: Sequence[tuple[str, Mapping[str, np.ndarray]]], *,
           min_cosine: float = DEFAULT_MIN_COSINE, atol: float = DEFAULT_ATOL) -> Verification:
    """Run the ONNX ``model`` (ir.Model, proto or path) in ORT and ``module`` in torch on each labelled feed."""
    torch = require_torch()
    from onnxq.runtime.ort import create_session, run

    session = create_session(model)
    names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    result = Verification(min_cosine=min_cosine, atol=atol)
    for label, feed in feeds:
        with torch.no_grad():
            expected = module(*[torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names])
        expected = _flatten_outputs(expected)
        got = run(session, {n: feed[n] for n in names})
        if len(expected) != len(got):
            raise ExportError(f"torch returned {len(expected)} outputs, the ONNX model {len(got)}")
        for name, g, e in zip(out_names, got, expected):
            shapes = " ".join(f"{n}{list(feed[n].shape)}" for n in names)
            if g.shape != e.shape:
                raise ExportError(f"output {name!r} on the {label} inputs ({shapes}): ORT shape {list(g.shape)} differs from torch's {list(e.shape)}")
            err = float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))) if g.size else 0.0
            ref = float(np.max(np.abs(e.astype(np.float64)))) if e.size else 0.0
            cos = cosine(g, e)
            ok = bool(cos >= min_cosine and err <= atol * max(1.0, ref)) and math.isfinite(err)
            result.checks.append(OutputCheck(name, f"{label} ({shapes})", err, cos, ref, ok))
    return result


def _flatten_outputs(out) -> list[np.ndarray]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flatten_outputs(o)]
    raise ExportError(f"the module returned {type(out).__name__}; onnxq exports modules returning tensors (or tuples of them)")


# ------------------------------------------------------------------------------------ API


@dataclass
class ExportResult:
    output: Path
    exporter: str
    opset: int
    verification: Verification | None
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"output": str(self.output), "exporter": self.exporter, "opset": self.opset,
                "verification": self.verification.to_json() if self.verification else None, **self.info}


def _as_feed(example_inputs, input_names) -> tuple[list[str], dict[str, np.ndarray]]:
    import torch

    if isinstance(example_inputs, Mapping):
        names = list(example_inputs)
        values = list(example_inputs.values())
    else:
        values = list(example_inputs) if isinstance(example_inputs, (list, tuple)) else [example_inputs]
        names = list(input_names) if input_names else [f"input_{i}" for i in range(len(values))]
    if input_names and list(input_names) != names:
        raise ExportError(f"input_names {list(input_names)} do not match the example inputs {names}")
    if len(names) != len(values):
        raise ExportError(f"{len(names)} input names for {len(values)} example inputs")
    feed = {}
    for n, v in zip(names, values):
        feed[n] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    return names, feed


def export(module, example_inputs, output: str | os.PathLike, *, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None, dynamic: Sequence[DynamicDim | str] = (),
           opset: int = DEFAULT_OPSET, verify_outputs: bool = True, random_checks: int = 2,
           min_cosine: float = DEFAULT_MIN_COSINE, atol: float = DEFAULT_ATOL,
           input_ranges: Mapping[str, tuple[float, float]] | None = None,
           exporters: Sequence[str] = ("dynamo",), seed: int = 0) -> ExportResult:
    """Export a torch module to ONNX at ``output`` and verify it against torch in ONNX Runtime.

    ``example_inputs``: a tensor/array, a tuple of them (named by ``input_names``) or a dict
    ``{name: tensor}``. ``dynamic``: :class:`DynamicDim` or ``"NAME:AXIS:DIM[=MIN..MAX]"``
    strings. Verification runs the example inputs and ``random_checks`` fresh random inputs; an
    output whose cosine is below ``min_cosine`` or whose max abs error exceeds
    ``atol * max(1, max |torch output|)`` is an :class:`ExportError` (nothing is written) unless
    ``verify_outputs=False``. ``exporters`` are tried in order (the zoo adds ``"torchscript"`` as
    a fallback). Over 1 GiB of weights, the weights go to ``<output>.data``.
    """
    from onnxq import modelio

    torch = require_torch()
    out = modelio.check_outputs([output])[0]
    names, feed = _as_feed(example_inputs, input_names)
    dims = [parse_dynamic(d) if isinstance(d, str) else d for d in dynamic]
    for d in dims:
        if d.input not in feed:
            raise ExportError(f"dynamic dim {d.name!r} names input {d.input!r}; the inputs are {names}")
        if not 0 <= d.axis < feed[d.input].ndim:
            raise ExportError(f"dynamic dim {d.name!r}: input {d.input!r} has rank {feed[d.input].ndim}, no axis {d.axis}")
    module = module.eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names)
    dynamic_shapes, dynamic_axes = _dynamic_specs(dims, names)
    errors: dict[str, str] = {}
    verification = None
    for exporter in exporters:
        try:
            with quiet_exporter():
                model = torch_export(module, args, input_names=names, output_names=output_names,
                                     dynamic_shapes=dynamic_shapes, dynamic_axes=dynamic_axes,
                                     opset=opset, exporter=exporter)
        except OnnxqError as exc:
            errors[exporter] = str(exc)
            continue
        except Exception as exc:  # the exporters raise all sorts of things
            errors[exporter] = f"{type(exc).__name__}: {_first_line(exc)}"
            continue
        fixed = _fixed_dynamic_dims(model, dims, feed)
        if fixed:
            errors[exporter] = fixed
            continue
        if not verify_outputs:
            break
        feeds = [("example", feed)] + [
            (f"random #{k + 1}", f) for k, f in enumerate(random_feeds(feed, dims, random_checks, seed, input_ranges))
        ]
        try:
            verification = verify(model, module, feeds, min_cosine=min_cosine, atol=atol)
        except Exception as exc:  # ORT or torch could not run another size of a dynamic dim
            errors[exporter] = f"{exc if isinstance(exc, OnnxqError) else type(exc).__name__ + ': ' + _first_line(exc)}{_size_one_hint(dims, feed)}"
            continue
        if verification.passed:
            break
        errors[exporter] = f"the exported model differs from torch: {verification.failure()}{_size_one_hint(dims, feed)}"
    else:
        hint = ("; pass --no-verify (verify_outputs=False) to keep it anyway, or loosen --atol/--min-cosine"
                if verification is not None else "")
        raise ExportError("export failed (" + "; ".join(f"{k}: {v}" for k, v in errors.items()) + ")" + hint)
    modelio.save(model, out)
    info = {"failed_exporters": errors, "torch": torch.__version__, "python": sys.version.split()[0],
            "inputs": {n: {"shape": list(feed[n].shape), "dtype": str(feed[n].dtype)} for n in names},
            "dynamic": [asdict(d) for d in dims]}
    return ExportResult(out, exporter, model.opset_imports.get("", opset), verification, info)


def _fixed_dynamic_dims(model, dims: Sequence[DynamicDim], feed: Mapping[str, np.ndarray]) -> str:
    """Why the exported ``model`` does not keep the declared dynamic dims ("" when it does): the
    exporter made an axis a fixed size (torch specializes an example size of 1 the code depends on)."""
    inputs = {v.name: v for v in model.graph.inputs}
    fixed = [(d, inputs[d.input].shape[d.axis]) for d in dims
             if inputs[d.input].shape is not None and isinstance(inputs[d.input].shape[d.axis], int)]
    return "; ".join(
        f"input {d.input!r} axis {d.axis} is declared dynamic ({d.name!r}) but the exported model fixes it to {size}"
        + (f"{_size_one_hint([d], feed)}" if feed[d.input].shape[d.axis] == 1 else "")
        for d, size in fixed)


def _size_one_hint(dims: Sequence[DynamicDim], feed: Mapping[str, np.ndarray]) -> str:
    """The hint for dynamic dims whose example size is 1 ("" when none is)."""
    ones = [d for d in dims if feed[d.input].shape[d.axis] == 1]
    if not ones:
        return ""
    where = ", ".join(f"axis {d.axis} of {d.input!r} ({d.name!r})" for d in ones)
    return (f" (the example has size 1 on the dynamic {where}: torch specializes a size-1 example dimension "
            "to a fixed 1 when the model's code depends on it; give an example with size >= 2 on that axis)")


def _dynamic_specs(dims: Sequence[DynamicDim], names: Sequence[str]):
    """torch.export ``dynamic_shapes`` (positional) and TorchScript ``dynamic_axes`` for ``dims``."""
    if not dims:
        return None, None
    from torch.export import Dim

    made: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {n: {} for n in names}
    axes: dict[str, dict[int, str]] = {}
    for d in dims:
        if d.name not in made:
            kwargs = {k: v for k, v in (("min", d.min), ("max", d.max)) if v is not None}
            made[d.name] = Dim(d.name, **kwargs)
        shapes[d.input][d.axis] = made[d.name]
        axes.setdefault(d.input, {})[d.axis] = d.name
    # Positional, so the forward's parameter names need not match the input names.
    return tuple(shapes[n] or None for n in names), axes
