"""Ctrl-C (or SIGTERM) on the command line: the first interrupt stops cleanly, a second one at once.

The first SIGINT raises KeyboardInterrupt as usual: a run stops scheduling batches, hands the
batch it holds to the writer, which writes what is queued (at most a few blocks), finalizes the
open shard and releases the directory, and the command exits 130. A second SIGINT exits the
process there and then with ``os._exit(130)``: no cleanup, no interpreter shutdown, so the main
thread never waits for h5py's lock while the writer thread holds it (which hung the process for
minutes, or crashed it). That leaves what a kill leaves: shards listed in manifest.json are intact
(each is durable before it is listed), the shard in progress stays a ``.partial`` that the next
run deletes, and the kernel drops the directory lock with the process.

SIGTERM (what a batch scheduler such as SLURM or Kubernetes sends before its SIGKILL, and what
`kill` sends) is handled the same way and exits 143 (128 + SIGTERM): the run saves what it was
handed within the scheduler's grace period instead of losing the shard in progress.

SIGXFSZ is ignored as well (Python does so at startup; this makes sure), so a file reaching the
file-size limit (``ulimit -f``) fails the write with EFBIG, which the store reports, instead of
killing the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """The first SIGTERM: unwinds like Ctrl-C (every ``except KeyboardInterrupt`` cleanup runs);
    ``exit_code`` is 143."""

    exit_code = EXIT_TERMINATED


def exit_code(exc: KeyboardInterrupt) -> int:
    """The status to exit with after ``exc``: 143 for SIGTERM, else 130."""
    return getattr(exc, "exit_code", EXIT_INTERRUPTED)


def _say(text: str) -> None:
    try:
        os.write(2, text.encode(errors="replace"))  # unbuffered: safe inside a signal handler
    except OSError:
        pass


@contextlib.contextmanager
def two_stage_interrupts(first: str, second: str) -> Iterator[None]:
    """Within the block: the first SIGINT prints ``first`` and raises KeyboardInterrupt (the first
    SIGTERM: ``Terminated``, a KeyboardInterrupt), a second of either prints ``second`` and exits the
    process at once with status 130 (143 when SIGTERM started it). The previous handlers come back
    on leaving, unless an interrupt came: then a further signal while the process exits still exits
    at once. Outside the main thread (where handlers cannot be set) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    count = 0
    code = EXIT_INTERRUPTED

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal count, code
        count += 1
        if count > 1:
            _say(f"\n{second}\n")
            os._exit(code)
        if signum == signal.SIGTERM:
            code = EXIT_TERMINATED
            _say(f"\n{first.replace('interrupted', 'terminated (SIGTERM)', 1)}\n")
            raise Terminated
        _say(f"\n{first}\n")
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_signal)
    previous_term = signal.signal(signal.SIGTERM, on_signal)
    xfsz = getattr(signal, "SIGXFSZ", None)
    previous_xfsz = signal.signal(xfsz, signal.SIG_IGN) if xfsz is not None else None
    try:
        yield
    finally:
        if xfsz is not None and previous_xfsz is not None:
            signal.signal(xfsz, previous_xfsz)
        if count == 0:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
