"""Real ONNX models from PyPI wheels, with real inputs and each model's own task metric:
onnxq INT8 (both targets) and FP8 against ONNX Runtime's quantize_static, each quantized model
scored in ORT sessions at ORT_ENABLE_BASIC, ORT_ENABLE_ALL (ORT's default) and ALL without the
ReluQuantRewrite rule (the FP8 question of issue 14).

Models (wheels pinned, cached like the zoo's: ``models/_fetch.py``):

- ``ppocr-cls``: PaddleOCR's text-direction classifier (opset 11, rapidocr-onnxruntime 1.4.4),
  on text-like strips cut from foolbox 3.3.4's ImageNet samples, each also rotated 180°;
  metric: top-1 agreement with FP32;
- ``ppocr-det``: PP-OCRv4's DBNet text detector (opset 12), on the same images at 224×224;
  metric: IoU of the probability map thresholded at 0.3 (DBNet's own threshold) with FP32's;
- ``silero-vad``: Silero VAD 6.2.3 (``silero_vad_op18_ifless.onnx``: its convolutions and LSTM
  sit inside an If on the sample rate), streamed over 512-sample chunks of real recordings (the
  Python installation's test data: ``test/audiodata/pluck-pcm32.wav`` and, where IPython is
  installed in the base Python, its ``test.wav``; not speech datasets) with its state carried;
  metric: decisions (p > 0.5) that agree with FP32's, over all chunks.

    python tools/bench/real_models.py [--models ppocr-cls ppocr-det silero-vad] [--out real.json]

Every column uses the same calibration samples and MinMax ranges (ORT's quantize_static default;
the comparison is of placement and Q/DQ form). ``ort-int8`` is quantize_static with QDQ,
per-channel symmetric INT8 weights and symmetric INT8 activations (the tensorrt setting).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from _job import run_ort  # noqa: E402

import onnxq  # noqa: E402
from models._fetch import fetch_wheel  # noqa: E402

# level -> (ORT level, optimizers disabled): "all-rqr" is ALL without ReluQuantRewrite, the rule that
# deletes a Relu before an FP8 QuantizeLinear (onnxq.runtime.ort.ORT_FP8_BAD_RULE)
LEVELS = {
    "basic": (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, None),
    "all": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None),
    "all-rqr": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["ReluQuantRewrite"]),
}
RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
SILERO = ("silero-vad", "6.2.3")
FOOLBOX = ("foolbox", "3.3.4")


def session(path, level: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level, disabled = LEVELS[level]
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def _images(size: tuple[int, int]) -> list[np.ndarray]:
    from PIL import Image

    folder = fetch_wheel(*FOOLBOX) / "foolbox" / "data"
    out = []
    for f in sorted(folder.glob("imagenet_*.jpg")):
        img = Image.open(f).convert("RGB").resize((size[1], size[0]))
        out.append(np.asarray(img, dtype=np.float32) / 255.0)
    return out


def _normalise(img: np.ndarray, mean, std) -> np.ndarray:
    return ((img - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)[None].astype(np.float32)


# --- ppocr-cls --------------------------------------------------------------------------------


def cls_case():
    model = fetch_wheel(*RAPIDOCR) / "rapidocr_onnxruntime" / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    strips = []
    for img in _images((192, 192)):
        for top in (0, 48, 96, 144):  # four 48×192 strips per image, and each upside down
            strip = img[top: top + 48]
            strips += [strip, strip[::-1, ::-1]]
    x = np.stack([_normalise(s, [0.5] * 3, [0.5] * 3)[0] for s in strips])
    feeds = [{"x": x[i: i + 1]} for i in range(len(x))]
    return model, feeds[::4], feeds, cls_metric


def cls_metric(ref: list, got: list) -> float:
    return float(np.mean([r[0].argmax() == g[0].argmax() for r, g in zip(ref, got)]))


# --- ppocr-det --------------------------------------------------------------------------------


def det_case():
    model = fetch_wheel(*RAPIDOCR) / "rapidocr_onnxruntime" / "models" / "ch_PP-OCRv4_det_infer.onnx"
    x = [_normalise(img, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) for img in _images((224, 224))]
    feeds = [{"x": a} for a in x]
    return model, feeds[::2], feeds, det_metric


def det_metric(ref: list, got: list) -> float:
    a = np.concatenate([r[0].ravel() for r in ref]) > 0.3
    b = np.concatenate([g[0].ravel() for g in got]) > 0.3
    return float((a & b).sum() / max((a | b).sum(), 1))


# --- silero-vad -------------------------------------------------------------------------------


def _recordings() -> np.ndarray:
    """Real recordings shipped with Python and IPython, as 16 kHz mono float, with silences."""
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    files = [lib / "test" / "audiodata" / "pluck-pcm32.wav", lib / "site-packages" / "IPython" / "lib" / "tests" / "test.wav"]
    parts = []
    for f in files:
        if not f.is_file():
            continue
        with wave.open(str(f)) as w:
            raw = w.readframes(w.getnframes())
            dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[w.getsampwidth()]
            x = np.frombuffer(raw, dtype=dtype).reshape(-1, w.getnchannels()).mean(axis=1).astype(np.float64)
            x = (x - 128) / 128 if dtype is np.uint8 else x / np.iinfo(dtype).max
            rate = w.getframerate()
        x = np.interp(np.arange(0, len(x), rate / 16000), np.arange(len(x)), x)  # resample to 16 kHz
        parts += [x, np.zeros(8000)]
    return np.concatenate(parts).astype(np.float32)


def vad_case():
    model = fetch_wheel(*SILERO) / "silero_vad" / "data" / "silero_vad_op18_ifless.onnx"
    audio = _recordings()
    chunks = audio[: len(audio) // 512 * 512].reshape(-1, 1, 512)
    return model, chunks, chunks, vad_metric


def _stream(sess, chunks) -> list:
    """Run the chunks in order, carrying the state, like the VAD's own iterator."""
    state = np.zeros((2, 1, 128), np.float32)
    outs = []
    for c in chunks:
        prob, state = sess.run(None, {"input": c, "sr": np.array(16000, np.int64), "state": state})
        outs.append([prob])
    return outs


