"""Bounded-memory summaries over a run's samples: ``Distribution`` (one scalar per sample) and
``Flagged`` (how many samples have a problem of each kind, and the first few by global index)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .definitions import NAMED, QUANTILES, RESERVOIR

__all__ = ["Distribution", "Flagged"]


class Distribution:
    """Bounded-memory summary of one scalar per sample: moments, histogram, reservoir quantiles."""

    def __init__(self, edges: np.ndarray, reservoir: int = RESERVOIR, seed: int = 0) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.underflow = 0  # below the first edge (zeros on a log scale)
        self.overflow = 0
        self.count = 0  # finite values seen
        self.nonfinite = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._cap = int(reservoir)
        self._res = np.empty(self._cap, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(v)
        self.nonfinite += int((~finite).sum())
        v = v[finite]
        if not v.size:
            return
        self._sum += float(v.sum())
        self._sumsq += float(np.square(v).sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        self.underflow += int((v < self.edges[0]).sum())
        self.overflow += int((v > self.edges[-1]).sum())
        inside = v[(v >= self.edges[0]) & (v <= self.edges[-1])]
        self.counts += np.histogram(inside, bins=self.edges)[0]
        # Algorithm R, vectorised: value number i (0-based) replaces slot j ~ U[0, i] when j < cap.
        pos = self.count + np.arange(v.size)
        fill = pos < self._cap
        self._res[pos[fill]] = v[fill]
        rest = ~fill
        if rest.any():
            j = np.floor(self._rng.random(int(rest.sum())) * (pos[rest] + 1)).astype(np.int64)
            keep = j < self._cap
            self._res[j[keep]] = v[rest][keep]
        self.count += v.size

    @property
    def mean(self) -> float:
        return self._sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        held = self._res[: min(self.count, self._cap)]
        return float(np.quantile(held, q)) if held.size else math.nan

    def to_dict(self) -> dict[str, Any]:
        var = max(self._sumsq / self.count - self.mean**2, 0.0) if self.count else math.nan
        return {
            "count": self.count,
            "nonfinite": self.nonfinite,
            "mean": self.mean,
            "std": math.sqrt(var) if self.count else math.nan,
            "min": self.min if self.count else math.nan,
            "max": self.max if self.count else math.nan,
            "quantiles": {f"p{round(q * 100):02d}": self.quantile(q) for q in QUANTILES},
            "quantiles_exact": self.count <= self._cap,
            "histogram": {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "underflow": self.underflow, "overflow": self.overflow},
        }


class Flagged:
    """Per kind of problem: the number of samples that have it and the first ``keep`` of their
    global indices (so a report can name them), plus the same for samples with any kind."""

    def __init__(self, kinds: Sequence[str], keep: int = NAMED) -> None:
        self.keep = keep
        self.count = {k: 0 for k in (*kinds, "any")}
        self.index: dict[str, list[int]] = {k: [] for k in self.count}

    def add(self, index: np.ndarray, flags: Mapping[str, np.ndarray]) -> None:
        """``index``: (rows,) global indices; ``flags``: kind -> (rows,) booleans."""
        index = np.asarray(index).reshape(-1)
        flags = {**flags, "any": np.logical_or.reduce([np.asarray(f, dtype=bool) for f in flags.values()])}
        for kind, f in flags.items():
            self.count[kind] += int(f.sum())
            room = self.keep - len(self.index[kind])
            if room > 0 and f.any():
                self.index[kind].extend(int(i) for i in index[f][:room])
