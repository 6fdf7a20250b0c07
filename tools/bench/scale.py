"""Scale: onnxq quantize vs ONNX Runtime's quantize_static on synthetic Llama decoders.

The decoders are transformers ``LlamaForCausalLM`` with random weights (``LlamaConfig`` sizes
below), exported once with the dynamo exporter (input_ids [1, 128]) and cached under
``~/.cache/onnxq/scale/<size>/`` with their weights in a side file. Calibration: 8 windows of 128
random token ids. Each tool runs in its own process (time and peak RSS, VmHWM, are its own),
under an address-space cap (``--cap-gb``) so a run that needs more fails instead of thrashing a
shared machine. onnxq: ``quantize --no-eval`` (INT8, tensorrt target, its default range method
and ``--calib-method minmax``; ``default+blocks``/``default+blocks256``: the default method with
``--calib-blocks auto``/``256``, block-by-block calibration); ORT: ``quant_pre_process`` + ``quantize_static`` (QDQ,
per-channel, MinMax) with a reader holding the arrays in memory.

    python tools/bench/scale.py [--sizes 0.5b] [--cap-gb 12] [--out scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rss import peak_rss_mb  # noqa: E402

# name -> LlamaConfig fields (tied embeddings; grouped-query attention as Llama-3-style models)
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=8000),
    "0.5b": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4, vocab_size=32000),
}
SEQ, WINDOWS = 128, 8
CACHE = Path(os.environ.get("ONNXQ_CACHE", Path.home() / ".cache" / "onnxq")) / "scale"


def build(size: str) -> tuple[Path, Path]:
    """The cached decoder of ``size`` and its calibration .npz (exported on first use)."""
    folder = CACHE / size
    model, calib = folder / "model.onnx", folder / "calib.npz"
    if not model.exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        config = LlamaConfig(**SIZES[size], max_position_embeddings=2 * SEQ, tie_word_embeddings=True, use_cache=False)
        net = LlamaForCausalLM(config).eval()
        ids = torch.randint(0, config.vocab_size, (1, SEQ))
        with torch.no_grad():
            program = torch.onnx.export(net, (ids,), dynamo=True, input_names=["input_ids"], output_names=["logits"])
        staging = folder / "export"
        staging.mkdir(exist_ok=True)
        program.save(str(staging / "model.onnx"), external_data=True)  # model.onnx + model.onnx.data
        os.replace(staging / "model.onnx.data", folder / "model.onnx.data")  # the data first: never a model without it
        os.replace(staging / "model.onnx", model)
    if not calib.exists():
        vocab = SIZES[size]["vocab_size"]
        np.savez(calib, input_ids=np.random.default_rng(0).integers(0, vocab, (WINDOWS, 1, SEQ)).astype(np.int64))
    return model, calib


def model_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in (model, Path(str(model) + ".data")) if p.exists())


# ------------------------------------------------------------------------------ jobs (children)
def _onnxq(model, calib, out, method):
    import onnxq

    method, _, blocks = method.partition("+blocks")
    blocks = (blocks or "auto") if _ else None
    onnxq.quantize(model, out, calib, calib_method=None if method == "default" else method, calib_blocks=blocks, evaluate=False, report=False, quiet=True)


def _ort(model, calib, out, _method):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out + ".pre.onnx"
    quant_pre_process(model, pre, skip_symbolic_shape=True, save_as_external_data=True)
    arrays = dict(np.load(calib))
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in onnx.load(pre, load_external_data=False).graph.input}

    class Reader:
        i = 0

        def get_next(self):
            if self.i >= WINDOWS:
                return None
            feed = {k: (v[self.i] if v.ndim == ranks[k] + 1 else v[self.i : self.i + 1]) for k, v in arrays.items()}
            self.i += 1
            return feed

    quantize_static(
        pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax, extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}, use_external_data_format=True,
    )


def job_main(tool, model, calib, method, cap_gb):
    cap = int(float(cap_gb) * (1 << 30))
    if cap > 0:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-scale-") as tmp:
        try:
            {"onnxq": _onnxq, "ort": _ort}[tool](model, calib, os.path.join(tmp, "q.onnx"), method)
            info = {}
        except MemoryError:
            info = {"error": "out of memory"}
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            info = {"error": "out of memory" if any(s in text.lower() for s in ("bad_alloc", "memory", "allocat")) else text}
    info.update(seconds=time.perf_counter() - t, peak_rss_mb=peak_rss_mb())
    print(json.dumps(info), flush=True)


def run(tool, model, calib, method, cap_gb) -> dict:
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-scale-") as cwd:  # ORT's tools may write side files to the cwd
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--job", tool, str(model), str(calib), method, str(cap_gb)],
            capture_output=True, text=True, env={**os.environ, "ONNXQ_NO_PROGRESS": "1"}, cwd=cwd,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    out["wall_s"] = time.perf_counter() - t
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        job_main(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5b"], choices=list(SIZES))
    ap.add_argument("--cap-gb", type=float, default=12.0, help="address-space cap of each job (0: none)")
    ap.add_argument("--out", default="scale.json")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        model, calib = build(size)
        mb = model_bytes(model) / 2**20
        for tool, method in (("onnxq", "default"), ("onnxq", "minmax"), ("onnxq", "default+blocks"), ("onnxq", "default+blocks256"), ("ort", "MinMax")):
            res = run(tool, model, calib, method, args.cap_gb)
            rows.append({"size": size, "model_mb": round(mb), "tool": tool, "method": method, **res})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'size':<6}{'model MB':>9}  {'tool':<6}{'method':<18}{'wall s':>8}{'peak RSS MB':>12}{'RSS/model':>10}  note")
    for r in rows:
        print(f"{r['size']:<6}{r['model_mb']:>9}  {r['tool']:<6}{r['method']:<18}{r['wall_s']:>8.1f}{r.get('peak_rss_mb', float('nan')):>12.0f}{r.get('peak_rss_mb', float('nan')) / r['model_mb']:>10.2f}  {r.get('error', '')}")
    ort_row = next((r for r in rows if r["tool"] == "ort" and "error" not in r), None)
    for r in rows:
        if r["tool"] == "onnxq" and ort_row and "error" not in r and r["size"] == ort_row["size"]:
            print(f"{r['size']} onnxq {r['method']} / ORT: wall x{r['wall_s'] / ort_row['wall_s']:.2f}, peak RSS x{r['peak_rss_mb'] / ort_row['peak_rss_mb']:.2f}")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
