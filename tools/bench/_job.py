"""One benchmark job in its own process, so its peak RSS is its own.

Usage: python _job.py onnxq|ort MODEL OUT CALIB TARGET [CALIB_SAMPLES]
Prints one JSON line: {"seconds": ..., "peak_rss_mb": ...}.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _rss import peak_rss_mb  # noqa: E402


def run_onnxq(model, out, calib, target, n):
    import onnxq

    # MinMax, as ORT is run: the comparison is of placement and Q/DQ form, not of range methods
    onnxq.quantize(model, out, calib, target=target, method="minmax", calib_samples=n, report=False, evaluate=False, quiet=True)


class _NpzReader:
    """ORT's CalibrationDataReader over an .npz (one array per input, leading axis = samples)."""

    def __init__(self, path, n, input_ranks):
        self.data = np.load(path)
        self.n = n or len(next(iter(self.data.values())))
        self.ranks = input_ranks
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        feed = {}
        for k, rank in self.ranks.items():
            arr = self.data[k]
            feed[k] = arr[self.i : self.i + 1] if arr.ndim == rank else np.asarray(arr[self.i])
        self.i += 1
        return feed


def run_ort(model, out, calib, target, n):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out + ".pre.onnx"
    try:
        quant_pre_process(model, pre, skip_symbolic_shape=False)
    except Exception:  # ORT's symbolic shape inference gives up on some exporter outputs
        quant_pre_process(model, pre, skip_symbolic_shape=True)
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in onnx.load(pre, load_external_data=False).graph.input}
    symmetric = target == "tensorrt"
    quantize_static(
        pre,
        out,
        _NpzReader(calib, n, ranks),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    os.remove(pre)


def main():
    tool, model, out, calib, target = sys.argv[1:6]
    n = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "all" else None
    t = time.perf_counter()
    {"onnxq": run_onnxq, "ort": run_ort}[tool](model, out, calib, target, n)
    seconds = time.perf_counter() - t
    peak = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
