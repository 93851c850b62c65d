"""Scale-out under torchrun: one dataset run spread over ranks, stored as one run.

``fastattr.run`` calls ``setup()``; outside torchrun (WORLD_SIZE unset or 1) it returns a local
context whose methods do exactly what a single process always did. Under torchrun:

- process group: initialised from the torchrun environment unless the caller already did
  (nccl for CUDA devices, gloo for CPU); each rank runs on ``cuda:LOCAL_RANK``.
- plan: rank 0 opens the run directory first (its RunWriter takes the directory lock, merges
  the fragments of earlier launches into manifest.json, deletes untrusted files) and publishes
  the GLOBAL list of missing ranges, the run id and the first free shard id. Every rank takes
  its piece of that list: ``split_ranges`` cuts it into world_size contiguous pieces whose sizes
  differ by at most one sample (no shuffling, no padding, nothing twice). So a resume with any
  world size schedules exactly the samples no launch has finalized.
- writing: ranks > 0 join the run with their own writer (own lock, own manifest fragment, shard
  ids ``first + rank + k * world_size``); rank 0 merges the fragments once every rank closed.
- coordination goes through the process group's key-value store (the torchrun rendezvous store),
  not through collectives: every wait polls for either its keys or a failure flag, with a timeout
  (FASTATTR_DIST_TIMEOUT seconds, default 1800), so no rank can hang on a rank that failed.
  A failing rank raises its own error and sets the flag; the others stop at their next batch
  with a DistributedRunError naming that rank and its error. Under torchrun a rank that exits
  non-zero also makes the agent stop the others; the CLI records the error for torchrun's report.
- liveness (fastattr/liveness.py): every rank's heartbeat in the store; rank 0 flags a rank
  killed outright (SIGKILL, OOM killer), whose silence would otherwise cost the full timeout.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .errors import DistributedRunError, PeerFailedError  # noqa: F401 - re-exported
from .liveness import TIMEOUT_ENV, Heartbeat, JobStore
from .store import RunWriter
from .store.ranges import merge_ranges

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for process groups
POLL_S = 0.02  # a store round trip is ~0.1 ms: polling at 50 Hz costs nothing


_calls = 0  # run() calls in this process: with the restart count, names this call's store keys


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


def local_device(device: torch.device) -> torch.device:
    """The device this rank uses: under torchrun a CUDA device without an index means
    ``cuda:LOCAL_RANK`` (one GPU per rank); anything else is kept as given."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return device


def split_ranges(ranges: Sequence[tuple[int, int]], world_size: int, granule: int = 1) -> list[list[tuple[int, int]]]:
    """Cut sorted, disjoint [start, stop) ranges into world_size contiguous pieces (in index
    order); piece r is rank r's work. A cut inside a range falls on a multiple of ``granule``
    from that range's start (the batch grid one process walks), the cut nearest to an equal
    share: each piece is within one sample (granule 1) or one granule of total / world_size."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if granule < 1:
        raise ValueError(f"granule must be >= 1, got {granule}")
    ranges = [(int(a), int(b)) for a, b in ranges if b > a]
    total = sum(b - a for a, b in ranges)
    # Rank r takes positions [cut[r], cut[r + 1]) of the concatenated ranges; each ideal cut
    # r * total // W is moved to the nearest grid point of the range it falls in (or its end).
    cuts = []
    for r in range(world_size + 1):
        ideal, offset = r * total // world_size, 0
        for a, b in ranges:
            if ideal <= offset + (b - a):
                inside = ideal - offset
                snapped = min(b - a, (inside + granule // 2) // granule * granule)
                cuts.append(offset + snapped)
                break
            offset += b - a
        else:
            cuts.append(total)
    cuts[0], cuts[-1] = 0, total
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(world_size)]
    offset = 0  # position of the current range's start in the concatenation
    for a, b in ranges:
        for rank in range(world_size):
            lo, hi = max(cuts[rank], offset), min(cuts[rank + 1], offset + (b - a))
            if lo < hi:
                pieces[rank].append((a + lo - offset, a + hi - offset))
        offset += b - a
    return pieces


def _covered_by(inner: Sequence[tuple[int, int]], outer: Sequence[tuple[int, int]]) -> bool:
    """Every [a, b) of inner lies inside the union of outer."""
    merged = merge_ranges(outer)
    return all(any(lo <= a and b <= hi for lo, hi in merged) for a, b in inner)


@dataclass
class Plan:
    """What this rank does: ``todo`` (its ranges), ``remaining`` (samples left globally)."""

    complete: bool
    todo: list[tuple[int, int]]
    remaining: int


@dataclass
class Outcome:
    """The run's totals once every rank has closed: global samples computed, completeness, and
    residual statistics over all ranks' samples."""

    computed: int
    complete: bool
    residual: dict


