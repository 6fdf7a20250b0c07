#!/usr/bin/env python3
"""One command for a build pipeline: export → quantize → build (where TensorRT exists) → check.

    python tools/export_and_build.py --zoo minilm-l6-v2 -o out/minilm
    python tools/export_and_build.py my_models.py:build --input x:1x3x224x224:float32 \\
        --calib calib.npz --eval eval.npz -o out/mynet

Writes into the output directory: ``model.onnx`` (exported from PyTorch and verified against
torch), ``export.json``, ``model.int8.onnx`` + ``plan.json`` + ``model.int8.report.json``,
``model.int8.plan`` (TensorRT engine, only where TensorRT is installed), ``check.json``,
``diff.html`` / ``diff.json`` (FP32 vs quantized), ``inspect.json``, and ``manifest.json``: the
sha256 and size of every artifact, the versions of every tool, the options and each step's
status and time. A zoo model also gets its ``calib.npz`` and ``eval.npz``.

Exit code: 0 when the check passes, 1 when it fails, 2 on an error (one ``error: ...`` line).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from onnxq.errors import OnnxqError

CHECK_MIN_COSINE = 0.95
VERSIONED = ("onnxq", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "transformers",
             "polygraphy", "tensorrt")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    from onnxq.modelio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=1) + "\n")


# ------------------------------------------------------------------------------------ steps


def export_step(args, out: Path) -> dict:
    """The FP32 ONNX model from the PyTorch definition, verified against torch; data for a zoo model."""
    import numpy as np

    from onnxq.export import build_module, export, parse_dynamic, parse_input

    if args.zoo:
        from onnxq import zoo

        entry = zoo.get(args.zoo)
        module = build_module(entry.torch_factory)
        example, dynamic = entry.export_example(), entry.dynamic_dims()
        input_names, output_names, ranges = list(entry.inputs), list(entry.outputs), None
        if entry.torch_factory is None:
            raise OnnxqError(f"zoo model {args.zoo} has no PyTorch factory")
        zoo._save_npz(entry.calib_data(args.calib_samples), out / "calib.npz")
        zoo._save_npz(entry.eval_data(args.eval_samples), out / "eval.npz")
        args.calib, args.eval = str(out / "calib.npz"), str(out / "eval.npz")
        factory = entry.torch_factory
    else:
        specs = [parse_input(t) for t in args.input or ()]
        if not specs:
            raise OnnxqError("give the model's inputs with --input NAME:SHAPE:DTYPE (or use --zoo NAME)")
        dynamic = [parse_dynamic(t) for t in args.dynamic or ()]
        module = build_module(args.factory)
        rng = np.random.default_rng(0)
        example = {s.name: s.example(rng) for s in specs}
        ranges = {s.name: (s.low, s.high) for s in specs if s.low is not None}
        input_names, output_names, factory = None, args.output_name, args.factory
    result = export(module, example, out / "model.onnx", input_names=input_names, output_names=output_names,
                    dynamic=dynamic, opset=args.opset, input_ranges=ranges)
    write_json(out / "export.json", {"factory": factory, **result.to_json()})
    v = result.verification
    return {"factory": factory, "exporter": result.exporter, "opset": result.opset,
            "ort_vs_torch_worst_cosine": v.worst_cosine, "ort_vs_torch_max_abs_error": v.max_abs_error}


def quantize_step(args, out: Path) -> dict:
    """Q/DQ model, plan and report; accuracy is measured by the check step."""
    from onnxq.pipeline import quantize

    if not args.calib:
        raise OnnxqError("quantizing needs calibration data: pass --calib DATA (or use --zoo NAME)")
    result = quantize(out / "model.onnx", out / f"model.{args.precision}.onnx", args.calib, target=args.target,
                      precision=args.precision, save_plan=out / "plan.json", calib_samples=args.calib_samples,
                      evaluate=False, quiet=True)
    from onnxq.calibrators.methods import DEFAULT_METHOD

    return {"target": args.target, "precision": args.precision, "quantized_nodes": len(result.plan.quantized_nodes()),
            "calibration_samples": result.table.num_samples,
            "calibration_method": result.table.method or DEFAULT_METHOD[args.target]}


def build_step(quantized: Path, out: Path) -> dict:
    """A strongly typed TensorRT engine (onnxq build), where TensorRT and a GPU exist."""
    from onnxq.runtime import tensorrt as trt_runtime

    reason = trt_runtime.unavailable_reason()
    if reason is not None:
        return {"status": f"skipped: {reason}"}
    engine = out / quantized.name.replace(".onnx", ".plan")
    result = trt_runtime.build_engine(quantized, engine)
    return {"status": "built", "engine": result.engine.name, "manifest": result.manifest.name}


def check_step(reference: Path, candidate: Path, eval_data: str, out: Path, min_cosine: float) -> dict:
    """onnxq check: FP32 in ORT vs the quantized model in ORT (and its engine where one was built)
    on the evaluation data, with check.json/.md/.html; passes when every output's mean cosine is at
    least ``min_cosine``."""
    from onnxq.check import Thresholds, check
    from onnxq.report import write_reports

    engine = out / candidate.name.replace(".onnx", ".plan")
    report = check(reference, [candidate], eval_data, engines=[engine] if engine.is_file() else (),
                   providers=["cpu"], latency=False, thresholds=Thresholds(min_cosine=min_cosine), progress=False)
    write_reports(report, out / "check")
    return {"passed": report.passed, "samples": report.samples,
            "candidates": {c.label: {"passed": c.passed, "failures": c.failures,
                                     "outputs": {a.name: {"cosine_mean": a.cosine_mean, "snr_db": a.to_json()["snr_db"]}
                                                 for a in c.outputs}} for c in report.candidates}}


def data_dims(model: Path, data: str) -> dict[str, int]:
    """Sizes of the model's dynamic input dimensions in the first sample of ``data`` (for MAC counts)."""
    from onnxq.data import open_source
    from onnxq.modelio import load
    from onnxq.runtime.ort import model_input_spec

    graph = load(model)
    feed = next(iter(open_source(data, model_input_spec(graph), require_finite=False)))
    dims = {}
    for value in graph.graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if not isinstance(dim, int) and getattr(dim, "value", None) and value.name in feed:
                dims[str(dim.value)] = int(feed[value.name].shape[axis])
    return dims


