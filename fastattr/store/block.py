"""The Block a writer takes (one batch of results for contiguous global indices) and its checks,
run in the caller so that a bad block raises where it was made, not later in the writer thread."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .schema import STAT_KEYS


@dataclass
class Block:
    """One batch of results for contiguous global indices [start, stop), as CPU numpy arrays.

    The writer keeps references to these arrays until its thread has written them: do not
    modify them after put() (or call put(block, copy=True)). The shard's ``index`` dataset is
    np.arange(start, stop).
    """

    start: int
    stop: int
    attributions: dict[str, np.ndarray]  # name -> (rows, *feature_shape), float32 or float16 (cast to the storage dtype)
    target: np.ndarray  # (rows,) or (rows, k) int64
    output: np.ndarray  # (rows,) float32, F(x) at the target
    baseline_output: np.ndarray  # (rows,) float32, F(x0) (NaN for methods without a baseline)
    delta: np.ndarray  # (rows,) float32 completeness residual (NaN when not defined)
    n_steps: np.ndarray  # (rows,) int32
    stats: dict[str, np.ndarray]  # STAT_FIELDS (float32) and "nonfinite" (int32), each (rows,)
    # further per-sample fields, stored as extras/<name> (e.g. "lengths" of padded token rows)
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def checked_block(block: Block, *, total: int, copy: bool) -> Block:
    """The block with numpy arrays (copied if copy), after checking its range against [0, total),
    its field names, row counts, dimensions and dtype kinds; ValueError / TypeError otherwise."""
    if not isinstance(block, Block):
        raise TypeError(f"put() takes a Block, got {type(block).__name__}")
    try:
        start, stop = int(block.start), int(block.stop)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"block start/stop must be integers, got {block.start!r}, {block.stop!r}") from exc
    if not 0 <= start <= stop <= total:
        raise ValueError(f"block range [{start}, {stop}) is not inside [0, {total})")
    rows = stop - start

    def arr(name: str, value: Any, kinds: str, ndims: tuple[int, ...]) -> np.ndarray:
        a = np.array(value, copy=True) if copy else np.asarray(value)
        if a.ndim not in ndims or a.shape[0] != rows:
            raise ValueError(f"block field {name!r} has shape {a.shape}; expected {rows} rows for [{start}, {stop})" + (" and 1 dimension" if ndims == (1,) else ""))
        if a.dtype.kind not in kinds:
            raise ValueError(f"block field {name!r} has dtype {a.dtype}; expected kind {kinds!r}")
        return a

    if not isinstance(block.attributions, Mapping) or not block.attributions:
        raise ValueError("block field 'attributions' must be a non-empty dict name -> array")
    attributions: dict[str, np.ndarray] = {}
    for name, value in block.attributions.items():
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"attribution name {name!r} is not a valid HDF5 dataset name (non-empty, no '/')")
        attributions[name] = arr(f"attributions/{name}", value, "fiu", tuple(range(1, 33)))
    if not isinstance(block.stats, Mapping) or set(block.stats) != set(STAT_KEYS):
        got = sorted(block.stats) if isinstance(block.stats, Mapping) else block.stats
        raise ValueError(f"block field 'stats' must have exactly the keys {STAT_KEYS}, got {got}")
    checked = Block(
        start=start,
        stop=stop,
        attributions=attributions,
        target=arr("target", block.target, "iu", (1, 2)),
        output=arr("output", block.output, "fiu", (1,)),
        baseline_output=arr("baseline_output", block.baseline_output, "fiu", (1,)),
        delta=arr("delta", block.delta, "fiu", (1,)),
        n_steps=arr("n_steps", block.n_steps, "iu", (1,)),
        stats={k: arr(f"stats/{k}", block.stats[k], "iu" if k == "nonfinite" else "fiu", (1,)) for k in STAT_KEYS},
        extras={},
    )
    if not isinstance(block.extras, Mapping):
        raise ValueError("block field 'extras' must be a dict name -> array")
    for name, value in block.extras.items():
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"extra field name {name!r} is not a valid HDF5 dataset name (non-empty, no '/')")
        checked.extras[name] = arr(f"extras/{name}", value, "fiub", tuple(range(1, 33)))
    return checked


def block_shapes(block: Block) -> dict[str, Any]:
    """The shapes every block of a run must keep: attribution feature shapes, the target's
    per-sample shape, and the extras' per-sample shapes and dtypes."""
    return {
        "attributions": {name: tuple(a.shape[1:]) for name, a in block.attributions.items()},
        "target": tuple(block.target.shape[1:]),
        "extras": {name: (tuple(a.shape[1:]), a.dtype.str) for name, a in block.extras.items()},
    }


def check_shapes(new: dict[str, Any], old: dict[str, Any]) -> None:
    """ValueError naming the first field whose shapes (block_shapes) differ from the run's."""
    if new == old:
        return
    if set(old["attributions"]) != set(new["attributions"]):
        raise ValueError(f"block field 'attributions' has names {sorted(new['attributions'])}; this run stores {sorted(old['attributions'])}")
    for name, shape in new["attributions"].items():
        if shape != old["attributions"][name]:
            raise ValueError(f"block field 'attributions/{name}' has feature shape {shape}; this run stores {old['attributions'][name]}")
    if new["extras"] != old["extras"]:
        raise ValueError(f"block field 'extras' has {new['extras']}; this run stores {old['extras']}")
    raise ValueError(f"block field 'target' has per-sample shape {new['target']}; this run stores {old['target']}")
