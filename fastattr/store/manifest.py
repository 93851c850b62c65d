"""Manifests: reading and validating ``manifest.json`` and the rank fragments
``manifest.rank-XXXXX.json`` (same format), the shard listing they hold, and config comparison.

The manifest is the only source of truth: a shard is trusted exactly when a manifest (or, until
rank 0 merges it, a fragment of the same run) lists it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .schema import FRAGMENT_RE, MANIFEST_NAME, READ_SCHEMAS, SHARD_ID_RE, STATUSES

logger = logging.getLogger(__name__)

# How every manifest fastattr writes begins (json.dump, indent=1, schema_version first): a file that
# does not parse but starts so is a damaged fastattr manifest rather than someone else's file.
MANIFEST_HEAD = b'{\n "schema_version": '


@dataclass(frozen=True)
class ShardEntry:
    """One manifest entry."""

    file: str
    start: int
    stop: int
    rows: int
    sha256: str

    def entry(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "stop": self.stop, "rows": self.rows, "sha256": self.sha256}


def shard_file_id(name: str) -> int | None:
    """The number in a shard file name ``<prefix>-<number>.h5`` (None for other names)."""
    m = SHARD_ID_RE.search(name)
    return int(m.group(1)) if m else None


def jsonable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as it will read back from the manifest (tuples -> lists, int keys -> str), so a
    freshly passed config and a stored one compare equal when they mean the same thing."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable: {exc}") from exc


def config_diff(old: Any, new: Any, volatile: frozenset[str], prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ (volatile keys ignored at any depth)."""
    if isinstance(old, dict) and isinstance(new, dict):
        diffs: list[str] = []
        for key in sorted((set(old) | set(new)) - volatile):
            path = f"{prefix}.{key}" if prefix else key
            if key not in old or key not in new:
                diffs.append(path)
            else:
                diffs.extend(config_diff(old[key], new[key], volatile, path))
        return diffs
    # Compare serialised forms: NaN == NaN there, and int/float spellings stay distinct as stored.
    same = json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)
    return [] if same else [prefix or "config"]


