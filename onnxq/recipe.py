"""The user's request: what to quantize, how, and at which precision, validated in one place.

A :class:`Recipe` comes from keywords (the Python API), from command-line flags, or from a YAML or
JSON file (``--recipe FILE``) whose keys are spelled like the long options::

    target: ort
    precision: int8
    calib-method: minmax
    smoothquant: auto
    split-outliers: 16
    exclude: ["/lm_head/.*"]

Flags given on the command line override the file (:meth:`Recipe.merged`). Decisions are not
made here: placement, SmoothQuant, the FP16 regions and the solver read the recipe and write their
decisions into the :class:`~onnxq.plan.QuantPlan`.

A new option is one field here (with its check in :meth:`Recipe.validated`), one flag in the
CLI's option group, and the code that reads it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from onnxq.calibrators.methods import METHODS, check_method, check_percentile
from onnxq.errors import OnnxqError

TARGETS = ("tensorrt", "ort")
PRECISIONS = ("int8", "fp8", "w4a16", "w8a16", "w4a8")
# weight-only precisions: INT4 / INT8 weights in blocks along the reduction axis, float activations
WEIGHT_ONLY = ("w4a16", "w8a16", "w4a8")  # w4a8: the blocked INT4 weights of w4a16, FP8 activations
BLOCK_SIZES = (32, 64, 128)
HEAD_BITS = (4, 8)  # weight-only LM head / embedding table: INT4 like the body, or INT8
WEIGHT_METHODS = ("rtn", "awq", "gptq", "awq+gptq")
# weight-only on the ort target: ONNX Runtime's MatMulNBits, or the blocked DequantizeLinear form
# (ORT fuses it into MatMulNBits at accuracy level 4); and MatMulNBits' accuracy levels
ORT_WEIGHT_FORMS = ("matmulnbits", "dq")
ORT_ACCURACY_LEVELS = (0, 1, 2, 4)
HIGH_PRECISIONS = ("fp32", "fp16")
ATTENTION_PROBS = ("int8", "fp8", "float", "unnormalized")  # onnxq.placement.attention's choices for P·V
PROVIDERS = ("cpu", "cuda", "tensorrt")  # ONNX Runtime execution providers (onnxq.runtime.ort.PROVIDER_ALIASES)


class RecipeError(OnnxqError):
    """A recipe file or option is unusable."""


@dataclass(frozen=True)
class Recipe:
    target: str = "tensorrt"
    precision: str = "int8"
    high_precision: str = "fp32"
    # a method name, or {op type (lower case) or "default": method}; None: the default (mse)
    calib_method: str | dict[str, str] | None = None
    percentile: float | None = None
    calib_samples: int | None = None
    calib_batch: int | None = None  # samples per ORT call while calibrating; None: chosen from memory
    calib_blocks: str | None = None  # block-by-block calibration: "auto" or MB of weights per block; None: whole model
    providers: tuple[str, ...] = ()  # ORT providers for calibration and evaluation, preferred first; (): CPU
    smoothquant: float | str | None = None
    split_outliers: int = 0
    exclude: tuple[str, ...] = ()  # node names or regular expressions (whole-name match)
    exclude_op: tuple[str, ...] = ()  # op types kept in float
    include: tuple[str, ...] = ()  # only these nodes (names or regexes) may be quantized
    include_op: tuple[str, ...] = ()  # only these op types may be quantized
    per_tensor_weights: bool = False  # one weight scale per tensor instead of per output channel
    equalize: bool = False  # cross-layer equalization of Conv/Gemm pairs before calibration
    rotate: bool = False  # rotate a decoder's residual stream by a randomized Hadamard matrix (exact in float)
    rotate_online: int = 0  # with rotate: block of the Hadamard inserted before each MLP down projection (0: none)
    bias_correction: bool = False  # per-channel bias shift by the measured mean output error
    depthwise_min_snr: float | None = None  # dB: depthwise convs whose own measured SNR is lower stay float
    block_size: int = 128  # weight-only: weights per scale along the reduction axis
    # weight-only: the LM head (a product writing a graph output) too; default: on for w4a16/w8a16
    # on the ort target, off elsewhere (_default_head_and_embedding)
    quantize_head: bool = False
    quantize_embedding: bool = False  # weight-only, ort target: the embedding Gather's table too; default as quantize_head
    head_bits: int = 8  # weight-only: bits of the LM head's and the embedding table's weights when quantized
    weight_method: str = "rtn"  # round-to-nearest, GPTQ (any precision), or weight-only AWQ's scale and clip search, or both
    dynamic: bool = False  # ort target: MatMul/Gemm activations quantized at run time (DynamicQuantizeLinear)
    gptq_act_order: bool = True  # GPTQ: quantize input channels in decreasing Hessian diagonal order
    ort_weight_form: str = "matmulnbits"  # weight-only, ort target: MatMulNBits nodes or blocked DQ → MatMul
    ort_accuracy_level: int = 1  # weight-only, ort target: MatMulNBits' accuracy_level for 4-bit weights (measured: docs/weight-only.md)
    int8_share: float = 0.0  # weight-only GPTQ: share of the 4-bit weights' elements kept at 8 bits (largest output error first)
    attention_probs: str = "int8"  # attention's P·V products: "int8" (as every MatMul), "fp8", "float" or "unnormalized" (INT8 on exp(s - rowmax))
    _given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_options(cls, options: Mapping[str, object], source: str = "options") -> Recipe:
        """A recipe from ``{field or option name: value}`` (``calib-method`` or ``calib_method``)."""
        return cls().merged(options, source)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A recipe from a YAML or JSON file (a mapping of option names to values)."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise RecipeError(f"{path}: no such recipe file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read the recipe {path} ({exc})") from None
        data = _parse(text, path)
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise RecipeError(f"{path}: a recipe is a mapping of option names to values (e.g. 'target: ort'), got {type(data).__name__}")
        return cls.from_options(data, source=str(path))

    def merged(self, overrides: Mapping[str, object], source: str = "command line") -> Recipe:
        """This recipe with ``overrides`` (options given on the command line, keywords, a file's
        keys: ``calib-method`` or ``calib_method``) replacing its values."""
        known = {f.name for f in dataclasses.fields(self) if not f.name.startswith("_")}
        values = {}
        for key, value in overrides.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise RecipeError(f"{_at(source)}unknown recipe key {key!r}; known keys: {', '.join(sorted(k.replace('_', '-') for k in known))}")
            values[name] = value
        return dataclasses.replace(self, **values, _given=self._given | frozenset(values)).validated(source)

    def given(self, name: str) -> bool:
        """Whether ``name`` was set explicitly (by the file, a flag or a keyword)."""
        return name in self._given

    # --- validation --------------------------------------------------------------------------
    def validated(self, source: str = "recipe") -> Recipe:
        """The recipe with normalised values; a bad value is a RecipeError naming the option."""
        values = {
            "target": _choice(self.target, TARGETS, "target", source),
            "precision": _choice(self.precision, PRECISIONS, "precision", source),
            "high_precision": _choice(self.high_precision, HIGH_PRECISIONS, "high-precision", source),
            "calib_method": _calib_method(self.calib_method, source),
            "percentile": _percentile(self.percentile, source),
            "calib_samples": _count(self.calib_samples, "calib-samples", source, minimum=1),
            "calib_batch": _count(self.calib_batch, "calib-batch", source, minimum=1),
            "calib_blocks": _calib_blocks(self.calib_blocks, source),
            "providers": _providers(self.providers, source),
            "smoothquant": _alpha(self.smoothquant, source),
            "split_outliers": _count(self.split_outliers, "split-outliers", source, minimum=0) or 0,
            "exclude": _strings(self.exclude, "exclude", source),
            "exclude_op": _strings(self.exclude_op, "exclude-op", source),
            "include": _strings(self.include, "include", source),
            "include_op": _strings(self.include_op, "include-op", source),
            "per_tensor_weights": _flag(self.per_tensor_weights, "per-tensor-weights", source),
            "equalize": _flag(self.equalize, "equalize", source),
            "rotate": _flag(self.rotate, "rotate", source),
            "rotate_online": _count(self.rotate_online, "rotate-online", source, minimum=0) or 0,
            "bias_correction": _flag(self.bias_correction, "bias-correction", source),
            "depthwise_min_snr": _decibels(self.depthwise_min_snr, "depthwise-min-snr", source),
            "block_size": _block_size(self.block_size, source),
            "quantize_head": _flag(self.quantize_head, "quantize-head", source),
            "quantize_embedding": _flag(self.quantize_embedding, "quantize-embedding", source),
            "head_bits": _head_bits(self.head_bits, source),
            "weight_method": _choice(self.weight_method, WEIGHT_METHODS, "weight-method", source),
            "gptq_act_order": _flag(self.gptq_act_order, "gptq-act-order", source),
            "int8_share": _share(self.int8_share, source),
            "ort_weight_form": _choice(self.ort_weight_form, ORT_WEIGHT_FORMS, "ort-weight-form", source),
            "ort_accuracy_level": _accuracy_level(self.ort_accuracy_level, source),
            "dynamic": _flag(self.dynamic, "dynamic", source),
            "attention_probs": _choice(self.attention_probs, ATTENTION_PROBS, "attention-probs", source),
        }
        _check_percentile_method(values["percentile"], values["calib_method"], source)
        if values["split_outliers"] and values["smoothquant"] is None:
            raise RecipeError("--split-outliers is part of SmoothQuant's per-channel treatment: pass --smoothquant ALPHA|auto with it")
        if values["rotate_online"] and not values["rotate"]:
            raise RecipeError(f"{_at(source)}--rotate-online is part of the rotation: pass --rotate with it")
        if values["precision"] in WEIGHT_ONLY and (values["per_tensor_weights"] or values["smoothquant"] is not None):
            option = "--per-tensor-weights" if values["per_tensor_weights"] else "--smoothquant"
            raise RecipeError(f"{_at(source)}{option} does not apply to weight-only --precision {values['precision']} (its weights are blocked along the reduction axis, activations stay float)")
        _default_head_and_embedding(self, values)
        if values["quantize_embedding"] and (values["precision"] not in WEIGHT_ONLY or values["target"] != "ort"):
            raise RecipeError(f"{_at(source)}--quantize-embedding is for weight-only precisions on the ort target (ONNX Runtime's GatherBlockQuantized): pass --precision w4a16 --target ort")
        if values["weight_method"] not in ("rtn", "gptq") and values["precision"] not in WEIGHT_ONLY:
            raise RecipeError(f"{_at(source)}--weight-method {values['weight_method']} is for weight-only precisions: pass --precision w4a16 or w8a16 (int8 and fp8 take rtn or gptq)")
        if values["weight_method"] == "gptq" and values["dynamic"]:
            raise RecipeError(f"{_at(source)}--weight-method gptq is for static weights: drop --dynamic (its weights are rounded to nearest)")
        if values["int8_share"] and (values["precision"] not in ("w4a16", "w4a8") or values["weight_method"] not in ("gptq", "awq+gptq")):
            raise RecipeError(f"{_at(source)}--int8-share ranks 4-bit weights by their Hessian output error: pass --precision w4a16 --weight-method gptq (or awq+gptq) with it")
        if values["dynamic"] and (values["target"] != "ort" or values["precision"] != "int8" or values["smoothquant"] is not None or values["bias_correction"]):
            raise RecipeError(f"{_at(source)}--dynamic is INT8 on the ort target with run-time activation scales: pass --target ort --precision int8, without --smoothquant / --bias-correction")
        _check_attention_probs(values, source)
        _check_ort_weight_form(self, values, source)
        return dataclasses.replace(self, **values)

    @property
    def weight_only(self) -> bool:
        """Whether the request's weights are blocked along the reduction axis (w4a16 / w8a16 /
        w4a8; only w4a8 quantizes activations too)."""
        return self.precision in WEIGHT_ONLY

    @property
    def activations_quantized(self) -> bool:
        """Whether activations get Q/DQ (and so need calibration data): all but w4a16 / w8a16."""
        return self.precision not in ("w4a16", "w8a16") and not self.dynamic

    # --- JSON --------------------------------------------------------------------------------
    def to_json(self) -> dict:
        """Every option, spelled like the long flags (what sweep/solve/plan files record)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = list(value) if isinstance(value, tuple) else value
        return out


