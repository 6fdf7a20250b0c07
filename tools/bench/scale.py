"""Scale: onnxq quantize vs ONNX Runtime's quantize_static on synthetic Llama decoders.

The decoders are transformers ``LlamaForCausalLM`` with random weights (``LlamaConfig`` sizes
below), exported once with the dynamo exporter (input_ids [1, 128]) and cached under
``~/.cache/onnxq/scale/<size>/`` with their weights in a side file. Calibration: 8 windows of 128
random token ids. Each tool runs in its own process (time and peak RSS, VmHWM, are its own),
under a memory cap (``--cap-gb``: the job is killed when its RSS passes it; ORT's jobs also get it as
their address-space limit) so a run that needs more fails instead of thrashing a shared machine. onnxq: ``quantize --no-eval`` (INT8, tensorrt target, its default range method
and ``--calib-method minmax``; ``default+blocks``/``default+blocks256``: the default method with
``--calib-blocks auto``/``256``, block-by-block calibration); ORT: ``quant_pre_process`` + ``quantize_static`` (QDQ,
per-channel, MinMax) with a reader holding the arrays in memory.

``2.8b`` (hidden 2560, intermediate 6912, 39 layers, GQA 32/8 heads, vocab 32000 tied: 2.79B
parameters, 11.2 GB fp32) is built without holding it: a 2-layer model of that width is exported
and its second layer repeated in the ONNX graph, each copy's matrices seeded random values written
tensor by tensor (:func:`replicate_layers`; peak RSS 1.6 GB, 3.5 min). onnxq's rows also report
each step's peak RSS (``step_peak_mb``).

    python tools/bench/scale.py [--sizes 0.5b] [--runs onnxq:default+blocks ort:MinMax] [--cap-gb 12] [--out scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rss import peak_rss_mb, step_peaks  # noqa: E402

# name -> LlamaConfig fields (tied embeddings; grouped-query attention as Llama-3-style models)
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=8000),
    "0.5b": dict(hidden_size=1280, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=20, num_key_value_heads=4, vocab_size=32000),
    # 2.79B parameters (11.2 GB fp32): too large to export in memory on a shared 24 GB machine, so it
    # is built by replication (see replicate_layers); "tiny4" checks the replication on a tiny decoder
    "2.8b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=39, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "tiny4": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=8000),
}
# sizes exported with 2 layers, the second layer then copied in the ONNX graph with fresh weights
REPLICATED = {"2.8b", "tiny4"}
SEQ, WINDOWS = 128, 8
RUNS = (("onnxq", "default"), ("onnxq", "minmax"), ("onnxq", "default+blocks"), ("onnxq", "default+blocks256"), ("ort", "MinMax"))
CACHE = Path(os.environ.get("ONNXQ_CACHE", Path.home() / ".cache" / "onnxq")) / "scale"


def build(size: str) -> tuple[Path, Path]:
    """The cached decoder of ``size`` and its calibration .npz (exported on first use)."""
    folder = CACHE / size
    model, calib = folder / "model.onnx", folder / "calib.npz"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / "export"
        staging.mkdir(exist_ok=True)
        if size in REPLICATED:
            layers = SIZES[size]["num_hidden_layers"]
            _export({**SIZES[size], "num_hidden_layers": 2}, staging / "two.onnx")
            replicate_layers(staging / "two.onnx", staging / "model.onnx", layers)
            for name in ("two.onnx", "two.onnx.data"):
                (staging / name).unlink()
        else:
            _export(SIZES[size], staging / "model.onnx")
        os.replace(staging / "model.onnx.data", folder / "model.onnx.data")  # the data first: never a model without it
        os.replace(staging / "model.onnx", model)
    if not calib.exists():
        vocab = SIZES[size]["vocab_size"]
        np.savez(calib, input_ids=np.random.default_rng(0).integers(0, vocab, (WINDOWS, 1, SEQ)).astype(np.int64))
    return model, calib


def _export(fields: dict, path: Path) -> None:
    """``LlamaForCausalLM(fields)`` with seeded random weights, exported to ``path`` + ``.data``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**fields, max_position_embeddings=2 * SEQ, tie_word_embeddings=True, use_cache=False)
    net = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, SEQ))
    with torch.no_grad():
        program = torch.onnx.export(net, (ids,), dynamo=True, input_names=["input_ids"], output_names=["logits"])
    program.save(str(path), external_data=True)  # path + path.data


