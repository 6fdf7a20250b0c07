"""A bounded uniform sample of activation rows, kept during the calibration pass.

SmoothQuant's α search simulates a group's quantized product on real activation rows (one row =
the channel vector at one position: a token, a pixel). Keeping every row would grow with the data,
so each tensor keeps a reservoir (Vitter's algorithm R) of at most ``capacity`` rows: every row
seen has the same chance of being kept, and memory is ``capacity × channels`` floats whatever the
number of samples.
"""

from __future__ import annotations

import numpy as np

DEFAULT_ROWS = 512


class RowReservoir:
    def __init__(self, axis: int, capacity: int = DEFAULT_ROWS, seed: int = 0):
        self.axis = axis
        self.capacity = capacity
        self.seen = 0
        self.rows: np.ndarray | None = None
        self._filled = 0
        self._rng = np.random.default_rng(seed)

    def update(self, value: np.ndarray) -> None:
        """Offer every row of ``value`` (channel axis ``self.axis``)."""
        rows = np.moveaxis(np.asarray(value, dtype=np.float32), self.axis, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        if self.rows is None:
            self.rows = np.empty((self.capacity, rows.shape[1]), dtype=np.float32)
        elif self.rows.shape[1] != rows.shape[1]:
            return  # a different channel count: not the tensor the reservoir was made for
        take = min(self.capacity - self._filled, len(rows))
        if take > 0:
            self.rows[self._filled : self._filled + take] = rows[:take]
            self._filled += take
            self.seen += take
            rows = rows[take:]
        if len(rows):
            # row t (0-based over all rows seen) replaces a random slot with probability capacity / (t + 1)
            # one 64-bit draw per row (not Generator.integers, whose 32-bit draws are buffered per
            # call): the rows kept do not depend on how the rows were split into batches
            t = self.seen + np.arange(len(rows))
            slots = np.floor(self._rng.random(len(rows)) * (t + 1)).astype(np.int64)
            keep = slots < self.capacity
            self.rows[slots[keep]] = rows[keep]
            self.seen += len(rows)

    def sample(self) -> np.ndarray:
        """The kept rows, ``[n, channels]`` (n ≤ capacity)."""
        if self.rows is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self.rows[: self._filled]
