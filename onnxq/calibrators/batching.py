"""Calibration samples run as batches: consecutive feeds concatenated along the batch axis.

One ORT call over N samples costs less than N calls (per-call overhead, better kernel
utilisation), and the statistics are updated once per tensor and batch. Every statistic the
collector keeps is batch-split invariant: min/max and per-channel reductions are maxima over all
elements, the histogram's bins depend only on the largest ``|x|`` (merging is exact), and the row
reservoir offers rows in the same order. So a batched pass gives the per-sample pass's table, up
to the float rounding of ORT's kernels at another batch size.

Batching needs a dynamic leading axis on every model input; feeds of different shapes (other
sequence lengths) start a new batch. :func:`auto_batch` picks the default size from the memory
one sample's fetched tensors take.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

# The automatic batch: at most this many samples, and fetched tensors of at most this many bytes
# per batch (ORT's intermediate buffers come on top, roughly as much again).
MAX_AUTO_BATCH = 16
AUTO_BATCH_BYTES = 256 << 20

Feed = Mapping[str, np.ndarray]


class BatchFeed(dict):
    """One ORT call's feed that already holds ``samples`` samples (a batch replayed as it was run)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], samples: int):
        super().__init__(arrays)
        self.samples = samples


def sample_count(feeds: Sequence[Feed]) -> int:
    """Samples in a batch of ``feeds``: one per feed, or what a :class:`BatchFeed` holds."""
    return sum(getattr(f, "samples", 1) for f in feeds)


def batchable(spec: Mapping[str, tuple[type, list | None]]) -> bool:
    """Whether every model input has a dynamic leading (batch) axis (None or a symbolic name)."""
    return bool(spec) and all(shape is not None and len(shape) >= 1 and not isinstance(shape[0], int) for _, shape in spec.values())


def _signature(feed: Feed) -> tuple:
    return tuple((name, arr.shape[1:], arr.dtype.str) for name, arr in feed.items())


def concat(feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """Feeds of the same shapes concatenated along axis 0."""
    if len(feeds) == 1:
        return dict(feeds[0])
    return {name: np.concatenate([f[name] for f in feeds], axis=0) for name in feeds[0]}


def group(feeds: Iterable[Feed], size: int) -> Iterator[list[Feed]]:
    """Consecutive feeds in lists of at most ``size``; a feed of other shapes starts a new list."""
    pending: list[Feed] = []
    for feed in feeds:
        if pending and (len(pending) >= size or _signature(feed) != _signature(pending[0])):
            yield pending
            pending = []
        pending.append(feed)
    if pending:
        yield pending


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 4 GiB when unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_batch(sample_bytes: int, samples: int | None) -> int:
    """The default batch size: what keeps a batch's fetched tensors within
    min(AUTO_BATCH_BYTES, 1/8 of the available memory), at most MAX_AUTO_BATCH and the sample count."""
    budget = min(AUTO_BATCH_BYTES, available_memory() // 8)
    size = max(1, budget // max(sample_bytes, 1))
    size = min(size, MAX_AUTO_BATCH)
    return int(min(size, samples) if samples else size)


def cpu_count() -> int:
    """Cores this process may run on (the ORT intra-op thread count of the calibration session)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
