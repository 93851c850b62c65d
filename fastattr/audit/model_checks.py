"""The model-based checks of an audit on a random sample of a run: read the sample (stored
attributions plus the run's data), deletion/insertion against a random-order control, and the
randomization check."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import AuditError
from ..store import RunReader
from .definitions import AttributeFn
from .metrics import auc
from .perturbation import feature_view, perturbation_curves
from .randomization import randomization_check

__all__ = ["model_checks"]


def _sample_indices(reader: RunReader, n: int, seed: int) -> np.ndarray:
    """n distinct stored global indices, uniformly at random (fixed seed), sorted."""
    shards = reader.metadata["shards"]
    rows = np.array([s["rows"] for s in shards], dtype=np.int64)
    starts = np.array([s["start"] for s in shards], dtype=np.int64)
    cum = np.concatenate(([0], np.cumsum(rows)))
    n = min(n, int(cum[-1]))
    pos = np.sort(np.random.default_rng(seed).choice(int(cum[-1]), size=n, replace=False))
    shard = np.searchsorted(cum, pos, side="right") - 1
    return starts[shard] + pos - cum[shard]


def _runs_of(idx: np.ndarray) -> list[tuple[int, int]]:
    if not idx.size:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    lo = np.concatenate(([idx[0]], idx[breaks + 1]))
    hi = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return list(zip(lo.tolist(), hi.tolist()))


def _read_sample(reader: RunReader, source: Any, name: str, idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    attrs, xs, targets = [], [], []
    for lo, hi in _runs_of(idx):
        rows = reader[lo:hi]
        attrs.append(np.asarray(rows["attributions"][name]))
        targets.append(np.asarray(rows["target"]))
        xs.append(source.read(lo, hi)[0][0])
    target = np.concatenate(targets)
    if target.ndim > 1:
        if target.shape[1] != 1:
            raise AuditError(f"model-based checks need one class index per sample; the run stores targets of shape {target.shape[1:]}")
        target = target[:, 0]
    return np.concatenate(attrs), torch.cat(xs), torch.from_numpy(target.astype(np.int64))


def model_checks(
    reader: RunReader, source: Any, model: torch.nn.Module, name: str, *, sample: int, steps: int, replacement: str, value: float,
    blur_sigma: float, score: str, randomization: str, randomization_sample: int, max_similarity: float,
    attribute_fn: AttributeFn | None, max_rows: int, batch_size: int, seed: int,
) -> dict[str, Any]:  # fmt: skip
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    idx = _sample_indices(reader, sample, seed)
    attrs, x, target = _read_sample(reader, source, name, idx)
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    curves: dict[str, list[np.ndarray]] = {k: [] for k in ("deletion", "insertion", "random_deletion", "random_insertion")}
    try:
        for lo in range(0, len(idx), batch_size):
            xb = x[lo : lo + batch_size].to(device, dtype)
            tb = target[lo : lo + batch_size].to(device)
            ab = torch.from_numpy(np.asarray(attrs[lo : lo + batch_size], dtype=np.float32))
            opts = {"steps": steps, "replacement": replacement, "value": value, "blur_sigma": blur_sigma, "score": score, "max_rows": max_rows}
            d, i = perturbation_curves(model, xb, ab, tb, **opts)
            rd, ri = perturbation_curves(model, xb, None, tb, generator=rng, **opts)
            for key, c in zip(curves, (d, i, rd, ri)):
                curves[key].append(c)
    finally:
        model.train(was_training)
    cat = {k: np.concatenate(v) for k, v in curves.items()}
    aucs = {k: auc(c) for k, c in cat.items()}
    n_features = feature_view(tuple(x.shape[1:]))[0]
    frac = [round(t * n_features / steps) / n_features for t in range(steps + 1)]
    pert = {
        "samples": int(len(idx)),
        "steps": steps,
        "replacement": replacement if replacement == "blur" else f"baseline value {value:g}",
        "blur_sigma": blur_sigma if replacement == "blur" else None,
        "score": score,
        "fraction": frac,
        "deletion": {"curve": cat["deletion"].mean(0).tolist(), "auc": float(aucs["deletion"].mean())},
        "insertion": {"curve": cat["insertion"].mean(0).tolist(), "auc": float(aucs["insertion"].mean())},
        "random_control": {
            "deletion": {"curve": cat["random_deletion"].mean(0).tolist(), "auc": float(aucs["random_deletion"].mean())},
            "insertion": {"curve": cat["random_insertion"].mean(0).tolist(), "auc": float(aucs["random_insertion"].mean())},
        },
        "deletion_beats_random_share": float((aucs["deletion"] < aucs["random_deletion"]).mean()),
        "insertion_beats_random_share": float((aucs["insertion"] > aucs["random_insertion"]).mean()),
    }
    pert["beats_random"] = bool(pert["deletion"]["auc"] < pert["random_control"]["deletion"]["auc"] and pert["insertion"]["auc"] > pert["random_control"]["insertion"]["auc"])
    out: dict[str, Any] = {"perturbation": pert}
    if randomization != "none" and attribute_fn is not None:
        k = min(randomization_sample, len(idx))
        xr = x[:k].to(device, dtype)
        out["randomization"] = randomization_check(
            model, xr, target[:k].to(device), attrs[:k], attribute_fn, mode=randomization, max_similarity=max_similarity, seed=seed
        )
    return out