def _default_head_and_embedding(recipe: Recipe, values: dict) -> None:
    """Unless the recipe says otherwise, w4a16 / w8a16 on the ort target quantize the LM head and
    the embedding table (INT8, --head-bits): SmolLM2-135M decodes a token 10-25 % faster (the
    float head read 113 MB per token), its 512-token prefill no slower, perplexity +0.03, 0.235x
    the FP32 bytes instead of 0.329x (docs/weight-only.md); other targets and precisions keep them
    float (TensorRT has no quantized Gather in ONNX)."""
    default = values["target"] == "ort" and values["precision"] in ("w4a16", "w8a16")
    for name in ("quantize_head", "quantize_embedding"):
        if not recipe.given(name):
            values[name] = default


def _check_ort_weight_form(recipe: Recipe, values: dict, source: str) -> None:
    """--ort-weight-form / --ort-accuracy-level choose how ONNX Runtime runs weight-only products."""
    # a recipe written out whole (to_json) carries the defaults: only a changed value is an error
    changed = {name for name in ("ort_weight_form", "ort_accuracy_level") if recipe.given(name) and values[name] != getattr(Recipe, name)}
    for name in sorted(changed):
        if values["precision"] not in ("w4a16", "w8a16") or values["target"] != "ort":
            raise RecipeError(f"{_at(source)}--{name.replace('_', '-')} is for --precision w4a16 / w8a16 on the ort target (ONNX Runtime's MatMulNBits)")
    if "ort_accuracy_level" in changed and values["ort_weight_form"] == "dq":
        raise RecipeError(f"{_at(source)}--ort-accuracy-level sets MatMulNBits' level; with --ort-weight-form dq ONNX Runtime fuses at level 4 (its session option session.qdq_matmulnbits_accuracy_level changes it)")


