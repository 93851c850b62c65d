"""Checking a run in full: ``verify_run`` recomputes every shard's checksum, checks its structure
and the coverage of [0, total), and reports residual and non-finite statistics (VerifyReport)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError
from .fsutil import sha256_file
from .manifest import ShardEntry, overlapping_shards, read_listing
from .ranges import complement_ranges, format_ranges
from .schema import MANIFEST_NAME, PARTIAL_SUFFIX
from .shard import check_shard_file


@dataclass
class VerifyReport:
    """verify_run's findings. ok means no problem (integrity: checksums, structure, coverage);
    warnings (non-finite attributions, an unfinished run's missing ranges, stray files) do not
    make a run invalid."""

    ok: bool
    problems: list[str]
    samples: int
    total: int
    status: str = ""
    shards: int = 0
    nonfinite: int = 0  # sum of stats/nonfinite over stored samples
    max_abs_delta: float = math.nan  # over samples with a defined delta
    median_abs_delta: float = math.nan
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        out = [
            f"{head}: {self.samples} of {self.total} samples in {self.shards} shards, status {self.status or '?'}",
            f"non-finite attribution values: {self.nonfinite}",
            f"|delta|: max {self.max_abs_delta:.4g}, median {self.median_abs_delta:.4g}",
        ]
        out += [f"problem: {p}" for p in self.problems]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def verify_run(run_dir: str | os.PathLike[str]) -> VerifyReport:
    """Check a run directory thoroughly (reads every shard in full): manifest schema, each shard's
    sha256 and structure, coverage (no duplicates; every index once for a complete run),
    non-finite counts and residual statistics. Never raises for a damaged run: it reports."""
    d = Path(run_dir)
    try:
        man = read_listing(d)
    except StoreError as exc:
        return VerifyReport(ok=False, problems=[str(exc)], samples=0, total=0)
    shards: list[ShardEntry] = man["shards"]
    total, status = man["total"], man["status"]
    problems: list[str] = []
    warnings: list[str] = []
    nonfinite = 0
    deltas: list[np.ndarray] = []
    for s in shards:
        path = d / s.file
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
            continue
        digest = sha256_file(path)
        if digest != s.sha256:
            problems.append(f"{path}: checksum mismatch (manifest {s.sha256[:12]}..., file {digest[:12]}...)")
            continue
        try:
            with h5py.File(path, "r") as f:
                check_shard_file(f, s)
                if not np.array_equal(f["index"][()], np.arange(s.start, s.stop)):
                    problems.append(f"{path}: 'index' is not {s.start}..{s.stop - 1}")
                nonfinite += int(f["stats/nonfinite"][()].astype(np.int64).sum())
                deltas.append(np.abs(f["delta"][()].astype(np.float64)))
        except StoreError as exc:
            problems.append(str(exc))
        except Exception as exc:
            problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
    for a, b in overlapping_shards(shards):
        problems.append(f"duplicate samples [{b.start}, {min(a.stop, b.stop)}) in {a.file} and {b.file}")
    missing = complement_ranges([(s.start, s.stop) for s in shards], total)
    if missing:
        text = f"{sum(b - a for a, b in missing)} samples not stored: {format_ranges(missing)}"
        (problems if status == "complete" else warnings).append(text)
    if nonfinite:
        warnings.append(f"{nonfinite} non-finite attribution values")
    if man["fragments"]:
        warnings.append(f"{len(man['fragments'])} rank fragments not merged into {MANIFEST_NAME} yet (a distributed run that stopped early; resuming merges them)")
    listed = {s.file for s in shards}
    for p in sorted(d.iterdir()):
        if p.name.endswith(PARTIAL_SUFFIX) or (p.suffix == ".h5" and p.name not in listed):
            warnings.append(f"{p.name}: not listed in the manifest (unfinished or orphaned; ignored)")
    all_d = np.concatenate(deltas) if deltas else np.zeros(0)
    all_d = all_d[np.isfinite(all_d)]
    return VerifyReport(
        ok=not problems,
        problems=problems,
        samples=sum(s.rows for s in shards),
        total=total,
        status=status,
        shards=len(shards),
        nonfinite=nonfinite,
        max_abs_delta=float(all_d.max()) if all_d.size else math.nan,
        median_abs_delta=float(np.median(all_d)) if all_d.size else math.nan,
        warnings=warnings,
    )
