"""Checking a run in full: ``verify_run`` recomputes every shard's checksum, checks its structure
(nothing pointing outside the run), the coverage of [0, total) and every stored sample's values,
and gives ONE verdict (VerifyReport):

* ``FAILED``: a shard is missing, damaged or points outside the run; samples are duplicated, or
  missing from a run marked complete; or samples hold non-finite values (NaN or inf in their
  attributions, F(x), F(x0), or a delta their method defines) and the run was not made with
  ``allow_nonfinite`` (with it, they are listed as counted facts). What counts is the call that
  stored them: each shard records its config, so a later resume with the flag changed (allowed
  to change) neither hides nor condemns samples stored before;
* ``INCOMPLETE``: nothing is wrong with what is stored, but samples are still missing;
* ``OK``: every sample stored once, intact and finite (or allowed non-finite).

``repair=True`` (``fastattr verify --repair``) first drops bad shards the way a resume does: each is
renamed ``<name>.corrupt`` and removed from the manifest, so the next ``fastattr run`` of the same
command recomputes exactly those samples. Verify cannot recompute them itself (it has no model), and
non-finite samples are not dropped (recomputing gives the same values).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from .fsutil import sha256_file
from .integrity import RunIdentity, check_shard_file
from .manifest import ShardEntry, overlapping_shards, read_listing, read_manifest
from .ranges import complement_ranges, format_ranges, value_runs
from .rundir import RunDirectory
from .schema import CORRUPT_SUFFIX, MANIFEST_NAME, OWN_PREFIX, PARTIAL_SUFFIX
from .status import run_state, shards_in_progress


@dataclass
class VerifyReport:
    """verify_run's findings. ``verdict`` is OK, INCOMPLETE or FAILED (module docstring) and
    ``exit_code`` is 0 only for OK; ``ok`` means no problem (INCOMPLETE is ok but not OK)."""

    ok: bool
    problems: list[str]
    samples: int
    total: int
    status: str = ""  # complete, running or stopped (store/status.py)
    shards: int = 0
    nonfinite: int = 0  # sum of stats/nonfinite over stored samples
    nonfinite_samples: list[tuple[int, int]] = field(default_factory=list)  # ranges of samples with any non-finite value
    allow_nonfinite: bool = False  # the non-finite samples were stored under allow_nonfinite: counted facts, not problems
    max_abs_delta: float = math.nan  # over samples with a defined, finite delta
    median_abs_delta: float = math.nan
    defined_deltas: int = -1  # samples whose method defines a residual (-1: not counted)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts: allowed non-finite samples, shards in progress
    repaired: list[str] = field(default_factory=list)  # what --repair dropped

    @property
    def missing(self) -> int:
        return self.total - self.samples

    @property
    def verdict(self) -> str:
        if not self.ok:
            return "FAILED"
        return "INCOMPLETE" if self.missing > 0 else "OK"

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "OK" else 1

    def lines(self) -> list[str]:
        if not self.ok and not self.status:  # no manifest could be read: no counts to report, only why
            return [f"FAILED: {self.problems[0]}", *(f"problem: {p}" for p in self.problems[1:]), *(f"repaired: {r}" for r in self.repaired)]
        head = f"FAILED ({len(self.problems)} problem{'' if len(self.problems) == 1 else 's'})" if not self.ok else self.verdict
        first = f"{head}: {self.samples} of {self.total} samples in {self.shards} shards, run {self.status or '?'}"
        if self.verdict == "INCOMPLETE":
            first += f", {self.missing} missing" + ("; rerun the same command to resume" if self.status == "stopped" else "")
        n_bad = sum(b - a for a, b in self.nonfinite_samples)
        out = [
            first,
            f"non-finite: {n_bad} samples ({self.nonfinite} values counted in stats/nonfinite)" + (", allowed by the run" if n_bad and self.allow_nonfinite else ""),
            "|delta|: none stored (no sample has a completeness residual: the method defines none)" if self.defined_deltas == 0
            else f"|delta|: max {self.max_abs_delta:.4g}, median {self.median_abs_delta:.4g}",
        ]
        out += [f"repaired: {r}" for r in self.repaired]
        out += [f"problem: {p}" for p in self.problems]
        out += [f"note: {n}" for n in self.notes]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def repair_run(run_dir: str | os.PathLike[str]) -> list[str]:
    """Drop the shards a resume would drop (module docstring), under the writer lock; returns what
    was dropped. StoreError if the run cannot be opened (e.g. a writer is running)."""
    d = Path(run_dir)
    man = read_manifest(d / MANIFEST_NAME)
    rd = RunDirectory(
        d, config=man["config"], total=man["total"], volatile=RunIdentity.of(man).volatile, shard_prefix="shard",
        rank=0, world_size=1, run_id=None, first_shard_id=None,
    )  # fmt: skip
    rd.open(resume=True, overwrite=False)  # checks every shard, sets bad ones aside, rewrites the manifest
    rd.release_lock()
    return [f"{s.file}: samples [{s.start}, {s.stop}) dropped, kept as {s.file}{CORRUPT_SUFFIX}; rerun the same command to recompute them" for s in rd.dropped]


NO_OUTPUT_METHODS = ("activations",)  # methods that store no model output (fastattr/audit/definitions.py says the same)


def verify_run(run_dir: str | os.PathLike[str], *, repair: bool = False) -> VerifyReport:
    """Check a run directory thoroughly (reads every shard in full): manifest schema, each shard's
    sha256 and structure, coverage (no duplicates; every index once for a complete run), non-finite
    values and residual statistics. Never raises for a damaged run: it reports. repair=True drops
    bad shards first (module docstring)."""
    d = Path(run_dir)
    repaired: list[str] = []
    if repair:
        try:
            repaired = repair_run(d)
        except StoreError as exc:
            return VerifyReport(ok=False, problems=[f"cannot repair: {exc}"], samples=0, total=0)
    try:
        man = read_listing(d)
    except StoreError as exc:
        return VerifyReport(ok=False, problems=[str(exc)], samples=0, total=0)
    shards: list[ShardEntry] = man["shards"]
    total = man["total"]
    allow = bool(man["config"].get("allow_nonfinite", False))  # for shards that do not record their own
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    scan = _Scan(allow, has_output=man["config"].get("method") not in NO_OUTPUT_METHODS)
    identity = RunIdentity.of(man)
    for s in shards:
        if problem := _check(d, s, scan, identity):
            problems.append(problem)
    for a, b in overlapping_shards(shards):
        problems.append(f"duplicate samples [{b.start}, {min(a.stop, b.stop)}) in {a.file} and {b.file}")
    missing = complement_ranges([(s.start, s.stop) for s in shards], total)
    if missing and man["status"] == "complete":
        problems.append(f"{sum(b - a for a, b in missing)} samples not stored in a run marked complete: {format_ranges(missing)}")
    elif missing:
        notes.append(f"samples not stored yet: {format_ranges(missing)}")
    bad, allowed = scan.bad_ranges(), scan.bad_ranges(allowed=True)
    text = "{} samples hold non-finite values (NaN or inf in attributions, F(x), F(x0) or delta): {}"
    if allowed:
        notes.append(text.format(sum(b - a for a, b in allowed), format_ranges(allowed)) + " (stored as counted facts under allow_nonfinite)")
    if bad:
        problems.append(
            text.format(sum(b - a for a, b in bad), format_ranges(bad))
            + "; fix the model or data and rerun with overwrite, or make the run with allow_nonfinite to keep them"
            + ("; inf attributions of a float16 run are values beyond float16's range (65504): rerun with storage_dtype float32 to keep them"
               if man["config"].get("storage_dtype") == "float16" else "")
        )
    if man["fragments"]:
        warnings.append(f"{len(man['fragments'])} rank fragments not merged into {MANIFEST_NAME} yet (a distributed run that stopped early; resuming merges them)")
    state = run_state(d, man["status"])
    for p in shards_in_progress(d, man.get("run_id")):
        what = "being written" if state == "running" else "left unfinished, discarded on resume"
        notes.append(f"{p.file}: {p.rows} rows from sample {p.start} {what} (not counted)")
    warnings += _stray_files(d, {s.file for s in shards})
    deltas = np.concatenate(scan.deltas) if scan.deltas else np.zeros(0)
    return VerifyReport(
        ok=not problems,
        problems=problems,
        samples=sum(s.rows for s in shards),
        total=total,
        status=state,
        shards=len(shards),
        nonfinite=scan.nonfinite,
        nonfinite_samples=sorted(bad + allowed),
        allow_nonfinite=bool(allowed) and not bad,
        max_abs_delta=float(deltas.max()) if deltas.size else math.nan,
        median_abs_delta=float(np.median(deltas)) if deltas.size else math.nan,
        defined_deltas=scan.defined,
        warnings=warnings,
        notes=notes,
        repaired=repaired,
    )


class _Scan:
    """Per-sample value checks accumulated over shards."""

    def __init__(self, allow: bool, has_output: bool = True) -> None:
        self.has_output = has_output  # activations store no F(x): their NaN outputs are placeholders, not values
        self.allow = allow  # the manifest's allow_nonfinite, for shards that do not record theirs
        self.nonfinite = 0
        self.bad: list[np.ndarray] = []  # global indices of samples with any non-finite value, stored without allow_nonfinite
        self.allowed: list[np.ndarray] = []  # ... stored by a call with allow_nonfinite
        self.deltas: list[np.ndarray] = []  # finite |delta| where defined
        self.defined = 0  # samples whose method defines a residual

    def add(self, f: h5py.File) -> None:
        index = f["index"][()]
        counts = f["stats/nonfinite"][()].astype(np.int64)
        out, base, delta = (f[k][()].astype(np.float64) for k in ("output", "baseline_output", "delta"))
        # A NaN F(x0) with a NaN delta means the method defines no residual (e.g. saliency).
        defined = ~np.isnan(base)
        bad = (counts > 0) | (~np.isfinite(out) if self.has_output else np.isinf(out)) | np.isinf(base) | (defined & ~np.isfinite(delta))
        self.nonfinite += int(counts.sum())
        (self.allowed if self._allowed(f) else self.bad).append(index[bad])
        self.deltas.append(np.abs(delta[defined & np.isfinite(delta)]))
        self.defined += int(defined.sum())

    def _allowed(self, f: h5py.File) -> bool:
        """Whether the call that wrote this shard allowed non-finite values (its stamped config)."""
        try:
            config = json.loads(f.attrs["config_json"])
        except (KeyError, TypeError, ValueError):
            return self.allow
        flag = config.get("allow_nonfinite") if isinstance(config, dict) else None
        return flag if isinstance(flag, bool) else self.allow

    def bad_ranges(self, *, allowed: bool = False) -> list[tuple[int, int]]:
        found = self.allowed if allowed else self.bad
        idx = np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
        return value_runs(idx)


def _check(d: Path, s: ShardEntry, scan: _Scan, identity: RunIdentity) -> str | None:
    path = d / s.file
    if not path.is_file():
        return f"{path}: listed in the manifest but missing"
    digest = sha256_file(path)
    if digest != s.sha256:
        return f"{path}: checksum mismatch (manifest {s.sha256[:12]}..., file {digest[:12]}...)"
    try:
        with h5py.File(path, "r") as f:
            check_shard_file(f, s, identity)
            if not np.array_equal(f["index"][()], np.arange(s.start, s.stop)):
                return f"{path}: 'index' is not {s.start}..{s.stop - 1}"
            scan.add(f)
    except StoreError as exc:
        return str(exc)
    except Exception as exc:
        return f"{path}: unreadable ({type(exc).__name__}: {exc})"
    return None


def _stray_files(d: Path, listed: set[str]) -> list[str]:
    out: list[str] = []
    for p in sorted(d.iterdir()):
        name = p.name
        if name.endswith(CORRUPT_SUFFIX):
            out.append(f"{name}: a damaged shard set aside by a resume or --repair (its samples are recomputed); delete it when done")
        elif name.endswith(PARTIAL_SUFFIX) and not name.startswith(OWN_PREFIX):
            out.append(f"{name}: not written by this fastattr (unfinished? ignored, never deleted)")
        elif p.suffix == ".h5" and name not in listed:
            out.append(f"{name}: not listed in the manifest (orphaned or someone else's; ignored)")
    return out

