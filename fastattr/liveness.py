"""Liveness of a torchrun job's ranks, through the process group's store (fastattr/distributed.py).

A rank killed outright (SIGKILL, the OOM killer) reports nothing. Every rank bumps a heartbeat
counter in the store each second from a daemon thread (it beats while the main thread computes,
or while rank 0 checks shards on open); rank 0's thread watches the others' and, when one stands
still for FASTATTR_DIST_TIMEOUT seconds (5 to 60; one that never beat: the full timeout), sets the
job's failure flag in that rank's name, so the survivors stop at their next batch instead of
finishing their shares and waiting the full timeout (without a launcher nothing else stops them).
``JobStore`` turns the store's network errors into a DistributedRunError that says what they mean.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .errors import DistributedRunError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "FASTATTR_DIST_TIMEOUT"
BEAT_S = 1.0  # heartbeat period; rank 0 reads world_size - 1 counters per beat
MAX_SILENCE_S = 60.0  # a rank whose heartbeat stands still this long (or the timeout, if shorter) is dead
_GONE = 1 << 40  # added to a heartbeat counter by a rank that closed normally: not dead, done


class JobStore:
    """The process group's store, whose network errors (torch's DistNetworkError: "Broken pipe")
    become a DistributedRunError saying what they mean for the run."""

    def __init__(self, store: Any, rank: int) -> None:
        self._store, self._rank = store, rank

    def _call(self, op: str, *args: Any) -> Any:
        try:
            return getattr(self._store, op)(*args)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DistributedRunError(
                f"rank {self._rank}: lost the connection to the job's store ({type(exc).__name__}: {first}): the process hosting it "
                "(rank 0 without a launcher, else torchrun's agent) is gone; what this rank finalized is kept, rerun to resume"
            ) from exc

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def set(self, key: str, value: bytes | str) -> None:
        self._call("set", key, value)

    def add(self, key: str, n: int) -> int:
        return self._call("add", key, n)


class Heartbeat:
    """This rank's heartbeat thread (started here); on rank 0 also the watch over the others'.
    ``watching`` False ends the watch (the job's result is posted, or a failure is)."""

    def __init__(self, store: JobStore, ns: str, rank: int, world_size: int, timeout: float, failed_key: str) -> None:
        self.store, self.ns, self.rank, self.world_size = store, ns, rank, world_size
        self.timeout, self._failed_key = timeout, failed_key
        self.watching = rank == 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fastattr-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and sign off, so rank 0 takes this rank for done, not dead."""
        self.watching = False
        self._stop.set()
        self._thread.join(timeout=10 * BEAT_S)  # a store op on a dead store fails; never wait long here
        try:
            self.store.add(self.ns + f"beat/{self.rank}", _GONE)
        except Exception as exc:
            logger.debug("rank %d: could not sign off: %s", self.rank, exc)

    def _run(self) -> None:
        """Daemon thread: bump this rank's counter every BEAT_S; rank 0 also flags a peer whose
        counter stood still for the silence limit (a rank killed without a word)."""
        silence = max(5 * BEAT_S, min(self.timeout, MAX_SILENCE_S))  # never within a beat's jitter, even at a tiny timeout
        seen: dict[int, tuple[int, float]] = {}  # rank -> (last counter, when it last moved)
        try:
            while not self._stop.is_set():
                self.store.add(self.ns + f"beat/{self.rank}", 1)
                if self.watching and self.store.check([self._failed_key]):
                    self.watching = False  # a failure is already reported: nothing left to watch for
                if self.watching:
                    now = time.monotonic()
                    for r in range(1, self.world_size):
                        count = self.store.add(self.ns + f"beat/{r}", 0)  # 0 if it never beat yet
                        if count >= _GONE:
                            continue  # closed normally
                        last = seen.get(r)
                        if last is None or count != last[0]:
                            seen[r] = (count, now)
                        elif now - last[1] > (self.timeout if count == 0 else silence) and self.watching:
                            # Not one beat: it never reached this run() call. Ranks of a group the script
                            # initialised itself may reach run() far apart (each loads its data first), so
                            # this waits the full timeout, like a rank waiting for rank 0's plan.
                            if count == 0:
                                why = (
                                    f"never joined this run within {self.timeout:.0f} s: every rank of the job must call fastattr.run with the same "
                                    "arguments (a call on rank 0 alone needs a process without torchrun, or WORLD_SIZE=1)"
                                )
                            else:
                                why = f"stopped responding (no heartbeat for {now - last[1]:.0f} s: killed, out of memory, or its node is gone)"
                            msg = f"rank {r}: {why}; what was finalized is kept, rerun to resume (the limit is {TIMEOUT_ENV} seconds, 5 to {MAX_SILENCE_S:.0f})"
                            logger.error(msg)
                            if not self.store.check([self._failed_key]):
                                self.store.set(self._failed_key, msg)
                            self.watching = False
                self._stop.wait(BEAT_S)
        except Exception as exc:  # the store went away with the job: the main thread will notice
            logger.debug("rank %d: heartbeat stopped: %s", self.rank, exc)