def replicate_layers(source: Path, dest: Path, layers: int) -> None:
    """The 2-layer decoder at ``source`` with its second layer repeated up to ``layers`` layers,
    written to ``dest`` (+ ``.data``) tensor by tensor: each copy's matrix weights are fresh seeded
    normal(0, 0.02) values (transformers' initializer range) generated only when written, its other
    constants (norm weights, rotary tables, shapes) shared with layer 1. Memory: the 2-layer
    model's weights (memory-mapped) and one generated matrix at a time."""
    import onnx_ir as ir

    from onnxq.calibrators.blocks import plan_blocks

    model = ir.load(source)
    blocks = plan_blocks(model, 0)  # embedding, (attention, MLP) per layer, final norm + head
    if len(blocks) != 6:
        raise SystemExit(f"{source}: expected 6 residual blocks in a 2-layer decoder, found {len(blocks)}")
    nodes = list(model.graph)
    layer = nodes[blocks[3].start : blocks[4].stop]
    (residual,) = blocks[2].outputs  # layer 0's output, layer 1's residual input
    (last_out,) = blocks[4].outputs
    values = {v.name: v for n in nodes for v in (*n.inputs, *n.outputs) if v is not None}
    current, anchor = values[last_out], layer[-1]
    for k in range(2, layers):
        copies = _copy_layer(layer, {residual: current}, k)
        model.graph.insert_after(anchor, copies)
        anchor = copies[-1]
        current = next(o for n in copies for o in n.outputs if o.name == f"{last_out}_l{k}")
    for node in nodes[blocks[5].start :]:
        for i, v in enumerate(node.inputs):
            if v is not None and v.name == last_out:
                node.replace_input_with(i, current)
    ir.save(model, dest, external_data=dest.name + ".data")


def _copy_layer(layer: list, mapped: dict, k: int) -> list:
    """Copies of ``layer``'s nodes as layer ``k``: inputs in ``mapped`` (by name) replaced, values
    made inside renamed ``<name>_l<k>``, matrix weights fresh lazy tensors, other inputs shared."""
    import onnx_ir as ir

    new: dict[int, ir.Value] = {}
    copies = []
    for node in layer:
        inputs = []
        for v in node.inputs:
            if v is None or id(v) in new:
                inputs.append(new.get(id(v)) if v is not None else None)
            elif v.name in mapped:
                inputs.append(mapped[v.name])
            elif v.const_value is not None and len(v.const_value.shape) == 2 and min(v.const_value.shape) >= 64:
                new[id(v)] = _fresh_weight(v, k, node.graph)
                inputs.append(new[id(v)])
            else:
                inputs.append(v)
        scope = {key: node.metadata_props[key].replace("model.layers.1", f"model.layers.{k}") for key in ("namespace", "pkg.torch.onnx.name_scopes") if key in node.metadata_props}
        copy = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), num_outputs=len(node.outputs), name=f"{node.name}_l{k}", overload=node.overload, version=node.version, metadata_props=scope)
        for old, out in zip(node.outputs, copy.outputs):
            out.name, out.type, out.shape = f"{old.name}_l{k}", old.type, old.shape
            new[id(old)] = out
        copies.append(copy)
    return copies


def _fresh_weight(value, k: int, graph):
    """A new initializer shaped like ``value`` holding seeded normal(0, 0.02) values, generated
    when the model is written."""
    import onnx_ir as ir

    shape, seed = tuple(value.const_value.shape), (k, zlib.crc32(value.name.encode()))  # stable across runs (hash() is salted)

    def generate():
        return ir.Tensor((np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(0.02)))

    init = ir.Value(name=f"{value.name}_l{k}", type=value.type, shape=value.shape, const_value=ir.LazyTensor(generate, dtype=value.const_value.dtype, shape=ir.Shape(shape)))
    graph.register_initializer(init)
    return init


def model_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in (model, Path(str(model) + ".data")) if p.exists())


