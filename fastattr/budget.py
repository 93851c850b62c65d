"""Rows per forward: the one knob that bounds memory and sets throughput.

- A user cap (``internal_batch_size`` / ``max_rows``) is never exceeded.
- CUDA: the first chunk is a small probe; its peak allocated memory per row sizes
  every later chunk to the memory budget (default: half the free device memory).
- CPU: the best chunk is cache-bound, not memory-bound (a 32x32 CNN ran 1.7x slower at
  1024 rows than at 256 on 2 cores), so rows start small and double while doubling pays:
  tuning stops at the first doubling that gains no more than CPU_TOLERANCE, and the size kept
  is the SMALLEST within CPU_TOLERANCE of the best rate measured (``pick_rows``). A larger size
  that is no faster only costs memory: issue 16 measured ResNet-50 at 3-5x the memory of 64
  rows for the same throughput under the old rule (double until a size ran below 85% of the
  best, keep the best seen), whose tuning chunks far past the plateau also set the peak; and
  a noisy ratio now errs towards the smaller size. The first chunk warms up the model's kernels
  and is not timed. Sizes are compared in pairs (r, 2r) measured ALTERNATELY, window by window
  (a window: chunks of one size over at least CPU_WINDOW_SECONDS), CPU_WINDOWS windows each,
  each size rated by its best window: other jobs on a shared host slow both sizes of a pair
  alike and only ever slow a window down. Rates are kept relative to the first size (the
  product of the pairs' ratios), so a busy minute between two pairs does not skew the choice.
  A pass too short for the ladder leaves its progress for the next pass with the same key.
- CPU memory: rows are also bounded by a host memory budget (``memory_budget``, default
  HOST_BUDGET_FRACTION of MemAvailable in /proc/meminfo). The bytes a row needs are estimated
  on the warm-up chunk from the tensors autograd saves for the backward (``watch``: a
  saved_tensors_hooks pack hook summing distinct storages of per-row tensors; weights and
  other constants excluded, ``saved_bytes_counter``), times
  HOST_PEAK_FACTOR for the backward's gradients and allocator slack (peak RSS / saved bytes
  measured 1.2-1.6 on ResNet-50 and a ViT; benchmarks/RESULTS.md). Cheap (no copies, no RSS
  sampling) and deterministic, unlike RSS growth under other threads' allocations.
- ``fixed=True`` (torch.compile'd models, fastattr/engine.py): one row count for every chunk
  of every pass (the engine pads short chunks up to it), so the model is not recompiled per
  size: the user cap, else on the CPU the start size (no doubling; bounded by the host memory
  budget from the first chunk's estimate: over it, one smaller size, then remembered), on CUDA
  the probe's fit (one extra size, then remembered), at most FIXED_MAX_ROWS.
Every chunk is real work: probing costs no extra forward.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import OptionError

logger = logging.getLogger(__name__)

CUDA_PROBE_ROWS = 16
CUDA_BUDGET_FRACTION = 0.5
CUDA_HEADROOM = 0.9  # allocator fragmentation
CPU_START_BYTES = 256 * 2**10  # first size: about this much interpolated input per chunk
CPU_START_ROWS = 16  # ... but at least this many rows
CPU_TUNE_ABOVE = 32  # a user cap at or below this many rows is used as it is, not tuned below
CPU_MAX_ROWS = 16384
CPU_WINDOW_SECONDS = 0.05  # time a size over windows at least this long (timer and neighbour noise)
CPU_WINDOWS = 2  # ... this many per size of a pair, alternating; a size's rate is its best window's
CPU_TOLERANCE = 0.05  # stop doubling when it gains no more than 5%; keep the smallest size within 5% of the best
HOST_BUDGET_FRACTION = 0.5  # CPU default memory budget: this share of MemAvailable
HOST_PEAK_FACTOR = 2.0  # peak bytes per row / saved-tensor bytes per row (measured 1.2-1.6; slack)
FIXED_MAX_ROWS = 512  # fixed=True: the largest size (short chunks are padded up to it)


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
    except (ValueError, OverflowError):  # OverflowError: "inf", "1e400"
        raise OptionError(f"cannot parse memory size {value!r}; use e.g. '8GiB', '512MB' or a number of bytes") from None


def host_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_budget() -> int | None:
    """The default CPU memory budget: HOST_BUDGET_FRACTION of the memory available now."""
    available = host_available()
    return None if available is None else int(available * HOST_BUDGET_FRACTION)


def pick_rows(rates: dict[int, float], tolerance: float = CPU_TOLERANCE) -> int:
    """The smallest measured size whose rate (rows/s) is within ``tolerance`` of the best."""
    best = max(rates.values())
    return min(rows for rows, rate in rates.items() if rate >= best * (1 - tolerance))


@contextlib.contextmanager
def saved_bytes_counter(rows: int | None = None) -> Iterator[dict[int, int]]:
    """Count the distinct storages autograd saves for the backward inside the block. Yields
    {storage address: bytes}; sum its values afterwards. Counted: tensors on the gradient's path
    (they require grad: activations, the input rows) and integer / bool ones (max-pool indices,
    dropout masks); not float tensors off the path: weights, their transposes and autocast copies,
    BatchNorm statistics (the same for any row count). Several views of one storage count once.
    ``rows``: also float tensors whose first dim is that row count (a compiled model's AOT graph
    saves its activations detached, off the gradient's path)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        per_row = rows is not None and t.dim() > 0 and t.shape[0] == rows
        if t.device.type == "cpu" and (t.requires_grad or per_row or not (t.is_floating_point() or t.is_complex())):
            with contextlib.suppress(RuntimeError):  # a tensor without storage (sparse, ...)
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_next_identity = itertools.count()


def identity(obj: object) -> object:
    """A planner key for a model or forward function that no other object ever gets: ``id()`` is
    reused once its object is freed, and a new, larger model inheriting a freed one's settled rows
    would run out of CUDA memory. A bound method is its object's and function's identities (each
    attribute access makes a new method object); objects without weak references fall back to id()."""
    if inspect.ismethod(obj):
        return (identity(obj.__self__), identity(obj.__func__))
    try:
        token = _identities.get(obj)
        if token is None:
            token = _identities[obj] = next(_next_identity)
        return token
    except TypeError:  # not weak-referenceable (or unhashable)
        return ("id", id(obj))


# Sizes settled by earlier passes, keyed by what determines them (model, row shapes,
# device, precision, budget), so a loop over batches -- a dataset run, or a user calling
# attribute() per batch -- tunes once instead of on every call. A hint only: a stale
# entry costs speed, never correctness.
_settled: dict[tuple, int] = {}


@dataclass
class _Tuning:
    """CPU tuning state, kept per key between passes until a size settles (``_progress``)."""

    pair: tuple[int, int]  # (incumbent, challenger = twice it) being compared
    rel: dict[int, float] = field(default_factory=dict)  # size -> rate relative to the first size compared
    windows: dict[int, list[float]] = field(default_factory=dict)  # the pair's window rates (rows/s)
    row_peak_bytes: int | None = None


def forget(device: torch.device) -> None:
    """Drop every size settled or being tuned on ``device``: after an out-of-memory error there the
    remembered sizes may not fit any more (a later call, which has no retry, would start at the size
    that failed), so the next pass measures again."""
    name = str(device)
    for table in (_settled, _progress):
        for key in [k for k in table if len(k) >= 2 and k[-2] == name]:  # keys end (..., device, budget)
            del table[key]


# CPU tuning not finished when its pass ended (a pass shorter than the ladder of sizes: a dataset
# run's batches), per key as above; the next pass goes on from there.
_progress: dict[tuple, _Tuning] = {}


class RowPlanner:
    """Decides the rows of each chunk of a pass over ``total`` rows.

    ``row_peak_bytes``: peak bytes one row needs on the CPU, if known (tests inject it); else
    measured on the first chunk through ``watch``."""

    def __init__(
        self,
        device: torch.device,
        total: int,
        max_rows: int | None = None,
        memory_budget: int | str | None = None,
        row_bytes: int = 0,
        key: tuple | None = None,
        *,
        fixed: bool = False,
        row_peak_bytes: int | None = None,
    ) -> None:
        self.device = device
        self.total = total
        self.fixed = fixed
        # fixed: chunks are padded up to the size, so it is not clamped to this pass's total
        self.cap = (max_rows or FIXED_MAX_ROWS) if fixed else min(max_rows or total, total)
        self.user_cap = max_rows is not None and max_rows < total
        self.memory_budget = parse_bytes(memory_budget)
        self.tuning = max_rows is None or max_rows > CPU_TUNE_ABOVE
        self.key = None if key is None else (*key, str(device), self.memory_budget)
        self.row_peak_bytes = row_peak_bytes
        self.limit: int | None = None  # most rows the CPU memory budget allows, once known
        self._t0 = 0.0
        self._base = 0
        self._warm = device.type == "cuda"
        self._window = (0, 0.0)  # rows and seconds of the window in progress
        self._saved: dict[int, int] | None = None
        self._state: _Tuning | None = None
        self._measure_fixed = False  # fixed on the CPU: the first chunk measures the memory a row needs
        cpu_cap = fixed and max_rows is not None and device.type != "cuda"  # a compiled model's cap on the CPU: used as it is
        if self.tuning and self.key in _settled and not cpu_cap:
            self.rows, self.tuning = min(self.cap, _settled[self.key]), False
        elif device.type == "cuda":
            self.rows = min(self.cap, CUDA_PROBE_ROWS) if self.tuning else self.cap
        elif fixed:  # a compiled model on the CPU: one size, no doubling (each size is a compile)
            start = max(CPU_START_ROWS, min(FIXED_MAX_ROWS, CPU_START_BYTES // max(1, row_bytes)))
            self.rows, self.tuning = max_rows or start, False
            if max_rows is None and row_peak_bytes is not None:
                self._bound(row_peak_bytes)
            else:  # the memory budget bounds it too: over it, the size drops once after the first chunk (one more compile)
                self._measure_fixed = max_rows is None
        elif self.tuning and self.key in _progress:  # an earlier pass's tuning, unfinished
            self._resume(_progress[self.key])
        else:
            start = max(CPU_START_ROWS, min(CPU_MAX_ROWS, CPU_START_BYTES // max(1, row_bytes)))
            self.rows = min(self.cap, start) if self.tuning else self.cap
            if self.tuning and row_peak_bytes is not None:
                self._bound(row_peak_bytes)

    # ------------------------------------------------------------------ CPU state
    def _settle(self, rows: int) -> None:
        if self.key is not None:
            _settled[self.key] = rows
            _progress.pop(self.key, None)

    def _ceiling(self) -> int:
        """The largest size tuning may try: CPU_MAX_ROWS, the memory limit, a user cap."""
        top = min(CPU_MAX_ROWS, self.limit or CPU_MAX_ROWS)
        return min(top, self.cap) if self.user_cap else top

    def _bound(self, per_row: int) -> None:
        """Cap rows to the CPU memory budget at ``per_row`` peak bytes per row."""
        budget = self.memory_budget if self.memory_budget is not None else host_budget()
        if budget is None:
            return
        self.limit = max(1, budget // max(1, per_row))
        self.cap = min(self.cap, self.limit)
        self.rows = min(self.rows, self.cap)
        logger.debug("CPU memory: %d bytes/row, budget %d bytes -> at most %d rows per forward", per_row, budget, self.limit)

    def _start_pair(self, incumbent: int) -> None:
        """Compare ``incumbent`` with twice it next; stop where no larger size may be tried."""
        ceiling = self._ceiling()
        challenger = min(incumbent * 2, ceiling)
        if challenger <= incumbent:  # at the size or memory ceiling: settled (a user cap is this call's only)
            self._finish(settle=not (self.user_cap and ceiling == self.cap))
            return
        self._state.pair, self._state.windows = (incumbent, challenger), {}
        self._go_on()

    def _go_on(self) -> None:
        """Run the pair's size with fewer windows, or stop for this pass if the pass cannot hold it."""
        inc, ch = self._state.pair
        if ch > self.cap:  # this pass is too short for the challenger: the next pass measures it
            self._keep()
            self._finish(settle=False)
            return
        w = self._state.windows
        self.rows = ch if len(w.get(ch, ())) < len(w.get(inc, ())) else inc
        self._keep()

    def _finish(self, settle: bool) -> None:
        rel = self._state.rel if self._state is not None else {}
        self.rows = min(self.cap, pick_rows(rel)) if rel else min(self.cap, self.rows)
        self.tuning = False
        if settle:
            self._settle(self.rows)
        logger.debug("CPU tuning: %d rows per forward (relative rates %s)", self.rows, {r: round(v, 3) for r, v in rel.items()})

    def _keep(self) -> None:
        if self.key is not None and self._state is not None:
            self._state.row_peak_bytes = self.row_peak_bytes
            _progress[self.key] = self._state

    def _resume(self, state: _Tuning) -> None:
        """Continue tuning where an earlier pass stopped (warm kernels: no warm-up chunk)."""
        self._state, self._warm = state, True
        self.rows = state.pair[0]
        if state.row_peak_bytes is not None:
            self.row_peak_bytes = state.row_peak_bytes
            self._bound(state.row_peak_bytes)
        self._go_on()

    # ------------------------------------------------------------------ per chunk
    def watch(self) -> contextlib.AbstractContextManager:
        """Wrap a chunk's forward (and backward): on the CPU's warm-up chunk, count what autograd
        saves, for the per-row memory estimate (module docstring)."""
        if self._measure_fixed:
            return self._count(self.rows)
        if self.device.type == "cuda" or not self.tuning or self._warm or self.row_peak_bytes is not None:
            return contextlib.nullcontext()
        return self._count()

    @contextlib.contextmanager
    def _count(self, rows: int | None = None) -> Iterator[None]:
        with saved_bytes_counter(rows) as seen:
            yield
        self._saved = seen

    def begin(self) -> None:
        if not self.tuning:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        self._t0 = time.perf_counter()

    def end(self, rows_done: int) -> None:
        if self._measure_fixed:  # fixed: bound by the memory budget, settled for the next passes
            self._measure_fixed = False
            if self._saved:
                self._bound(int(sum(self._saved.values()) * HOST_PEAK_FACTOR / max(1, rows_done)))
            self._saved = None
            self._settle(self.rows)
            return
        if not self.tuning or rows_done < self.rows:  # a short last chunk says nothing
            return
        if self.device.type == "cuda":
            per_row = max(1, (torch.cuda.max_memory_allocated(self.device) - self._base) // rows_done)
            budget = self.memory_budget
            if budget is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                # plus what PyTorch's allocator holds but no tensor uses (the probe chunk's own memory
                # among it): free for PyTorch, not for mem_get_info
                cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                budget = int((free + max(0, cached)) * CUDA_BUDGET_FRACTION)
            fit = max(1, int(budget * CUDA_HEADROOM) // per_row)
            self.rows, self.tuning = min(self.cap, fit), False
            self._settle(fit)
            logger.debug("CUDA probe: %d bytes/row -> %d rows per forward", per_row, self.rows)
            return
        elapsed = time.perf_counter() - self._t0
        if not self._warm:  # the warm-up chunk: not timed; sizes the memory bound
            self._warm = True
            if self._saved is not None and self.row_peak_bytes is None:
                self.row_peak_bytes = int(sum(self._saved.values()) * HOST_PEAK_FACTOR / rows_done)
                self._saved = None
                self._bound(self.row_peak_bytes)
            self._state = _Tuning(pair=(self.rows, self.rows))
            self._start_pair(self.rows)
            return
        rows, seconds = self._window[0] + rows_done, self._window[1] + elapsed
        if seconds < CPU_WINDOW_SECONDS:
            self._window = (rows, seconds)
            return
        self._window = (0, 0.0)
        state = self._state
        state.windows.setdefault(self.rows, []).append(rows / seconds)
        inc, ch = state.pair
        if min(len(state.windows.get(inc, ())), len(state.windows.get(ch, ()))) < CPU_WINDOWS:
            self.rows = ch if self.rows == inc else inc  # alternate, so both see the same load
            self._keep()
            return
        state.rel.setdefault(inc, 1.0)
        state.rel[ch] = state.rel[inc] * max(state.windows[ch]) / max(state.windows[inc])
        if state.rel[ch] <= state.rel[inc] * (1 + CPU_TOLERANCE):  # doubling no longer pays
            self._finish(settle=True)
        else:
            self._start_pair(ch)