def review_step(reference: Path, candidate: Path, data: str, out: Path) -> dict:
    """The graph diff (HTML and JSON) and the inspection of both models, for people reviewing the build.

    MACs count dynamic dimensions at their size in the first evaluation sample.
    """
    from onnxq.diff import diff, format_html
    from onnxq.inspect import inspect

    dims = data_dims(reference, data)
    result = diff(reference, candidate, dims=dims)
    write_text(out / "diff.html", format_html(result))
    write_json(out / "diff.json", result.to_json())
    write_json(out / "inspect.json", {reference.name: inspect(reference, dims), candidate.name: inspect(candidate, dims)})
    return {"dims": dims, "macs_by_precision": result.summary["macs_by_precision"]["b"], "counts": result.counts()}


# ------------------------------------------------------------------------------------ main


def run(args) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": "onnxq.export_and_build/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "options": {k: v for k, v in vars(args).items()},
        "versions": versions(),
        "steps": {},
    }
    quantized = out / f"model.{args.precision}.onnx"
    steps = [
        ("export", lambda: export_step(args, out)),
        ("quantize", lambda: quantize_step(args, out)),
        ("build", lambda: build_step(quantized, out)),
        ("check", lambda: check_step(out / "model.onnx", quantized, args.eval or args.calib, out, args.min_cosine)),
        ("review", lambda: review_step(out / "model.onnx", quantized, args.eval or args.calib, out)),
    ]
    code = 0
    try:
        for name, step in steps:
            t = time.perf_counter()
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            result = step()
            result["seconds"] = round(time.perf_counter() - t, 2)
            manifest["steps"][name] = result
            print(f"[{name}] {json.dumps(result)}", file=sys.stderr, flush=True)
        passed = manifest["steps"]["check"]["passed"]
        manifest["passed"] = passed
        code = 0 if passed else 1
    except OnnxqError as exc:
        manifest["error"] = str(exc)
        manifest["passed"] = False
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    finally:
        manifest["options"] = {k: v for k, v in vars(args).items()}  # with the zoo's data paths filled in
        manifest["artifacts"] = {
            p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(out.iterdir()) if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
        }
        write_json(out / "manifest.json", manifest)
    print(f"{'check passed' if code == 0 else 'check FAILED' if code == 1 else 'error'}; manifest: {out / 'manifest.json'}")
    return code


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("factory", nargs="?", metavar="MODULE:FACTORY", help="function returning the torch module (or --zoo NAME)")
    p.add_argument("--zoo", metavar="NAME", help="a zoo model: its PyTorch definition, example inputs, calibration and evaluation data")
    p.add_argument("-o", "--output", required=True, help="output directory (created)")
    p.add_argument("--input", action="append", metavar="NAME:SHAPE:DTYPE[:LOW..HIGH]")
    p.add_argument("--dynamic", action="append", metavar="NAME:AXIS:DIM[=MIN..MAX]")
    p.add_argument("--output-name", action="append", metavar="NAME")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--calib", help="calibration data (.npz, directory, module:function); a zoo model brings its own")
    p.add_argument("--eval", help="held-out evaluation data for the check (default: the calibration data)")
    p.add_argument("--calib-samples", type=int, metavar="N")
    p.add_argument("--eval-samples", type=int, metavar="N")
    p.add_argument("--target", choices=["tensorrt", "ort"], default="tensorrt")
    p.add_argument("--precision", default="int8")
    p.add_argument("--min-cosine", type=float, default=CHECK_MIN_COSINE,
                   help=f"the check fails when an output's mean cosine vs FP32 is below this (default {CHECK_MIN_COSINE})")
    args = p.parse_args(argv)
    if bool(args.zoo) == bool(args.factory):
        p.error("give exactly one of MODULE:FACTORY or --zoo NAME")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
