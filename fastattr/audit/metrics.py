"""Per-sample metrics on (B, F) arrays: sparseness, complexity, rank agreement, localization, AUC."""

from __future__ import annotations

import numpy as np

from ..errors import AuditError

__all__ = ["auc", "entropy", "flatten_rows", "gini", "mass_inside", "pointing_game", "prefix_mask", "rankdata", "spearman", "topk_overlap"]


def flatten_rows(a: np.ndarray) -> np.ndarray:
    """(B, ...) -> (B, F)."""
    return np.asarray(a).reshape(a.shape[0], -1)


def prefix_mask(shape: tuple[int, ...], n: np.ndarray) -> np.ndarray:
    """(B, F) booleans: True in the first n[i] columns of row i."""
    return np.arange(shape[1])[None, :] < np.asarray(n).reshape(-1, 1)


def _counts(a: np.ndarray, n: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(features per row, prefix mask or None) for the ``n`` argument of the metrics below."""
    if n is None:
        return np.full(a.shape[0], a.shape[1], dtype=np.int64), None
    return np.asarray(n, dtype=np.int64).reshape(-1), prefix_mask(a.shape, n)


# Every metric below takes ``n``: per row, how many leading features count (the rest is padding,
# e.g. the positions after a token row's length); None counts all. Rows must be finite.


def gini(a: np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """Gini index of |a| along axis 1 (NaN for an all-zero row)."""
    x = np.abs(np.asarray(a, dtype=np.float64))
    f = x.shape[1]
    count, valid = _counts(x, n)
    if valid is None:
        x, k, c = np.sort(x, axis=1), np.arange(1, f + 1, dtype=np.float64), f
    else:  # padding as -1 sorts first; the real values keep their ascending ranks 1..n after it
        x = np.maximum(np.sort(np.where(valid, x, -1.0), axis=1), 0.0)
        k, c = np.arange(1, f + 1, dtype=np.float64)[None, :] - (f - count)[:, None], count[:, None]
    total = x.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x * (2 * k - c - 1)).sum(1) / (count * total), np.nan)


def entropy(a: np.ndarray, n: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(entropy in nats, entropy / log n) of p = |a| / sum|a| along axis 1 (NaN for an all-zero row)."""
    x = np.abs(np.asarray(a, dtype=np.float64))
    count, valid = _counts(x, n)
    if valid is not None:
        x = np.where(valid, x, 0.0)
    total = x.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = x / total
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
        h = np.where(total[:, 0] > 0, h, np.nan)
        return h, np.where(count > 1, h / np.log(np.maximum(count, 2)), 0.0)


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


def spearman(a: np.ndarray, b: np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """Per-row Spearman rank correlation of two (B, F) arrays (NaN where a row is constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    count, valid = _counts(a, n)
    if valid is not None:  # padding as +inf ranks last, so the real values keep ranks 1..n
        a, b = np.where(valid, a, np.inf), np.where(valid, b, np.inf)
    centre = (count[:, None] + 1) / 2.0  # the mean of ranks 1..n, ties included
    ra, rb = rankdata(a) - centre, rankdata(b) - centre
    if valid is not None:
        ra, rb = np.where(valid, ra, 0.0), np.where(valid, rb, 0.0)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def _topk_mask(a: np.ndarray, k: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    x = np.abs(a)
    if valid is None and np.all(k == k[0]):
        idx = np.argpartition(-x, int(k[0]) - 1, axis=1)[:, : int(k[0])]
        mask = np.zeros(a.shape, dtype=bool)
        np.put_along_axis(mask, idx, True, axis=1)
        return mask
    order = np.argsort(-(x if valid is None else np.where(valid, x, -1.0)), axis=1, kind="stable")
    ranks = np.empty(a.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(a.shape[1]), a.shape), axis=1)
    return ranks < k[:, None]


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int | np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """Per row, the share of the k largest-|value| features of a that are also among b's (k: one
    for all rows or one per row)."""
    count, valid = _counts(np.asarray(a), n)
    ks = np.broadcast_to(np.asarray(k, dtype=np.int64), count.shape)
    if ((ks < 1) | (ks > count)).any():
        i = int(np.flatnonzero((ks < 1) | (ks > count))[0])
        raise AuditError(f"top-k needs 1 <= k <= {int(count[i])} features, got k={int(ks[i])}")
    return (_topk_mask(np.asarray(a), ks, valid) & _topk_mask(np.asarray(b), ks, valid)).sum(1) / ks


def mass_inside(a: np.ndarray, mask: np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """Per row, the share of |a| inside the boolean mask (NaN for an all-zero row)."""
    x = np.abs(np.asarray(a, dtype=np.float64))
    _, valid = _counts(x, n)
    if valid is not None:
        x = np.where(valid, x, 0.0)
    total = x.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x * mask).sum(1) / total, np.nan)


def pointing_game(a: np.ndarray, mask: np.ndarray, n: np.ndarray | None = None) -> np.ndarray:
    """Per row, whether the largest attribution value falls inside the mask."""
    a = np.asarray(a)
    _, valid = _counts(a, n)
    top = np.argmax(a if valid is None else np.where(valid, a, -np.inf), axis=1)
    return np.take_along_axis(np.asarray(mask, dtype=bool), top[:, None], axis=1)[:, 0]


def auc(curves: np.ndarray) -> np.ndarray:
    """Trapezoid area under each row of (B, steps + 1) curves sampled evenly on [0, 1]."""
    c = np.asarray(curves, dtype=np.float64)
    steps = c.shape[1] - 1
    return (c[:, :-1] + c[:, 1:]).sum(1) / (2 * steps)
