"""What fastattr may delete in a run directory, and nothing else.

fastattr deletes a file only when it can tell the file is its own:

* names in its own namespace (``.fastattr-*``): shards being written, temporary manifests, probes
  (the lock files are never deleted);
* shard files (``<prefix>-<n>.h5``) that a manifest of the run lists or that are orphans of the run
  (finished but never listed), and only if the file proves to be a fastattr shard (``owned_shard``).

Everything else is left alone (and logged): files of any other name, legacy ``*.partial`` files it
cannot prove, files a foreign ``manifest.json`` names. A directory without a fastattr run that
holds anything outside the namespace is refused unless the caller allows other files; a listed
shard that fails its checks is renamed to ``<name>.corrupt``, never deleted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import h5py

from .manifest import shard_file_id
from .schema import OWN_PREFIX, PARTIAL_SUFFIX
from .shard import read_marker

logger = logging.getLogger(__name__)


def owned_shard(path: Path, run_id: str | None = None) -> bool:
    """Whether path is a shard fastattr wrote: it carries the marker (schema 2), or it is an HDF5
    file whose attributes name it as the shard of that number (schema 1). A user's file of the
    same name is neither. With ``run_id``: a shard of that run (a shard of another run, e.g. one
    a user copied in, is not that run's to delete; a schema-1 shard without a run id still is)."""
    marker = read_marker(path)
    if marker is not None:
        return run_id is None or marker.run_id == run_id
    number = shard_file_id(path.name)
    if number is None:
        return False
    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            stamped = attrs.get("run_id")
            theirs = run_id is None or not stamped or str(stamped) == run_id
            return (
                "config_json" in attrs
                and "schema_version" in attrs
                and int(attrs.get("shard_id", -1)) == number
                and theirs
            )
    except Exception:  # not HDF5, or unreadable: nothing proves it is ours
        return False


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in run_dir outside fastattr's namespace (sorted): a directory with no fastattr run
    that holds any of these is someone else's."""
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(OWN_PREFIX))


def delete_own_temporaries(run_dir: Path) -> None:
    """Delete fastattr's unfinished files (``.fastattr-*.partial``); log other ``*.partial`` files,
    which it cannot prove it wrote (e.g. left by a fastattr before the namespace), and keep them."""
    for p in sorted(run_dir.iterdir()):
        if not p.name.endswith(PARTIAL_SUFFIX):
            continue
        if p.name.startswith(OWN_PREFIX):
            logger.info("deleting unfinished file %s", p)
            p.unlink(missing_ok=True)
        else:
            logger.warning("leaving %s alone: fastattr cannot tell that it wrote it (delete it yourself if it did)", p)


def delete_shards(run_dir: Path, names: Iterable[str], why: str, *, run_id: str | None = None) -> None:
    """Delete the named shard files that prove to be fastattr's (with ``run_id``: shards of that
    run); keep (and log) any other."""
    for name in sorted(set(names)):
        p = run_dir / name
        if not p.is_file():
            continue
        if owned_shard(p, run_id):
            logger.warning("deleting %s: %s", p, why)
            p.unlink(missing_ok=True)
        else:
            whose = "not a shard of this run" if run_id is not None and owned_shard(p) else "not a fastattr shard"
            logger.warning("leaving %s alone: %s, but it is %s", p, why, whose)


def unlisted_shards(run_dir: Path, listed: Iterable[str], prefix: str) -> list[str]:
    """Shard-named files of this prefix that no listing names (orphans, or someone else's)."""
    pattern = re.compile(re.escape(prefix) + r"-\d+\.h5")
    keep = set(listed)
    return sorted(p.name for p in run_dir.iterdir() if pattern.fullmatch(p.name) and p.name not in keep)


def next_shard_id(run_dir: Path, listed: Iterable[str], prefix: str) -> int:
    """The first shard number above every listed shard and every file whose name holds a shard
    name of this prefix (kept user files, ``.corrupt`` files, leftovers): new shards never take a
    name that exists."""
    ids = [i for i in (shard_file_id(n) for n in listed) if i is not None]
    pattern = re.compile(re.escape(prefix) + r"-(\d+)\.h5")
    ids += [int(m.group(1)) for p in run_dir.iterdir() if (m := pattern.search(p.name))]
    return max(ids) + 1 if ids else 0
