"""Shared plumbing of every benchmark script: timing, peak memory, error against a float64
reference, markdown tables and JSON with the card, date and commit.

Timing: wall clock (time.perf_counter) around the call, with torch.cuda.synchronize() before
and after on CUDA: kernels run asynchronously, so an unsynchronized GPU timing measures the
launches, not the work. ``timed`` reports the median of the repeats after an untimed warm-up;
``best_of`` the best of its calls, without warm-up (for cold-cache reads: ``before`` evicts).
CPU time (``Timing.cpu_seconds``): time.process_time over the same calls, all the process's
threads, user + system; next to the wall time it shows how many cores a call kept busy.

Peak memory:
- CUDA: torch.cuda.max_memory_allocated() above the allocation at the start (the caching
  allocator's count of live tensors; memory it reserves but has not handed out is not counted).
- CPU (and "host" on any device): the process's resident set size (/proc/self/statm) sampled
  every 2 ms by a thread, above the level after gc + malloc_trim. Not tracemalloc: it sees only
  Python's allocator and misses torch's tensors. Sampling can miss a peak shorter than 2 ms, and
  the thread disturbs timings, so ``timed`` measures memory on the warm-up call only.

Error: relative L2, ||a - ref|| / ||ref||, in float64 on the CPU, over the rows the reference has
(references are computed on the first few samples only).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# --------------------------------------------------------------------------- timing and memory


def as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if as_device(device).type == "cuda":
        torch.cuda.synchronize()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the start of the block, in bytes (``.peak``) and MiB (``.mb``):
    the CUDA allocator's peak for a CUDA device, sampled RSS otherwise (module docstring)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = as_device(device)
        self.peak = 0

    @property
    def mb(self) -> float:
        return self.peak / 2**20

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            gc.collect()
            _malloc_trim()  # hand freed heap back to the OS so the RSS delta sees this block's allocations
            self.base = _rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss() - self.base)


class Timing(tuple[float, float | None, Any]):
    """(seconds, peak MiB or None, result), unpacked as such, plus ``cpu_seconds``: the process's
    CPU time over the same call(s) (the median of the repeats' for ``timed``)."""

    cpu_seconds: float

    def __new__(cls, seconds: float, peak_mb: float | None, result: Any, cpu_seconds: float) -> Timing:
        self = super().__new__(cls, (seconds, peak_mb, result))
        self.cpu_seconds = cpu_seconds
        return self

    @property
    def seconds(self) -> float:
        return self[0]

    @property
    def peak_mb(self) -> float | None:
        return self[1]

    @property
    def result(self) -> Any:
        return self[2]


def _clock(fn: Callable[[], Any], dev: torch.device) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds, result) of one call, synchronized before and after on CUDA."""
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, time.process_time() - c0, out


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu", repeats: int = 3, memory: bool = True) -> Timing:
    """(median seconds of ``repeats`` timed calls, peak MiB or None, the last result), ``.cpu_seconds``.

    The first call is an untimed warm-up (allocator, cuDNN autotuning, the CPU row tuner) and,
    with ``memory``, the peak-memory measurement."""
    dev = as_device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    mem = PeakMemory(dev) if memory else contextlib.nullcontext()
    with mem:
        out = fn()
    times, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        seconds, cpu, out = _clock(fn, dev)
        times.append(seconds)
        cpus.append(cpu)
    if not times:
        return Timing(float("nan"), mem.mb if memory else None, out, float("nan"))
    return Timing(statistics.median(times), mem.mb if memory else None, out, statistics.median(cpus))


def measure_once(fn: Callable[[], Any], device: str | torch.device = "cpu", memory_on: str | torch.device | None = "cpu") -> Timing:
    """(seconds, peak MiB or None, result) of ONE call, ``.cpu_seconds``, memory sampled during the
    timed call itself (for runs too long to repeat; ``memory_on="cpu"`` gives host memory on any device)."""
    dev = as_device(device)
    mem = PeakMemory(memory_on) if memory_on is not None else contextlib.nullcontext()
    with mem:
        seconds, cpu, out = _clock(fn, dev)
    return Timing(seconds, mem.mb if memory_on is not None else None, out, cpu)


def best_of(fn: Callable[[], Any], device: str | torch.device = "cpu", repeats: int = 3, before: Callable[[], Any] | None = None) -> Timing:
    """(best seconds of ``repeats`` calls, None, the last result), ``.cpu_seconds`` of the best call.
    No warm-up and no memory sampling; ``before`` runs untimed before each call (e.g. to drop a
    file from the page cache, so every call reads from disk)."""
    dev = as_device(device)
    best: tuple[float, float] = (float("nan"), float("nan"))
    out = None
    for _ in range(repeats):
        if before is not None:
            before()
        seconds, cpu, out = _clock(fn, dev)
        if not seconds >= best[0]:  # also replaces the initial nan
            best = (seconds, cpu)
    return Timing(best[0], None, out, best[1])


def true_fp32() -> None:
    """Make fp32 mean fp32 on CUDA (cuDNN defaults to TF32 convolutions): what Captum then
    computes is what fastattr's fp32 policy computes; TF32 is its own row."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


