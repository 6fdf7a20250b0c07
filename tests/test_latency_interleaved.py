"""check's latencies are timed in interleaved rounds: every model runs once per round (the order
reversed every other round), so load that changes during the measurement reaches all alike."""

from __future__ import annotations

import time

import numpy as np

from onnxq.runtime.runners import measure_latencies


class Recorder:
    """A runner that logs each call into a shared list and takes ``seconds`` per call."""

    def __init__(self, name: str, calls: list, seconds: float):
        self.name, self.calls, self.seconds = name, calls, seconds

    def infer(self, feed, check_inputs=False):
        self.calls.append(self.name)
        time.sleep(self.seconds)
        return {}

    def last_inference_time(self):
        return None  # measured by the caller's clock


def test_rounds_interleave_and_alternate_order():
    calls: list[str] = []
    runners = [Recorder(n, calls, 0.0) for n in "abc"]
    lats = measure_latencies(runners, {}, warmup=2, runs=4)
    assert calls[:6] == list("aabbcc")  # warm-up, model by model
    assert calls[6:] == list("abc" "cba" "abc" "cba")
    assert [lat.runs for lat in lats] == [4, 4, 4]


def test_each_model_gets_its_own_times():
    calls: list[str] = []
    fast, slow = Recorder("fast", calls, 0.001), Recorder("slow", calls, 0.02)
    lat_fast, lat_slow = measure_latencies([fast, slow], {}, warmup=0, runs=5)
    assert lat_slow.median_ms > 5 * lat_fast.median_ms
    assert np.isfinite(lat_fast.p99_ms) and lat_slow.median_ms >= 20