def run_diff(man: dict[str, Any], config: dict[str, Any], total: int, volatile: frozenset[str]) -> list[str]:
    """What differs between a stored run (a read manifest) and the run described by config and
    total: "total" first, then the config's differing key paths."""
    diffs = config_diff(man["config"], config, volatile)
    if man["total"] != total:
        diffs.insert(0, "total")
    return diffs


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and validate a manifest (or fragment); any problem is a StoreError naming the file.
    ``shards`` comes back as ShardEntry objects sorted by start."""
    if not path.is_file():
        raise StoreError(f"{path}: no manifest (not a fastattr run directory, or the run never started)")
    try:
        with open(path, encoding="utf-8") as f:
            man = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: cannot read the manifest: {exc}") from exc
    if not isinstance(man, dict):
        raise StoreError(f"{path}: the manifest is not a JSON object")
    if man.get("schema_version") not in READ_SCHEMAS:
        raise StoreError(f"{path}: schema_version {man.get('schema_version')!r} is not supported (this fastattr reads {', '.join(map(str, READ_SCHEMAS))})")
    total = man.get("total")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise StoreError(f"{path}: 'total' must be a non-negative integer, got {total!r}")
    if man.get("status") not in STATUSES:
        raise StoreError(f"{path}: 'status' must be one of {STATUSES}, got {man.get('status')!r}")
    if not isinstance(man.get("config"), dict):
        raise StoreError(f"{path}: 'config' must be an object")
    shards = man.get("shards")
    if not isinstance(shards, list):
        raise StoreError(f"{path}: 'shards' must be a list")
    parsed: list[ShardEntry] = []
    for i, entry in enumerate(shards):
        try:
            s = ShardEntry(str(entry["file"]), int(entry["start"]), int(entry["stop"]), int(entry["rows"]), str(entry["sha256"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise StoreError(f"{path}: shard entry {i} is malformed ({exc!r}): {entry!r}") from exc
        # Shard files live in the run directory itself: refuse paths that would escape it.
        if not s.file or Path(s.file).name != s.file or s.file in (".", ".."):
            raise StoreError(f"{path}: shard entry {i} has an invalid file name {s.file!r}")
        if not (0 <= s.start < s.stop <= total) or s.rows != s.stop - s.start:
            raise StoreError(f"{path}: shard {s.file} has an invalid range [{s.start}, {s.stop}) / rows {s.rows} (total {total})")
        parsed.append(s)
    man["shards"] = sorted(parsed, key=lambda s: s.start)
    return man


def manifest_kind(path: Path) -> str:
    """What a manifest-named file is: "none" (absent), "ours" (a JSON object with a manifest's
    keys), "damaged" (unparseable but written by fastattr, see MANIFEST_HEAD) or "foreign" (someone
    else's file: fastattr must neither replace it nor act on the files it names)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return "none"
    except OSError:
        return "damaged" if path.name == MANIFEST_NAME else "foreign"  # unreadable: let read_manifest say why
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "damaged" if raw.startswith(MANIFEST_HEAD) else "foreign"
    return "ours" if isinstance(obj, dict) and {"schema_version", "shards", "config"} <= obj.keys() else "foreign"


def read_fragments(run_dir: Path, run_id: str | None, total: int) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """The rank fragments in run_dir: (path, parsed) of those belonging to run ``run_id``, and the
    paths of stale ones (another run's, e.g. left by a crash before an overwrite). Files of a
    fragment's name that are not fastattr manifests are someone else's: ignored, never deleted."""
    ours: list[tuple[Path, dict[str, Any]]] = []
    stale: list[Path] = []
    for p in sorted(run_dir.iterdir()):
        if not FRAGMENT_RE.fullmatch(p.name):
            continue
        if manifest_kind(p) == "foreign":
            logger.warning("ignoring %s: not a fastattr manifest fragment", p)
            continue
        try:
            frag = read_manifest(p)
        except StoreError:
            if not p.exists():  # merged and deleted by rank 0 while we listed the directory
                continue
            raise
        if run_id is not None and frag.get("run_id") == run_id and frag["total"] == total:
            ours.append((p, frag))
        else:
            stale.append(p)
    return ours, stale


def union_shards(base: list[ShardEntry], extra: Iterable[ShardEntry], where: Path) -> list[ShardEntry]:
    """base plus extra, one entry per file, sorted by start; the same file listed twice must be
    listed identically (rank 0 may have merged a fragment before it was deleted)."""
    by_file = {s.file: s for s in base}
    for s in extra:
        old = by_file.setdefault(s.file, s)
        if old != s:
            raise StoreError(f"{where}: lists {s.file} as [{s.start}, {s.stop}) sha256 {s.sha256[:12]}..., another listing as [{old.start}, {old.stop}) {old.sha256[:12]}...")
    return sorted(by_file.values(), key=lambda s: s.start)


def read_listing(run_dir: Path) -> dict[str, Any]:
    """manifest.json plus the shards listed by rank fragments of the same run (a distributed run
    whose ranks finalized shards that rank 0 has not merged yet, e.g. after a crash): every
    finalized shard, as one run. ``fragments`` names the fragment files merged here."""
    man = read_manifest(run_dir / MANIFEST_NAME)
    ours, _ = read_fragments(run_dir, man.get("run_id"), man["total"])
    for path, frag in ours:
        man["shards"] = union_shards(man["shards"], frag["shards"], path)
    man["fragments"] = [path.name for path, _ in ours]
    return man


def overlapping_shards(shards: list[ShardEntry]) -> list[tuple[ShardEntry, ShardEntry]]:
    """Pairs (earlier, later) of shards, sorted by start, whose ranges overlap."""
    out = []
    furthest: ShardEntry | None = None
    for s in shards:
        if furthest is not None and s.start < furthest.stop:
            out.append((furthest, s))
        if furthest is None or s.stop > furthest.stop:
            furthest = s
    return out