# --------------------------------------------------------------------------- errors


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against a float64 reference over the reference's rows."""
    a = a[: ref.shape[0]].detach().double().cpu()
    ref = ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm())


def max_rel(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | float | None = None) -> float:
    """max |got - ref| / scale (elementwise scale allowed), scale defaulting to max |ref|."""
    ref = ref.double()
    diff = (got.double() - ref).abs()
    if scale is None:
        scale = ref.abs().max().clamp_min(1e-30)
    return float((diff / scale).max())


# --------------------------------------------------------------------------- rows, tables, JSON


@dataclass
class Row:
    """One implementation on one case, as the side-by-side scripts report it."""

    case: str
    impl: str
    seconds: float | None
    peak_mb: float | None
    rel_err: float | None
    vs_captum_default: float | None = None
    vs_captum_best: float | None = None
    note: str = ""


def fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A markdown table; ``right`` marks the right-aligned (numeric) columns."""
    right = right or [False] * len(headers)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---:" if r else "---" for r in right) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dict_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of dict rows (columns: the union of their keys, in first-seen order)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return "-" if v is None else str(v)

    return markdown(keys, [[cell(r.get(k)) for k in keys] for r in rows])


def table(rows: Sequence[Row]) -> str:
    headers = ["case", "implementation", "time (s)", "x vs Captum default", "x vs Captum best", "peak mem (MB)", "rel. error vs fp64", "note"]
    cells = [
        [r.case, r.impl, fmt(r.seconds, ".3f"), fmt(r.vs_captum_default, ".2f"), fmt(r.vs_captum_best, ".2f"), fmt(r.peak_mb, ".0f"), fmt(r.rel_err, ".2e"), r.note]
        for r in rows
    ]
    return markdown(headers, cells, [False, False, True, True, True, True, True, False])


def speedups(rows: Sequence[Row], default: Row, best: Row | None) -> None:
    """Fill vs_captum_default / vs_captum_best (best None: Captum's default is its best)."""
    best = best or default
    for r in rows:
        if r.seconds:
            r.vs_captum_default = default.seconds / r.seconds if default.seconds else None
            r.vs_captum_best = best.seconds / r.seconds if best.seconds else None


def commit() -> str:
    """The checkout's commit (FASTATTR_COMMIT wins: a copied tree may have no .git)."""
    if os.environ.get("FASTATTR_COMMIT"):
        return os.environ["FASTATTR_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", HERE, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", HERE, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def card(device: str | torch.device = "cpu") -> str:
    dev = as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"CPU {name}, {torch.get_num_threads()} threads"


def env(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What every result records: card, date, commit, library versions."""
    info: dict[str, Any] = {
        "card": card(device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    for lib in ("triton", "captum"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception:  # absent or broken: record that, do not fail a benchmark over it
            info[lib] = None
    return info


def env_line(info: dict[str, Any]) -> str:
    return f"{info['card']} | torch {info['torch']} | triton {info['triton']} | captum {info['captum']} | {info['date']} | commit {info['commit']}"


def _jsonable(v: Any) -> Any:
    if is_dataclass(v) and not isinstance(v, type):
        return asdict(v)
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")


def write_json(path: str, payload: dict[str, Any], device: str | torch.device = "cpu") -> str:
    """Write ``payload`` with an ``env`` entry (card, date, commit) added unless present."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"env": env(device), **payload} if "env" not in payload else payload
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_jsonable)
    return path


@contextlib.contextmanager
def stage_timer(label: str) -> Iterator[None]:
    """Print how long a block took, to stderr (progress, not results)."""
    t0 = time.perf_counter()
    yield
    print(f"[{label}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