# ------------------------------------------------------------------------------ jobs (children)
def _onnxq(model, calib, out, method):
    import onnxq
    from onnxq import emit, pipeline

    method, _, blocks = method.partition("+blocks")
    blocks = (blocks or "auto") if _ else None
    steps = {
        "load": (pipeline, "load_and_preprocess"), "build": (pipeline, "build"), "calibration": (pipeline, "_calibrate"),
        "emit": (emit, "emit"), "checker": (emit, "check_model"), "write": (pipeline, "_write_outputs"),
    }
    peaks: dict[str, float] = {}
    with step_peaks(steps, peaks):
        onnxq.quantize(model, out, calib, calib_method=None if method == "default" else method, calib_blocks=blocks, evaluate=False, report=False, quiet=True)
    out_bytes = sum(os.path.getsize(p) for p in (out, out + ".data") if os.path.exists(p))
    return {"step_peak_mb": {k: round(v) for k, v in peaks.items()}, "output_mb": round(out_bytes / 2**20)}


_ORT_STAGE = [""]  # where ORT's job is, for the report of a failure


def _ort(model, calib, out, _method):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out + ".pre.onnx"
    _ORT_STAGE[0] = "quant_pre_process"
    quant_pre_process(model, pre, skip_symbolic_shape=True, save_as_external_data=True)
    _ORT_STAGE[0] = "quantize_static"
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
    # onnxq maps files (ORT sessions, spilled boundaries): its address space says little about its
    # memory, so it is held by run()'s RSS watchdog alone
    if cap > 0 and tool == "ort":
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-scale-") as tmp:
        try:
            info = {"onnxq": _onnxq, "ort": _ort}[tool](model, calib, os.path.join(tmp, "q.onnx"), method) or {}
        except MemoryError:
            info = {"error": "out of memory"}
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            info = {"error": "out of memory" if any(s in text.lower() for s in ("bad_alloc", "memory", "allocat")) else text, "detail": text}
        if "error" in info and _ORT_STAGE[0]:
            info["error"] += f" (in {_ORT_STAGE[0]})"
    # per-step measurement resets VmHWM: the whole run's peak is the largest step's
    info.update(seconds=time.perf_counter() - t, peak_rss_mb=max(peak_rss_mb(), info.get("step_peak_mb", {}).get("whole", 0)))
    print(json.dumps(info), flush=True)


def run(tool, model, calib, method, cap_gb) -> dict:
    """One job in its own process; killed when its RSS passes ``cap_gb`` (a shared machine)."""
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxq-scale-") as cwd:  # ORT's tools may write side files to the cwd
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--job", tool, str(model), str(calib), method, str(cap_gb)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "ONNXQ_NO_PROGRESS": "1"}, cwd=cwd,
        )
        watch = _RssWatch(proc.pid, float(cap_gb) * 1024)
        watch.start()
        stdout, stderr = proc.communicate()
        watch.stop = True
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    out = json.loads(lines[-1]) if lines else {"error": (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:300]}
    if watch.killed_at:
        out = {"error": f"killed at the RSS cap ({watch.killed_at:.0f} MB)", "peak_rss_mb": watch.killed_at}
    out["wall_s"] = time.perf_counter() - t
    return out


class _RssWatch(threading.Thread):
    """Kills process ``pid`` when its resident memory passes ``cap_mb`` (0: never)."""

    def __init__(self, pid: int, cap_mb: float):
        super().__init__(daemon=True)
        self.pid, self.cap_mb, self.stop, self.killed_at = pid, cap_mb, False, 0.0

    def run(self) -> None:
        while not self.stop and self.cap_mb > 0:
            try:
                with open(f"/proc/{self.pid}/status") as status:
                    rss = next((int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmRSS:")), 0.0)
            except OSError:
                return
            if rss > self.cap_mb:
                self.killed_at = rss
                os.kill(self.pid, signal.SIGKILL)
                return
            time.sleep(0.1)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        job_main(*sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5b"], choices=list(SIZES))
    ap.add_argument("--cap-gb", type=float, default=12.0, help="memory cap of each job in GB: killed above it (RSS); ORT jobs also get it as address-space limit (0: none)")
    ap.add_argument("--runs", nargs="+", default=[f"{t}:{m}" for t, m in RUNS], help="tool:method pairs to run (default: all)")
    ap.add_argument("--out", default="scale.json")
    args = ap.parse_args()
    rows = []
    for size in args.sizes:
        model, calib = build(size)
        mb = model_bytes(model) / 2**20
        for tool, method in (r.split(":", 1) for r in args.runs):
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
    for r in rows:
        if "step_peak_mb" in r:
            print(f"{r['size']} onnxq {r['method']} peak RSS MB per step: " + ", ".join(f"{k} {v}" for k, v in r["step_peak_mb"].items()))
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
