"""Writing a run: ``RunWriter`` takes ``Block``s from the caller and hands them through a bounded
queue to ONE writer thread, which appends them to shards (store/shard.py) and seals each full one
(stamp, flush, close). A commit thread then makes the sealed shard durable (fsync, rename, sha256 of
the final file) and lists it in the manifest while the writer fills the next shard: on the 2-core
machine hashing a 300 MB shard took 0.84 s and its fsync 0.2 s, time the writer thread used to
spend away from the queue. At most one commit is in flight, so shards are listed in order.

h5py serialises every call behind a global lock, so more h5py threads would not help; the bounded
queue is the backpressure that keeps memory flat when the disk is the bottleneck. Opening a writer
prepares the run directory (store/rundir.py): it takes the writer lock, resumes a matching run (or
refuses a different one), merges rank fragments (coordinator) and deletes files no manifest lists.

What a crash can lose is bounded twice: a shard is finalized after ``shard_rows`` rows or, with
``max_shard_seconds``, once it is that old, even while no block arrives (plus, for the moment its
commit takes, the shard sealed before it). A write that fails for
lack of space stops the writer with a DiskFullError (store/shard.py drops the broken file safely).
At interpreter exit, writers still running are aborted and waited for (bounded), so exit never
finalizes h5py while the writer thread is inside it (which hangs or crashes the interpreter).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import threading
import time
import weakref
from bisect import bisect_right
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DiskFullError, StoreError
from .block import Block, block_shapes, check_shapes, checked_block
from .manifest import jsonable_config
from .ranges import merge_ranges
from .rundir import RunDirectory
from .schema import COMPRESSIONS, FRAGMENT_FORMAT, MANIFEST_NAME, STORAGE_DTYPES, VOLATILE_CONFIG_KEYS
from .shard import OpenShard, SealedShard, ShardLayout, space_errno, write_error

logger = logging.getLogger(__name__)

_CLOSE = object()  # queue sentinels
_ABORT = object()
_DUE = object()  # not queued: the open shard reached max_shard_seconds while no block came

EXIT_WAIT_SECONDS = 30.0  # at interpreter exit, how long to wait for each running writer
_running: weakref.WeakSet[RunWriter] = weakref.WeakSet()  # writers whose thread may still work


class RunWriter:
    """Writes Blocks of one run into ``run_dir`` through one background thread.

    Creating a writer on a directory that holds a run resumes it (``covered`` / ``missing`` say
    what is left) if its config and total match, else raises RunMismatchError; ``overwrite=True``
    starts afresh. One writer per directory at a time (an advisory lock enforces it on POSIX).
    Use as a context manager, or call close() (or abort()) yourself.

    Distributed runs (``rank``/``world_size``, see fastattr/distributed.py): rank 0's writer is the
    coordinator. It opens first, holds the directory lock, merges what earlier launches' ranks left
    in their fragments into manifest.json and deletes untrusted files; its ``run_id`` and
    ``first_shard_id`` are then handed to the other ranks, whose writers join that run: each holds
    its own rank lock, deletes nothing, and lists the shards it finalizes in its own fragment
    ``manifest.rank-XXXXX.json`` (same format as the manifest). Shard ids are
    ``first_shard_id + rank + k * world_size``, so names never collide across ranks or launches.
    Rank 0's close() merges every fragment into manifest.json: close it after the other ranks'.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: dict[str, Any],
        total: int,
        shard_rows: int = 4096,
        storage_dtype: str = "float32",
        compression: str = "auto",
        queue_size: int = 4,
        resume: bool = True,
        overwrite: bool = False,
        shard_prefix: str = "shard",
        max_shard_seconds: float | None = None,
        volatile_keys: Iterable[str] = VOLATILE_CONFIG_KEYS,
        rank: int = 0,
        world_size: int = 1,
        run_id: str | None = None,
        first_shard_id: int | None = None,
        allow_other_files: bool = False,
    ) -> None:
        """max_shard_seconds: also finalize an open shard once it is this old (checked after each
        block and while waiting for the next), bounding in time the work a crash can lose.
        volatile_keys: config keys ignored when checking that a resume matches the stored run.
        rank, world_size: this writer's place in a distributed run; a rank > 0 joins the run that
        rank 0's writer prepared and needs that writer's run_id and first_shard_id.
        allow_other_files: start a new run in a directory that holds other files (by default such a
        directory is refused); fastattr never deletes or replaces them (store/ownership.py)."""
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
        for name, value, low in (("shard_rows", shard_rows, 1), ("queue_size", queue_size, 1), ("total", total, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not shard_prefix or Path(shard_prefix).name != shard_prefix:
            raise ValueError(f"shard_prefix must be a plain file-name prefix, got {shard_prefix!r}")
        if max_shard_seconds is not None and not max_shard_seconds > 0:
            raise ValueError(f"max_shard_seconds must be positive, got {max_shard_seconds!r}")
        for name, value, low in (("world_size", world_size, 1), ("rank", rank, 0)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        if rank > 0 and (not run_id or not isinstance(first_shard_id, int) or first_shard_id < 0):
            raise ValueError(f"rank {rank} joins rank 0's run: pass rank 0's writer's run_id and first_shard_id (got {run_id!r}, {first_shard_id!r})")
        if rank > 0 and overwrite:
            raise ValueError(f"only rank 0 may overwrite a run (rank {rank} was asked to)")

        self.run_dir = Path(run_dir)
        self.config = jsonable_config(config)
        self.total = int(total)
        self.shard_rows = int(shard_rows)
        self.storage_dtype = np.dtype(storage_dtype)
        self.compression = compression
        self._layout = ShardLayout(storage_dtype, compression, self.shard_rows)
        self.shard_prefix = shard_prefix
        self.max_shard_seconds = max_shard_seconds
        self._volatile = frozenset(volatile_keys)
        self._method = str(self.config.get("method", ""))
        self._config_json = json.dumps(self.config, sort_keys=True)

        self.rank, self.world_size = int(rank), int(world_size)
        self._error: BaseException | None = None
        self._aborting = False
        self._closed = False
        self._open: OpenShard | None = None
        self._committing: threading.Thread | None = None  # the sealed shard being committed, if any

        self._dir = RunDirectory(
            self.run_dir,
            config=self.config,
            total=self.total,
            volatile=self._volatile,
            shard_prefix=shard_prefix,
            rank=self.rank,
            world_size=self.world_size,
            run_id=run_id,
            first_shard_id=first_shard_id,
            allow_other_files=allow_other_files,
        )
        try:
            self._dir.open(resume=resume, overwrite=overwrite)
        except StoreError as exc:  # e.g. no room for the first manifest
            if isinstance(exc, DiskFullError) or space_errno(exc) is None:
                raise
            raise self._explained(exc) from exc
        self._layout.run_id = self._dir.run_id or ""  # stamped into every shard's marker
        assert self._dir.first_shard_id is not None  # known once the directory is open
        self._next_id = self._dir.first_shard_id + self.rank  # this rank's residue class of shard ids
        # Shapes every block must keep: {"attributions": {name: feature_shape}, "target": trailing shape}.
        self._expect: dict[str, Any] | None = self._dir.expect
        self._claimed: list[tuple[int, int]] = self._dir.covered  # ranges finalized or handed to put(), merged

        self._queue: queue.Queue[Any] = queue.Queue(maxsize=int(queue_size))
        self._final_status: bool | None = None
        self._merge_on_close = True
        # Set by the thread as its very last step. Waiting on it, not on Thread.join(): in Python
        # 3.11 a join() interrupted by Ctrl-C marks a thread that still runs as stopped, so every
        # later join() returns at once, and the interpreter could exit under the writer's feet.
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fastattr-writer:{self.run_dir.name}", daemon=True)
        self._thread.start()
        _running.add(self)

    # -- state -----------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """Identifies the run (rank 0's writer reads or makes it; the other ranks are given it)."""
        return self._dir.run_id

    @property
    def first_shard_id(self) -> int | None:
        """The first shard id of this launch (rank r names its shards first_shard_id + r + k * world_size)."""
        return self._dir.first_shard_id

    @property
    def covered(self) -> list[tuple[int, int]]:
        """Merged, sorted [start, stop) ranges already finalized (listed in the manifest)."""
        return self._dir.covered

    def missing(self) -> list[tuple[int, int]]:
        """Sorted [start, stop) ranges of [0, total) not yet finalized."""
        return self._dir.missing()

    @property
    def complete(self) -> bool:
        return self._dir.complete

    @property
    def queue_maxsize(self) -> int:
        return self._queue.maxsize

    # -- caller side -------------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        err = self._error
        if isinstance(err, StoreError):  # already says what happened and what to do
            raise type(err)(str(err)) from err
        if err is not None:
            raise StoreError(f"the writer thread for {self.run_dir} failed: {type(err).__name__}: {err}") from err

    def put(self, block: Block, *, copy: bool = False) -> None:
        """Hand a block to the writer thread; blocks while the queue is full (backpressure).

        Raises ValueError for a malformed block (before anything is queued) and StoreError for an
        error the writer thread hit earlier. copy=True copies the arrays first, for callers that
        reuse their buffers."""
        self._raise_if_failed()
        if self._closed:
            raise StoreError(f"the writer for {self.run_dir} is closed")
        block = self._checked(block, copy=copy)
        if block.stop == block.start:
            return
        claimed_before = self._claimed
        self._claim(block.start, block.stop)
        try:
            self._enqueue(block)
        except BaseException:  # not queued (e.g. Ctrl-C while waiting): the samples are free again
            self._claimed = claimed_before
            raise
        self._raise_if_failed()

    def _checked(self, block: Block, *, copy: bool) -> Block:
        """Validate a block in the caller, so a bad one raises where it was made (not later, in
        the thread); returns it with numpy arrays."""
        checked = checked_block(block, total=self.total, copy=copy)
        shapes = block_shapes(checked)
        if self._expect is None:
            self._expect = shapes
        else:
            check_shapes(shapes, self._expect)
        return checked

    def _claim(self, start: int, stop: int) -> None:
        """Refuse a block overlapping anything finalized or already queued: every sample once."""
        i = bisect_right(self._claimed, (start, math.inf))
        for a, b in self._claimed[max(i - 1, 0) : i + 1]:
            if a < stop and start < b:
                raise ValueError(f"block [{start}, {stop}) overlaps samples already written or queued ([{a}, {b}))")
        self._claimed = merge_ranges([*self._claimed, (start, stop)])

    def _enqueue(self, item: Any) -> None:
        # A plain put() would wait forever if the thread were gone; poll so that cannot hang.
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._done.is_set():
                    self._raise_if_failed()
                    raise StoreError(f"the writer thread for {self.run_dir} has stopped") from None

    def close(self, *, complete: bool | None = None, merge_fragments: bool = True) -> None:
        """Write everything queued, finalize the open shard, stop the thread, and write the manifest
        with status "complete" if nothing is missing (or as given), else "running". A coordinator
        (rank 0) first merges the other ranks' fragments unless merge_fragments=False (after a
        failure, when other ranks may still be closing: the next open merges them instead).

        Re-raises (as StoreError) an error the writer thread hit; calling close() again is a no-op,
        or raises that error again."""
        if self._closed:
            self._raise_if_failed()
            return
        # The writer thread finalizes, writes the manifest and only then drops the directory
        # lock, so an interrupted close() can never let a second writer in while it still works.
        self._final_status = complete
        self._merge_on_close = merge_fragments
        if not self._done.is_set():  # else an interrupted close() already had the thread finish
            self._enqueue(_CLOSE)
        self._wait()
        self._closed = True  # only once the thread is done: an interrupted close() can be retried
        self._raise_if_failed()

    def abort(self, timeout: float | None = None) -> None:
        """Stop without finalizing the open shard: its .partial is deleted (or, if the process dies
        first, on the next open). Finalized shards stay listed. Never raises the writer's error.
        timeout: give up waiting for the thread after this many seconds (it stops after the
        write in progress; the writer then counts as not closed)."""
        if self._closed:
            return
        self._aborting = True  # the thread now drops queued blocks instead of writing them
        if not self._done.is_set():
            try:
                self._enqueue(_ABORT)  # room comes fast: queued blocks are dropped, not written
            except StoreError:
                pass  # the thread is gone already (and has released the lock)
        self._closed = self._wait(timeout)

    def _wait(self, timeout: float | None = None) -> bool:
        """Wait until the thread has done its last write and released the directory; True if it has."""
        if not self._done.wait(timeout):
            return False
        self._thread.join(1.0)  # it only has to return now
        return True

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"RunWriter({str(self.run_dir)!r}, total={self.total}, covered={self.covered})"

    # -- writer thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                item = self._next()
                try:
                    if item is _DUE:
                        if self._error is None and not self._aborting:
                            self._finalize_open()
                        continue
                    if item is _CLOSE or item is _ABORT:
                        if item is _CLOSE and self._error is None and not self._aborting:
                            self._finalize_open()
                            self._wait_commit()
                            if self._error is None:  # else the commit failed: close() raises its error
                                self._dir.write_final_manifest(complete=self._final_status, merge_fragments=self._merge_on_close)
                        else:
                            self._abandon_open()
                        return
                    if self._error is not None or self._aborting:
                        continue  # a failed or aborting writer drops blocks (callers see the error)
                    self._write_block(item)
                except Exception as exc:
                    self._abandon_open()
                    self._fail(exc)
                    if item is _CLOSE or item is _ABORT:
                        return
                finally:
                    if item is not _DUE:
                        self._queue.task_done()
        finally:
            self._wait_commit()  # a sealed shard is still listed (it is complete), even when aborting
            self._dir.release_lock()  # the thread owns the directory until its last write is done
            _running.discard(self)
            self._done.set()

    def _next(self) -> Any:
        """The next queued item, or _DUE once the open shard is max_shard_seconds old."""
        if self._open is None or self.max_shard_seconds is None:
            return self._queue.get()
        wait = self._open.opened + self.max_shard_seconds - time.monotonic()
        try:
            return self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return _DUE

    def _explained(self, exc: Exception) -> Exception:
        """A failure as callers should see it: lack of space while writing the manifest (or a
        rank's fragment) becomes a DiskFullError like a shard's (store/shard.py explains those)."""
        if isinstance(exc, DiskFullError) or space_errno(exc) is None:
            return exc
        cause = exc.__cause__ if isinstance(exc, StoreError) and isinstance(exc.__cause__, OSError) else exc
        name = FRAGMENT_FORMAT.format(self.rank) if self.rank > 0 else MANIFEST_NAME
        return write_error(cause, self.run_dir / name)

    def _write_block(self, block: Block) -> None:
        pos = block.start
        while pos < block.stop:
            if self._open is not None and self._open.stop != pos:
                self._finalize_open()  # shards hold contiguous indices only
            if self._open is None:
                self._open = self._new_shard(pos, block)
            n = min(block.stop - pos, self.shard_rows - self._open.rows)
            lo = pos - block.start
            self._open.append(block, lo, lo + n)
            pos += n
            if self._open.rows >= self.shard_rows:
                self._finalize_open()
        if self._open is not None and self.max_shard_seconds is not None and time.monotonic() - self._open.opened >= self.max_shard_seconds:
            self._finalize_open()

    def _new_shard(self, start: int, block: Block) -> OpenShard:
        shard_id = self._next_id
        self._next_id += self.world_size  # each rank its own residue class: names never collide
        return self._layout.create(self.run_dir, f"{self.shard_prefix}-{shard_id:05d}.h5", shard_id, start, block)

    def _finalize_open(self) -> None:
        """Seal the open shard here (h5py), then commit it in the commit thread: it is listed in
        the manifest once (and only once) it is durable on disk."""
        shard, self._open = self._open, None
        if shard is None or shard.file is None:
            return
        self._wait_commit()  # one commit in flight: listed in order, and a crash loses at most one sealed shard
        if shard.rows == 0 or self._error is not None:  # nothing written, or the previous commit failed
            shard.drop()
            return
        sealed = shard.seal(method=self._method, config_json=self._config_json)
        self._committing = threading.Thread(target=self._commit, args=(sealed,), name=f"fastattr-commit:{self.run_dir.name}", daemon=True)
        self._committing.start()

    def _commit(self, sealed: SealedShard) -> None:
        """In the commit thread: fsync, rename, hash, list. A failure stops the writer like a failed
        write (put and close raise it); the writer thread drops its open shard."""
        try:
            entry = sealed.commit()
            self._dir.add_shard(entry)
            logger.debug("finalized %s [%d, %d)", entry.file, sealed.start, sealed.stop)
        except Exception as exc:
            self._fail(exc)

    def _wait_commit(self) -> None:
        thread, self._committing = self._committing, None
        if thread is not None:
            thread.join()  # never interrupted: only the main thread receives KeyboardInterrupt

    def _fail(self, exc: Exception) -> None:
        """Record the writer's first error (the writer or the commit thread)."""
        if self._error is not None:
            return
        self._error = self._explained(exc)
        # A StoreError says all and reaches the caller (put / close raise it): no second line.
        log = logger.info if isinstance(self._error, StoreError) else logger.error
        log("writer thread for %s failed: %s: %s", self.run_dir, type(self._error).__name__, self._error)

    def _abandon_open(self) -> None:
        shard, self._open = self._open, None
        if shard is not None:
            shard.drop()  # closes without writing anything more (safe after a failed write), deletes the .partial


@atexit.register
def _abort_running_writers() -> None:
    """At interpreter exit (e.g. after a KeyboardInterrupt escaped while a writer still ran), stop
    every writer thread that is still working before the interpreter finalizes: a daemon thread
    frozen inside h5py holds h5py's lock, and finalization then waits for it forever (or crashes).
    Finished shards are kept; the open one is dropped, as by abort()."""
    for writer in list(_running):
        if not writer._done.is_set():
            logger.warning("exiting while the writer for %s still runs: stopping it (finished shards are kept)", writer.run_dir)
            writer.abort(timeout=EXIT_WAIT_SECONDS)