def vad_calibration(model, chunks) -> list[dict]:
    """Calibration feeds with the states the stream really carries (from the FP32 model)."""
    sess = session(model, "basic")
    state = np.zeros((2, 1, 128), np.float32)
    feeds = []
    for c in chunks[::3]:
        feeds.append({"input": c, "sr": np.array(16000, np.int64), "state": state})
        _, state = sess.run(None, feeds[-1])
    return feeds


def vad_metric(ref: list, got: list) -> float:
    return float(np.mean([(r[0] > 0.5) == (g[0] > 0.5) for r, g in zip(ref, got)]))


CASES = {"ppocr-cls": cls_case, "ppocr-det": det_case, "silero-vad": vad_case}


def _outputs(path, feeds, level, name):
    sess = session(path, level)
    if name == "silero-vad":
        return _stream(sess, feeds)
    return [sess.run(None, f) for f in feeds]


def _save_npz(feeds, path) -> Path:
    np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    return path


def run_model(name: str, work: Path) -> dict:
    model, calib, evaluation, metric = CASES[name]()
    if name == "silero-vad":
        calib = vad_calibration(model, calib)
    calib_npz = _save_npz(calib, work / f"{name}.calib.npz")
    columns = {
        "onnxq-int8 (tensorrt)": dict(target="tensorrt", precision="int8"),
        "onnxq-int8 (ort)": dict(target="ort", precision="int8"),
        "onnxq-fp8 (tensorrt)": dict(target="tensorrt", precision="fp8"),
        "ort-int8 (quantize_static)": None,
    }
    ref = {lvl: _outputs(model, evaluation, lvl, name) for lvl in LEVELS}
    rows = {}
    for label, options in columns.items():
        out = work / f"{name}.{label.split()[0]}.{(options or {}).get('target', 'ort')}.onnx"
        t = time.perf_counter()
        try:
            if options is None:
                run_ort(str(model), str(out), str(calib_npz), "tensorrt", None)
            else:
                onnxq.quantize(model, out, calib, method="minmax", report=False, evaluate=False, quiet=True, **options)
        except Exception as exc:  # a column that fails is reported, not fatal
            rows[label] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            continue
        row = {"quantize_s": round(time.perf_counter() - t, 2), "size_mb": round(out.stat().st_size / 1e6, 3)}
        for lvl in LEVELS:
            try:
                row[lvl] = round(metric(ref["basic"], _outputs(out, evaluation, lvl, name)), 4)
            except Exception as exc:
                row[lvl] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
        rows[label] = row
    return {"model": name, "file": Path(model).name, "float_size_mb": round(Path(model).stat().st_size / 1e6, 3),
            "float_all_vs_basic": round(metric(ref["basic"], ref["all"]), 4), "eval_samples": len(evaluation), "calib_samples": len(calib), "columns": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default="bench_real_models.json")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="onnxq-real-") as tmp:
        for name in args.models:
            res = run_model(name, Path(tmp))
            results.append(res)
            print(f"\n{name} ({res['file']}, {res['eval_samples']} eval / {res['calib_samples']} calib samples); task metric vs FP32 at BASIC")
            print(f"  {'column':<28} {'BASIC':>8} {'ALL':>8} {'ALL-RQR':>8} {'MB':>7} {'s':>6}")
            for label, row in res["columns"].items():
                if "error" in row:
                    print(f"  {label:<28} {row['error']}")
                    continue
                print(f"  {label:<28} {str(row['basic'])[:8]:>8} {str(row['all'])[:8]:>8} {str(row['all-rqr'])[:8]:>8} {row['size_mb']:>7} {row['quantize_s']:>6}")
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