class Context:
    """A single process (world_size 1): every method does what fastattr.run always did."""

    rank = 0
    world_size = 1

    def open_writer(self, make: Callable[..., RunWriter], *, resume: bool, overwrite: bool) -> RunWriter:
        return make(resume=resume, overwrite=overwrite)

    def plan(self, writer: RunWriter, granule: int = 1) -> Plan:
        """What this process computes; ``granule``: a share's cuts fall on this batch grid."""
        if writer.complete:
            return Plan(True, [], 0)
        todo = writer.missing()
        return Plan(False, todo, sum(b - a for a, b in todo))

    def check_peers(self) -> None:
        """Raise DistributedRunError if another rank failed (nothing to check here)."""

    def advance(self, bar: Any, n: int) -> None:
        """Count n more samples handed to the writer on the progress bar."""
        bar.update(n)

    def fail(self, exc: BaseException) -> None:
        """Tell the other ranks that this one failed (nobody to tell here)."""

    def finish(
        self, writer: RunWriter, computed: int, deltas: list, rels: list, stats: Callable[[list, list], dict], *, failed: bool = False, bar: Any = None
    ) -> Outcome:
        """Close the writer (the coordinator last, merging every rank's fragment) and return the
        run's totals; failed=True closes without marking the run complete."""
        writer.close(complete=False) if failed else writer.close()
        return Outcome(computed, writer.complete, {} if failed else stats(deltas, rels))

    def close(self) -> None:
        """Release what setup() created."""


LOCAL = Context()  # stateless: shared by every single-process run