def _at(source: str) -> str:
    """Where a bad value came from, for files (flags and keywords name themselves)."""
    return "" if source in ("options", "command line") else f"{source}: "


def _parse(text: str, path: Path):
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path} is not valid JSON ({exc})") from None
    import yaml  # JSON is YAML too; PyYAML is a core dependency

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"{path} is not valid YAML ({first})") from None


def _choice(value, choices: tuple[str, ...], option: str, source: str) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise RecipeError(f"{_at(source)}--{option} {value!r} is not one of {list(choices)}")
    return value.lower()


def _calib_method(value, source: str):
    if value is None:
        return None
    if isinstance(value, str):
        return check_method(value.lower())
    if isinstance(value, Mapping):
        return {str(k).lower(): check_method(str(v).lower()) for k, v in value.items()}
    raise RecipeError(f"{_at(source)}--calib-method takes one of {list(METHODS)} or a mapping by op type, got {value!r}")


def _check_percentile_method(percentile, method, source: str) -> None:
    """--percentile with a method that is not percentile would be ignored: refused instead. (With no
    method the table's may be percentile; onnxq.pipeline checks the method actually used.)"""
    methods = set(method.values()) if isinstance(method, Mapping) else {method}
    if percentile is not None and method is not None and "percentile" not in methods:
        raise RecipeError(f"{_at(source)}--percentile only applies to --calib-method percentile (the method here is {method!r}); drop --percentile or pass --calib-method percentile")


