"""Streaming mean / variance / min / max (Welford per batch, Chan et al. to merge), serialisable to JSON."""
from __future__ import annotations

import numpy as np


class RunningStats:
    def __init__(self, dim: int | None = None):
        shape = () if dim is None else (dim,)
        self.count = 0
        self.mean = np.zeros(shape, np.float64)
        self.m2 = np.zeros(shape, np.float64)
        self.min = np.full(shape, np.inf)
        self.max = np.full(shape, -np.inf)

    def update(self, batch: np.ndarray) -> None:
        """Add rows of ``batch`` (shape (n,) for scalars or (n, dim))."""
        batch = np.asarray(batch, np.float64)
        if len(batch) == 0:
            return
        other = RunningStats()
        other.count, other.mean = len(batch), batch.mean(0)
        other.m2 = ((batch - other.mean) ** 2).sum(0)
        other.min, other.max = batch.min(0), batch.max(0)
        self.merge(other)

    def merge(self, other: RunningStats) -> None:
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)
        self.count = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))

    def to_dict(self) -> dict:
        return {k: np.asarray(getattr(self, k)).tolist() for k in ("mean", "m2", "min", "max")} | {"count": self.count}

    @classmethod
    def from_dict(cls, d: dict) -> RunningStats:
        s = cls()
        s.count = int(d["count"])
        for k in ("mean", "m2", "min", "max"):
            setattr(s, k, np.asarray(d[k], np.float64))
        return s