class DistributedContext(Context):
    """One rank of a torchrun job; see the module docstring for the protocol."""

    def __init__(self, rank: int, world_size: int, store: Any, owns_group: bool, timeout: float) -> None:
        self.rank, self.world_size = rank, world_size
        self.store, self.owns_group, self.timeout = JobStore(store, rank), owns_group, timeout
        # Keys are namespaced per run() call and per torchrun restart: every rank of a (re)started
        # worker group is a fresh process calling run() equally often, so the names agree without
        # a round of communication, and never meet keys of an earlier call or restart.
        global _calls
        _calls += 1
        self.ns = f"fastattr/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_calls}/"
        self._plan: Plan | None = None
        self._failed_key = self.ns + "failed"
        self._await: str | None = None  # rank 0: the keys every other rank sets once it no longer needs the store
        self._heartbeat = Heartbeat(self.store, self.ns, rank, world_size, timeout, self._failed_key)  # see fastattr/liveness.py

    # -- store helpers -----------------------------------------------------------------------------

    def _set(self, key: str, value: bytes) -> None:
        self.store.set(self.ns + key, value)

    def _peer_failure(self) -> str | None:
        if self.store.check([self._failed_key]):
            return self.store.get(self._failed_key).decode()
        return None

    def _wait(self, keys: list[str], what: str, on_wait: Callable[[], None] | None = None) -> list[bytes]:
        """Wait for every key (or raise as soon as any rank reports a failure, or at the timeout)."""
        full = [self.ns + k for k in keys]
        deadline = time.monotonic() + self.timeout
        while True:
            self.check_peers()
            if self.store.check(full):
                return [self.store.get(k) for k in full]
            if time.monotonic() > deadline:
                raise DistributedRunError(
                    f"rank {self.rank}: waited {self.timeout:.0f} s for {what}; a rank may have died without reporting "
                    f"(the limit is {TIMEOUT_ENV} seconds)"
                )
            if on_wait is not None:
                on_wait()
            time.sleep(POLL_S)

    # -- protocol ----------------------------------------------------------------------------------

    def open_writer(self, make: Callable[..., RunWriter], *, resume: bool, overwrite: bool) -> RunWriter:
        w = self.world_size
        if self.rank == 0:
            try:
                writer = make(resume=resume, overwrite=overwrite, rank=0, world_size=w)
            except BaseException as exc:
                self._set("plan", json.dumps({"error": f"rank 0: {type(exc).__name__}: {exc}"}).encode())
                raise
            complete = writer.complete
            missing = [] if complete else writer.missing()
            plan = {"run_id": writer.run_id, "first_shard_id": writer.first_shard_id, "missing": missing, "complete": complete}
            self._set("plan", json.dumps(plan).encode())
            if complete:
                self._await = "joined"  # nothing to do: the others only read the plan
        else:
            plan = json.loads(self._wait(["plan"], "rank 0 to open the run directory")[0])
            self._set(f"joined/{self.rank}", b"1")
            if "error" in plan:
                raise PeerFailedError(f"rank {self.rank}: stopped because {plan['error']}")
            try:
                writer = make(resume=True, overwrite=False, rank=self.rank, world_size=w, run_id=plan["run_id"], first_shard_id=plan["first_shard_id"])
            except BaseException as exc:
                self.fail(exc)
                raise
        missing = [tuple(r) for r in plan["missing"]]
        # A rank must see what rank 0 saw as done, no less and no more (its share is cut later, on
        # the batch grid): otherwise nodes see different directories (not shared, or stale caches).
        if not plan["complete"] and not (_covered_by(writer.missing(), missing) and _covered_by(missing, writer.missing())):
            exc = DistributedRunError(
                f"rank {self.rank} sees different finished samples in {writer.run_dir} than rank 0 "
                f"(missing {writer.missing()[:3]}... vs {missing[:3]}...): the run directory must be on a filesystem every rank shares"
            )
            writer.abort()
            self.fail(exc)
            raise exc
        self._plan = Plan(bool(plan["complete"]), missing, sum(b - a for a, b in missing))  # todo: the global list until plan()
        return writer

    def plan(self, writer: RunWriter, granule: int = 1) -> Plan:
        """This rank's share of the global missing ranges; granule > 1 (the examples per batch)
        cuts the shares on the batch grid one process walks, so every sample is computed in the
        same batch as in a single-process run (on CPU with a fixed batch_size: the same bits)."""
        assert self._plan is not None, "open_writer() comes first"
        todo = split_ranges(self._plan.todo, self.world_size, granule)[self.rank]
        logger.info("rank %d of %d: %d samples in %d ranges", self.rank, self.world_size, sum(b - a for a, b in todo), len(todo))
        return Plan(self._plan.complete, todo, self._plan.remaining)

    def check_peers(self) -> None:
        msg = self._peer_failure()
        if msg is not None and not msg.startswith(f"rank {self.rank}:"):
            raise PeerFailedError(f"rank {self.rank}: stopped because {msg}")

    def advance(self, bar: Any, n: int) -> None:
        done = self.store.add(self.ns + "progress", n)  # samples handed to writers by all ranks
        if self.rank == 0 and self._plan is not None and not getattr(bar, "disable", True):
            target = bar.total - self._plan.remaining + done  # the bar shows the global count and rate
            if target > bar.n:
                bar.update(target - bar.n)

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, PeerFailedError):
            return  # not the root cause: keep the failing rank's message
        try:
            if not self.store.check([self._failed_key]):
                notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))  # e.g. the sample a dataset failed on
                self.store.set(self._failed_key, f"rank {self.rank}: {type(exc).__name__}: {exc}{notes}")
        except Exception as store_exc:  # the store may be gone with the job: nothing more to tell
            logger.debug("could not report the failure to the other ranks: %s", store_exc)

    def finish(
        self, writer: RunWriter, computed: int, deltas: list, rels: list, stats: Callable[[list, list], dict], *, failed: bool = False, bar: Any = None
    ) -> Outcome:
        if failed:
            # Stop without waiting for anyone: rank 0 keeps the fragments for the next launch to
            # merge, since other ranks may still be finalizing theirs.
            writer.close(complete=False, merge_fragments=False)
            return Outcome(computed, False, {})
        if self.rank > 0:
            try:
                writer.close()  # its fragment is final before rank 0 hears that this rank is done
            except BaseException as exc:
                self.fail(exc)
                raise
            d = np.concatenate(deltas) if deltas else np.zeros(0, np.float32)
            r = np.concatenate(rels) if rels else np.zeros(0, np.float32)
            self._set(f"done/{self.rank}", pickle.dumps({"computed": computed, "deltas": d, "rels": r}))
            final = json.loads(self._wait(["final"], "rank 0 to merge the run")[0])
            self._set(f"ack/{self.rank}", b"1")  # rank 0 may host the store: it waits for this
            if "error" in final:
                raise PeerFailedError(f"rank {self.rank}: stopped because {final['error']}")
            return Outcome(final["computed"], final["complete"], final["residual"])
        on_wait = (lambda: self.advance(bar, 0)) if bar is not None else None  # keep the bar moving
        try:
            parts = [pickle.loads(b) for b in self._wait([f"done/{r}" for r in range(1, self.world_size)], "the other ranks to finish", on_wait)]  # noqa: S301 - written by this job's ranks
        except BaseException:
            writer.close(complete=False, merge_fragments=False)
            raise
        try:
            writer.close()  # merges every rank's fragment into manifest.json, in global index order
        except BaseException as exc:
            self._set("final", json.dumps({"error": f"rank 0: {type(exc).__name__}: {exc}"}).encode())
            raise
        total_computed = computed + sum(p["computed"] for p in parts)
        residual = stats(deltas + [p["deltas"] for p in parts if p["deltas"].size], rels + [p["rels"] for p in parts if p["rels"].size])
        outcome = Outcome(total_computed, writer.complete, residual)
        self._heartbeat.watching = False  # the others only read the result from here on, then close
        self._set("final", json.dumps({"computed": outcome.computed, "complete": outcome.complete, "residual": residual}).encode())
        self._await = "ack"
        return outcome

    def close(self) -> None:
        self._heartbeat.stop()
        if self._await is not None:
            # Outside torchrun's agent the store lives in rank 0: keep it up until every rank has
            # read what it needs. A rank gone by now only costs this short wait.
            saved, self.timeout = self.timeout, min(self.timeout, 60.0)
            try:
                self._wait([f"{self._await}/{r}" for r in range(1, self.world_size)], "the other ranks to read the result")
            except Exception as exc:
                logger.debug("not every rank acknowledged the result: %s", exc)
            finally:
                self.timeout = saved


