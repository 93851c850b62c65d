"""Sets of global sample indices as sorted [start, stop) ranges: merge, complement, runs, text."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged [start, stop) ranges (touching ranges are joined, empty ones dropped)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def complement_ranges(ranges: Iterable[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """Sorted [start, stop) ranges of [0, total) that no range covers."""
    out: list[tuple[int, int]] = []
    pos = 0
    for a, b in merge_ranges(ranges):
        if a > pos:
            out.append((pos, min(a, total)))
        pos = max(pos, b)
    if pos < total:
        out.append((pos, total))
    return [(a, b) for a, b in out if a < b]


def value_runs(values: np.ndarray) -> list[tuple[int, int]]:
    """Sorted integers -> [start, stop) runs of consecutive values (for readable messages)."""
    if values.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(values) != 1)
    starts = np.concatenate(([values[0]], values[breaks + 1]))
    stops = np.concatenate((values[breaks], [values[-1]])) + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def format_ranges(ranges: list[tuple[int, int]], limit: int = 5) -> str:
    """'[a, b), [c, d) and N more' for messages."""
    text = ", ".join(f"[{a}, {b})" for a, b in ranges[:limit])
    return text + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")
