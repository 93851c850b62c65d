"""Rows per forward: the one knob that bounds memory and sets throughput.

- A user cap (``internal_batch_size`` / ``max_rows``) is never exceeded.
- CUDA: the first chunk is a small probe; its peak allocated memory per row sizes
  every later chunk to the memory budget (default: half the free device memory).
- CPU: the best chunk is cache-bound, not memory-bound (a 32x32 CNN ran 1.7x slower at
  1024 rows than at 256 on 2 cores), so rows start small and double until measured
  throughput clearly drops, then settle on the best size seen. The first chunk warms
  up the model's kernels and is not timed; each size is timed over CPU_MIN_SECONDS.
Every chunk is real work: probing costs no extra forward.
"""

from __future__ import annotations

import logging
import time

import torch

from .errors import OptionError

logger = logging.getLogger(__name__)

CUDA_PROBE_ROWS = 16
CUDA_BUDGET_FRACTION = 0.5
CUDA_HEADROOM = 0.9  # allocator fragmentation
CPU_START_BYTES = 256 * 2**10  # first size: about this much interpolated input per chunk
CPU_START_ROWS = 32  # ... but at least this many rows
CPU_MAX_ROWS = 16384
CPU_MIN_SECONDS = 0.1  # time a size over at least this long before judging it (timer and neighbour noise)
CPU_GIVE_UP = 0.85  # stop doubling once a size runs below 85% of the best rate seen


def parse_bytes(value: int | str | None) -> int | None:
    """'4GiB', '512MB', '1e9' or an int -> bytes."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    text = str(value).strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        if unit not in units:
            raise ValueError
        return int(float(number) * units[unit])
    except ValueError:
        raise OptionError(f"cannot parse memory size {value!r}; use e.g. '8GiB', '512MB' or a number of bytes") from None


# Sizes settled by earlier passes, keyed by what determines them (model, row shapes,
# device, precision, budget), so a loop over batches -- a dataset run, or a user calling
# attribute() per batch -- tunes once instead of on every call. A hint only: a stale
# entry costs speed, never correctness.
_settled: dict[tuple, int] = {}


class RowPlanner:
    """Decides the rows of each chunk of a pass over ``total`` rows."""

    def __init__(
        self,
        device: torch.device,
        total: int,
        max_rows: int | None = None,
        memory_budget: int | str | None = None,
        row_bytes: int = 0,
        key: tuple | None = None,
    ) -> None:
        self.device = device
        self.total = total
        self.cap = min(max_rows or total, total)
        self.memory_budget = parse_bytes(memory_budget)
        self.tuning = max_rows is None or max_rows > CPU_START_ROWS
        self.key = None if key is None else (*key, str(device), self.memory_budget)
        if self.tuning and self.key in _settled:
            self.rows, self.tuning = min(self.cap, _settled[self.key]), False
        elif device.type == "cuda":
            self.rows = min(self.cap, CUDA_PROBE_ROWS) if self.tuning else self.cap
        else:
            start = max(CPU_START_ROWS, min(CPU_MAX_ROWS, CPU_START_BYTES // max(1, row_bytes)))
            self.rows = min(self.cap, start) if self.tuning else self.cap
        self._best: tuple[float, int] | None = None
        self._t0 = 0.0
        self._base = 0
        self._warm = device.type == "cuda"
        self._timed = (0, 0.0)  # rows and seconds measured at the current size

    def _settle(self, rows: int) -> None:
        if self.key is not None:
            _settled[self.key] = rows

    def begin(self) -> None:
        if not self.tuning:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        self._t0 = time.perf_counter()

    def end(self, rows_done: int) -> None:
        if not self.tuning or rows_done < self.rows:  # a short last chunk says nothing
            return
        if self.device.type == "cuda":
            per_row = max(1, (torch.cuda.max_memory_allocated(self.device) - self._base) // rows_done)
            budget = self.memory_budget
            if budget is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * CUDA_BUDGET_FRACTION)
            fit = max(1, int(budget * CUDA_HEADROOM) // per_row)
            self.rows, self.tuning = min(self.cap, fit), False
            self._settle(fit)
            logger.debug("CUDA probe: %d bytes/row -> %d rows per forward", per_row, self.rows)
            return
        elapsed = time.perf_counter() - self._t0
        if not self._warm:
            self._warm = True
            return
        rows, seconds = self._timed[0] + rows_done, self._timed[1] + elapsed
        if seconds < CPU_MIN_SECONDS:
            self._timed = (rows, seconds)
            return
        self._timed = (0, 0.0)
        rate = rows / seconds
        if self._best is None or rate > self._best[0]:
            self._best = (rate, self.rows)
        grown = min(self.cap, CPU_MAX_ROWS, self.rows * 2)
        if rate < self._best[0] * CPU_GIVE_UP or grown == self.rows:
            self.rows = self._best[1]
            self.tuning = False
            if rate < self._best[0] * CPU_GIVE_UP or grown == CPU_MAX_ROWS:  # a real optimum, not the pass's end
                self._settle(self.rows)
            logger.debug("CPU tuning: %d rows per forward (%.0f rows/s)", self.rows, self._best[0])
        else:
            self.rows = grown
