"""Reading an .npz sample by sample: time must grow linearly with the number of samples.

    PYTHONPATH=$PWD python tools/bench/npz_streaming.py [--mb 100] [--compressed]

Writes a ~100 MB npz of 25,600 samples of shape (1, 16, 8, 8) float32 to a temporary folder, then
iterates 64 and 2048 samples through ``onnxq.data.open_source`` (what calibration does) and prints
both times and their ratio (32 = linear). Before members were memory-mapped, every sample read the
whole member again (issue 13: 151 s for 2048 samples of a 100 MB npz).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxq.data import open_source


def _time(path: Path, n: int) -> float:
    spec = {"x": (np.float32, [1, 16, 8, 8])}
    t = time.perf_counter()
    count = sum(1 for _ in open_source(path, spec, limit=n))
    assert count == n
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--compressed", action="store_true")
    args = parser.parse_args()
    samples = args.mb * (1 << 20) // (16 * 8 * 8 * 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.npz"
        x = np.random.default_rng(0).normal(size=(samples, 16, 8, 8)).astype(np.float32)
        (np.savez_compressed if args.compressed else np.savez)(path, x=x)
        del x
        _time(path, 1)  # imports (ONNX Runtime, for the feed checks) and the page cache
        small, large = _time(path, 64), _time(path, 2048)
    print(f"{samples} samples, {args.mb} MB{' compressed' if args.compressed else ''}: 64 samples {small:.3f} s, "
          f"2048 samples {large:.3f} s, ratio {large / small:.1f} (32 = linear)")


if __name__ == "__main__":
    main()
