"""Peak resident memory of this process, whole and per step.

getrusage's ru_maxrss survives exec on Linux: a job started from a large parent reports the
parent's size. VmHWM belongs to the process's own address space, so it is the job's own peak.
Writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS, which gives per-step peaks.
"""

from __future__ import annotations

import contextlib
import functools
import resource
from collections.abc import Iterator


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> bool:
    """Start a new peak at the current RSS (False where the kernel does not allow it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def step_peaks(targets: dict[str, tuple[object, str]], peaks: dict[str, float]) -> Iterator[None]:
    """While the body runs, each ``name -> (owner, attribute)`` function records in ``peaks[name]``
    the largest peak RSS (MB) seen during its calls (the peak is reset when one starts; the
    overall peak is kept in ``peaks['whole']``)."""
    saved, active = {}, []  # active: the steps running now, outermost first (steps nest)

    def note(names):
        now = peak_rss_mb()
        for name in names:
            peaks[name] = max(peaks.get(name, 0.0), now)

    def wrap(name, fn):
        @functools.wraps(fn)
        def measured(*args, **kwargs):
            note(["whole", *active])  # what the enclosing steps reached before this one starts
            reset_peak()
            active.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                note(["whole", *active])
                active.pop()

        return measured

    for name, (owner, attr) in targets.items():
        saved[name] = getattr(owner, attr)
        setattr(owner, attr, wrap(name, saved[name]))
    try:
        yield
    finally:
        for name, (owner, attr) in targets.items():
            setattr(owner, attr, saved[name])
        peaks["whole"] = max(peaks.get("whole", 0.0), peak_rss_mb())
