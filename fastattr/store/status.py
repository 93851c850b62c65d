"""What a run is doing now, as readers report it (the manifest alone cannot say):

* ``complete``: the manifest says so (every sample stored);
* ``running``: a writer process holds the directory's lock (or a rank lock) right now;
* ``stopped``: neither: the writer closed early or was killed; rerunning the same command
  resumes it.

and the rows of shards still being written (``.fastattr-<name>.partial``), read from their
markers: counted as "in progress", never as stored; a stopped run's are discarded on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .fsutil import lock_held
from .schema import LOCK_NAME, PARTIAL_SHARD_RE, RANK_LOCK_RE
from .shard import read_marker

STATES = ("complete", "running", "stopped")


def run_state(run_dir: Path, manifest_status: str) -> str:
    """complete, running or stopped (see the module docstring)."""
    if manifest_status == "complete":
        return "complete"
    locks = [run_dir / LOCK_NAME, *(p for p in run_dir.iterdir() if RANK_LOCK_RE.fullmatch(p.name))]
    return "running" if any(lock_held(p) for p in locks) else "stopped"


@dataclass(frozen=True)
class InProgress:
    """A shard being written (or left unfinished by a writer that stopped)."""

    file: str  # the .partial name
    start: int
    rows: int  # rows appended so far, as the marker says (not durable, not checked)


def shards_in_progress(run_dir: Path, run_id: str | None) -> list[InProgress]:
    """This run's unfinished shards, by start."""
    out = []
    for p in run_dir.iterdir():
        if not PARTIAL_SHARD_RE.fullmatch(p.name):
            continue
        marker = read_marker(p)
        if marker is not None and (run_id is None or marker.run_id == run_id):
            out.append(InProgress(p.name, marker.start, marker.rows))
    return sorted(out, key=lambda s: s.start)
