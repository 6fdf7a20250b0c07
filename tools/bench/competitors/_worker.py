"""One competitor quantization, run by the competitor venv's python (see runners.py).

Usage: python _worker.py TOOL MODEL OUT CALIB JSON_OPTIONS
TOOL is modelopt or inc-smoothquant. Prints one JSON line: {"seconds": ..., "peak_rss_mb": ...}.
Imports only what the competitor venv has (numpy, onnx, onnxruntime, the competitor): never onnxq.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _job import _NpzReader  # noqa: E402
from _rss import peak_rss_mb  # noqa: E402


class NpzReader(_NpzReader):
    """The same samples ORT's quantize_static gets, plus the rewind/get_first ModelOpt and INC call."""

    def rewind(self):
        self.i = 0

    def get_first(self):
        i, self.i = self.i, 0
        try:
            return self.get_next()
        finally:
            self.i = i

    def __iter__(self):  # INC iterates its reader
        self.rewind()
        while (feed := self.get_next()) is not None:
            yield feed


def _reader(model, calib, n):
    import onnx

    graph = onnx.load(model, load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in graph.input if i.name not in initializers}
    return NpzReader(calib, n, ranks)


def run_modelopt(model, out, calib, opts):
    # ModelOpt rewrites its input file in place (node names): give it a copy, so the FP32 model the
    # benchmark scores against stays the file every other tool read
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as private:
        _modelopt_quantize(_copy_model(model, private), out, calib, opts)


def _copy_model(model, folder) -> str:
    """Copy the .onnx file and its external data files (not the rest of its folder) into folder."""
    import onnx

    src = Path(model)
    graph = onnx.load(src, load_external_data=False).graph
    files = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    for name in (src.name, *files):
        (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / name, Path(folder) / name)
    return str(Path(folder) / src.name)


def _modelopt_quantize(model, out, calib, opts):
    from modelopt.onnx.quantization import quantize

    kwargs = dict(
        quantize_mode=opts["precision"],
        calibration_data_reader=_reader(model, calib, opts.get("calib_samples")),
        calibration_eps=["cpu"],
        high_precision_dtype=opts.get("high_precision", "fp32"),
        output_path=out,
        log_level=opts.get("log_level", "WARNING"),
    )
    if opts.get("calibration_method"):
        kwargs["calibration_method"] = opts["calibration_method"]
    if opts["precision"] == "int4":  # weight-only: MatMul weights blocked INT4 (DQ), activations float
        kwargs["block_size"] = opts.get("block_size") or 128
    quantize(model, **kwargs)


def run_inc_smoothquant(model, out, calib, opts):
    from onnx_neural_compressor.quantization import QuantFormat, QuantType, config, quantize

    # W8A8 as onnxq's TensorRT target: symmetric INT8 activations and per-channel INT8 weights, QDQ
    cfg = config.StaticQuantConfig(
        calibration_data_reader=_reader(model, calib, opts.get("calib_samples")),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={
            "SmoothQuant": True,
            "SmoothQuantAlpha": opts.get("alpha", 0.5),
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
        },
    )
    quantize(model, out, cfg)


TOOLS = {"modelopt": run_modelopt, "inc-smoothquant": run_inc_smoothquant}


def main():
    tool, model, out, calib, options = sys.argv[1:6]
    opts = json.loads(options)
    tmp = out + ".partial.onnx"  # written next to OUT, renamed when complete
    start = time.perf_counter()
    TOOLS[tool](model, tmp, calib, opts)
    seconds = time.perf_counter() - start
    os.replace(tmp, out)
    # on a line of its own: INC's progress bar leaves stdout mid-line
    print("\n" + json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
