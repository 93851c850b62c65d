"""Per-sample metrics on (B, F) arrays: sparseness, complexity, rank agreement, localization, AUC."""

from __future__ import annotations

import math

import numpy as np

from ..errors import AuditError

__all__ = ["auc", "entropy", "flatten_rows", "gini", "mass_inside", "pointing_game", "rankdata", "spearman", "topk_overlap"]


def flatten_rows(a: np.ndarray) -> np.ndarray:
    """(B, ...) -> (B, F)."""
    return np.asarray(a).reshape(a.shape[0], -1)


def gini(a: np.ndarray) -> np.ndarray:
    """Gini index of |a| along axis 1 (NaN for an all-zero row)."""
    x = np.sort(np.abs(np.asarray(a, dtype=np.float64)), axis=1)
    n = x.shape[1]
    total = x.sum(1)
    k = np.arange(1, n + 1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x * (2 * k - n - 1)).sum(1) / (n * total), np.nan)


def entropy(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(entropy in nats, entropy / log n) of p = |a| / sum|a| along axis 1 (NaN for an all-zero row)."""
    x = np.abs(np.asarray(a, dtype=np.float64))
    n = x.shape[1]
    total = x.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = x / total
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
    h = np.where(total[:, 0] > 0, h, np.nan)
    return h, (h / math.log(n) if n > 1 else np.zeros_like(h))


def rankdata(a: np.ndarray) -> np.ndarray:
    """1-based ranks along axis 1 of a (B, F) array; tied values share their average rank."""
    a = np.asarray(a)
    b, f = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    new = np.ones((b, f), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    # Tie groups numbered globally (row offset), so one bincount averages positions for all rows.
    gid = np.cumsum(new, axis=1) - 1 + (np.arange(b) * f)[:, None]
    pos = np.broadcast_to(np.arange(1, f + 1, dtype=np.float64), (b, f))
    avg = np.bincount(gid.ravel(), weights=pos.ravel(), minlength=b * f) / np.maximum(np.bincount(gid.ravel(), minlength=b * f), 1)
    ranks = np.empty((b, f), dtype=np.float64)
    np.put_along_axis(ranks, order, avg[gid], axis=1)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row Spearman rank correlation of two (B, F) arrays (NaN where a row is constant)."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def _topk_mask(a: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(-np.abs(a), k - 1, axis=1)[:, :k]
    mask = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """Per row, the share of the k largest-|value| features of a that are also among b's."""
    if not 1 <= k <= a.shape[1]:
        raise AuditError(f"top-k needs 1 <= k <= {a.shape[1]} features, got k={k}")
    return (_topk_mask(a, k) & _topk_mask(b, k)).sum(1) / k


def mass_inside(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, the share of |a| inside the boolean mask (NaN for an all-zero row)."""
    x = np.abs(np.asarray(a, dtype=np.float64))
    total = x.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x * mask).sum(1) / total, np.nan)


def pointing_game(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, whether the largest attribution value falls inside the mask."""
    top = np.argmax(np.asarray(a), axis=1)
    return np.take_along_axis(np.asarray(mask, dtype=bool), top[:, None], axis=1)[:, 0]


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row of (B, steps + 1) curves sampled evenly on [0, 1]."""
    c = np.asarray(curves, dtype=np.float64)
    steps = c.shape[1] - 1
    return (c[:, :-1] + c[:, 1:]).sum(1) / (2 * steps)