def _check_attention_probs(values: Mapping, source: str) -> None:
    """P·V at FP8, in float or on unnormalized probabilities is a change of an INT8 plan; FP8
    nodes are TensorRT's (Ada/Hopper)."""
    probs = values["attention_probs"]
    if probs != "int8" and (values["precision"] != "int8" or values["dynamic"]):
        raise RecipeError(f"{_at(source)}--attention-probs {probs} changes attention's P·V in an INT8 plan: pass --precision int8 (without --dynamic)")
    if probs == "fp8" and values["target"] != "tensorrt":
        raise RecipeError(f"{_at(source)}--attention-probs fp8 is for the tensorrt target (FP8 MatMuls need TensorRT on Ada/Hopper GPUs): pass --target tensorrt, or --attention-probs float")


def _percentile(value, source: str) -> float | None:
    return None if value is None else check_percentile(value)


def _count(value, option: str, source: str, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or isinstance(value, bool) or n < minimum or (isinstance(value, float) and value != n):
        raise RecipeError(f"{_at(source)}--{option} takes a whole number >= {minimum}, got {value!r}")
    return n


def _calib_blocks(value, source: str) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise RecipeError(f"{_at(source)}--calib-blocks takes 'auto' or a weight budget in MB per block (a positive integer), got {value!r}")
    return text


def _decibels(value, option: str, source: str) -> float | None:
    if value is None:
        return None
    try:
        db = float(value)
    except (TypeError, ValueError):
        db = None
    if db is None or isinstance(value, bool) or not 0.0 < db < 200.0:
        raise RecipeError(f"{_at(source)}--{option} takes a signal-to-noise ratio in dB between 0 and 200 (e.g. 34), got {value!r}")
    return db


def _alpha(value, source: str) -> float | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise RecipeError(f"{_at(source)}--smoothquant takes a migration strength in [0, 1] or 'auto', got {value!r}")
    return float(value)


def _block_size(value, source: str) -> int:
    n = _count(value, "block-size", source, minimum=1)
    if n not in BLOCK_SIZES:
        raise RecipeError(f"{_at(source)}--block-size takes one of {list(BLOCK_SIZES)}, got {value!r}")
    return n


def _share(value, source: str) -> float:
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = None
    if share is None or isinstance(value, bool) or not 0.0 <= share <= 1.0:
        raise RecipeError(f"{_at(source)}--int8-share takes a fraction between 0 and 1 (e.g. 0.25), got {value!r}")
    return share


def _accuracy_level(value, source: str) -> int:
    if isinstance(value, bool) or value not in ORT_ACCURACY_LEVELS:
        raise RecipeError(f"{_at(source)}--ort-accuracy-level takes one of {list(ORT_ACCURACY_LEVELS)}, got {value!r}")
    return value


def _head_bits(value, source: str) -> int:
    n = _count(value, "head-bits", source, minimum=1)
    if n not in HEAD_BITS:
        raise RecipeError(f"{_at(source)}--head-bits takes one of {list(HEAD_BITS)}, got {value!r}")
    return n


def _flag(value, option: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise RecipeError(f"{_at(source)}--{option} is true or false, got {value!r}")
    return value


def _providers(value, source: str) -> tuple[str, ...]:
    """A comma-separated string or a list of provider short names, lower case."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    names = tuple(v.strip().lower() for v in _strings(value, "providers", source))
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise RecipeError(f"{_at(source)}--providers: unknown provider {unknown[0]!r}; choose from {', '.join(PROVIDERS)}")
    return names


def _strings(value, option: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{_at(source)}--{option} takes a list of strings, got {value!r}")
    return tuple(value)
