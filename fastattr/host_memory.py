"""Host memory for CPU dataset runs: reuse freed pages instead of mapping fresh ones.

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mapping and
unmaps it on free, so each (batch, features) temporary of a CPU run (the batch read from the
source, the model's activations and gradients, the accumulator, the attributions in the user's
layout: 154 MB each for 256 samples of 3x224x224) is page-faulted and zeroed by the kernel again,
batch after batch: about 60 ms per such tensor on the 2-core benchmark host, as much as the
model's whole forward there (benchmarks/RESULTS.md, "Store"). For the run, ``reuse_freed_pages``
raises the mmap and trim thresholds, so freed blocks stay in the heap and the next batch reuses
them; afterwards it sets both to what glibc's dynamic threshold settles at once large blocks have
been freed (32 MiB / 64 MiB) and trims the heap, which returns the memory.

Only on Linux with glibc and only for CPU runs; ``FASTATTR_REUSE_PAGES=0`` turns it off, and it
stays off when the process was started with glibc's own ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` or their ``GLIBC_TUNABLES`` forms (``glibc.malloc.mmap_threshold``,
``glibc.malloc.trim_threshold``): the user's settings win.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
RUN_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from (and return to) the heap during a run
SETTLED_MMAP, SETTLED_TRIM = 32 << 20, 64 << 20  # glibc's dynamic thresholds after large frees (64-bit)

_lock = threading.Lock()
_active = 0  # runs inside the context (threads, nested runs): the last one out restores


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or os.environ.get("FASTATTR_REUSE_PAGES", "1") == "0":
        return None
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return None
    tunables = os.environ.get("GLIBC_TUNABLES", "")  # the same settings in glibc's tunables syntax
    if "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim") or not hasattr(libc, "gnu_get_libc_version"):
            return None  # not glibc (musl has no such knobs)
    except OSError:
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_pages(enabled: bool = True) -> Iterator[None]:
    """For the duration: large freed blocks stay mapped for reuse (see the module docstring)."""
    global _active
    libc = _libc() if enabled else None
    if libc is None:
        yield
        return
    with _lock:
        if _active == 0:
            libc.mallopt(M_MMAP_THRESHOLD, RUN_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, 2 * RUN_THRESHOLD)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                libc.mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP)
                libc.mallopt(M_TRIM_THRESHOLD, SETTLED_TRIM)
                libc.malloc_trim(0)  # hand the run's freed memory back