def _destroy_group() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # at exit, with the other ranks possibly gone: nothing more to do
        logger.debug("could not destroy the process group: %s", exc)


def setup(device: torch.device) -> Context:
    """The context for this process: a local one outside torchrun (or at world size 1), else one
    rank of the job, initialising the process group from the torchrun environment if needed."""
    if dist.is_available() and dist.is_initialized():
        world, rank, owns = dist.get_world_size(), dist.get_rank(), False
    else:
        world, rank, owns = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), True
    if world <= 1:
        return Context()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    timeout = timeout_seconds()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl binds each rank's communicator to its own GPU
        backend = "nccl" if device.type == "cuda" else "gloo"
        for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun, or call torch.distributed.init_process_group yourself")
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
        # Kept until the process exits, not destroyed after this run: a second run() in the same
        # script would initialise a new group against the rendezvous keys of this one and fail
        # (gloo: "connectFullMesh failed ... Connection refused"); it reuses this one instead.
        atexit.register(_destroy_group)
        logger.info("rank %d of %d: initialised the %s process group", rank, world, backend)
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except Exception as exc:  # a process group without a store (not one torchrun creates)
        raise RuntimeError(f"fastattr coordinates ranks through the process group's store, which is not available: {exc}") from exc
    return DistributedContext(rank, world, store, owns, timeout)


__all__ = ["LOCAL", "Context", "DistributedContext", "DistributedRunError", "Outcome", "PeerFailedError", "Plan", "local_device", "setup", "split_ranges", "timeout_seconds"]
