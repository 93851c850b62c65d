"""Audits of stored attributions: is a run's output trustworthy, and how good are the attributions?

Everything reads a run directory through ``fastattr.open`` and streams it with
``RunReader.iter_batches``, so memory is one batch plus fixed-size summaries, whatever the run
size. Per-sample scalars (residuals, Gini, entropy, agreement, localization) go into a
``Distribution``: running count / mean / min / max, a fixed-bin histogram (for the plots), and a
uniform reservoir sample of ``RESERVOIR`` values (Algorithm R, fixed seed) from which quantiles are
read; quantiles are exact while the run has at most ``RESERVOIR`` samples and estimates above that
(each such entry says ``"quantiles_exact": false``). Per-class mean maps are running float64 sums,
one per target class (at most ``max_class_maps`` classes, so their memory is bounded too).

Three groups of metrics:

* from the attributions alone: completeness residual (absolute, relative), non-finite counts,
  sparseness (Gini), complexity (entropy), per-class mean maps, agreement with a second run
  (Spearman rank correlation and top-k overlap per sample, aligned by global index), and
  localization against ground-truth masks (mass inside, pointing game);
* with the model, on a sample of the run (forward passes only, batched): deletion and insertion
  curves and their AUC (Petsiuk et al. 2018), against a random-order control with a fixed seed;
* with the model and re-attribution: the randomization sanity check (Adebayo et al. 2018),
  cascading from the top layer or all layers at once, on a deep copy of the model.

``audit_run`` runs them all and returns an ``AuditResult`` (a JSON-able document where every
number sits next to its definition); ``fastattr.audit_report`` writes the JSON, a Markdown report
with PNG plots and the terminal summary.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import AuditError  # noqa: F401 - re-exported
from .store import RunReader, open_run

logger = logging.getLogger(__name__)

__all__ = [
    "DEFINITIONS",
    "THRESHOLDS",
    "AuditError",
    "AuditResult",
    "Distribution",
    "StreamingAudit",
    "audit_run",
    "auc",
    "check_thresholds",
    "entropy",
    "gini",
    "mass_inside",
    "parameterized_layers",
    "perturbation_curves",
    "pointing_game",
    "randomization_check",
    "rankdata",
    "spearman",
    "topk_overlap",
]

RESERVOIR = 8192  # values kept per Distribution for quantiles (exact below this many samples)
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
REL_EPS = 1e-12  # floor of |F(x) - F(x0)| in the relative residual (the runner's summary uses the same)
LOG_BINS = np.logspace(-12, 4, 16 * 8 + 1)  # 8 bins per decade from 1e-12 to 1e4 (residuals, errors)
UNIT_BINS = np.linspace(0.0, 1.0, 51)
SIGNED_BINS = np.linspace(-1.0, 1.0, 81)
DEFAULT_MAX_SIMILARITY = 0.5

AttributeFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# Every number in the JSON report is defined here, keyed by its path in the document.
DEFINITIONS: dict[str, str] = {
    "samples": "stored samples read (the whole run, streamed shard by shard)",
    "residual.abs": "completeness residual |delta| = |sum(attr) - (F(x) - F(x0))| per sample, as stored by the run",
    "residual.rel": f"relative completeness residual |delta| / max(|F(x) - F(x0)|, {REL_EPS:g}) per sample",
    "residual.undefined": "samples whose method defines no residual (no baseline output, e.g. saliency)",
    "residual.nonfinite": "samples whose residual is NaN or infinite although the method defines one",
    "nonfinite.values": "non-finite attribution values (NaN, +-inf) over all stored attributions (sum of stats/nonfinite)",
    "nonfinite.samples": "samples of the audited attribution with at least one non-finite value (excluded from the per-sample metrics)",
    "zero_samples": "samples whose audited attribution is all zero (excluded from Gini, entropy, agreement, localization)",
    "gini": "sparseness: Gini index of |attr| per sample, sum_k (2k - n - 1) a_(k) / (n sum_k a_(k)) over the n values "
    "sorted ascending (0: uniform, 1 - 1/n: one feature holds everything; Hurley & Rickard 2009, Chalasani et al. 2020)",
    "entropy": "complexity: Shannon entropy -sum p log p (nats) of p = |attr| / sum|attr| per sample (Bhatt et al. 2020)",
    "entropy_normalized": "entropy / log(n) per sample: 0 when one feature holds all mass, 1 when the mass is uniform",
    "class_maps": "per target class: the mean attribution map over the samples with that target (non-finite values as 0); "
    "maps in class_maps.npz, here the count, the map's sum and its L1 norm",
    "agreement.spearman": "per sample, Spearman rank correlation between the two runs' attributions (signed values; ties get "
    "their average rank), samples aligned by global index",
    "agreement.topk_overlap": "per sample, |top-k(|a|) & top-k(|b|)| / k, the share of the k largest-magnitude features both runs agree on",
    "agreement.rel_l2": "per sample, ||a - b||_2 / ||b||_2 with b the compared run",
    "localization.mass_inside": "per sample, sum of |attr| inside the ground-truth mask / sum of |attr|",
    "localization.pointing_game": "share of samples whose largest attribution value lies inside the mask (Zhang et al. 2018, no tolerance)",
    "localization.mask_fraction": "mean share of features inside the mask: what a uniform random attribution scores on both measures",
    "deletion": "Petsiuk et al. 2018: features in descending order of attribution are replaced step by step by the replacement "
    "(pixels, all channels together, for (C, H, W) inputs; elements otherwise); the curve is the model's score for the "
    "target after each step, from 0 to all features replaced; lower AUC is better",
    "insertion": "the reverse: start from the replacement and put the original features back in descending order of "
    "attribution; higher AUC is better",
    "auc": "area under the mean-normalised curve: trapezoid over the fraction of features changed in [0, 1], averaged over the sample",
    "random_control": "the same curves with a uniformly random feature order per sample (fixed seed)",
    "beats_random": "deletion AUC below the random control's and insertion AUC above it",
    "randomization": "Adebayo et al. 2018: the sample is re-attributed with the model's parameters replaced by Gaussian noise of "
    "each tensor's mean and std (a deep copy; 'cascade' from the top layer down, 'all' at once); similarity = mean over "
    "the sample of the Spearman rank correlation of |attr| between the stored and the re-computed attributions",
    "randomization.passed": "true when the similarity with every layer randomized is below max_similarity: attributions that "
    "barely change when the model is destroyed do not explain the model",
    "randomization.reproduced": "similarity of a re-attribution with the unchanged model to the stored attributions (near 1: "
    "the re-attribution reproduces the run, so changes come from the randomization)",
}

# Gating thresholds: name -> (what is compared, description) for check_thresholds and the CLI.
THRESHOLDS: dict[str, str] = {
    "max_residual": "largest absolute completeness residual <= value",
    "max_rel_residual": "median relative completeness residual <= value",
    "max_nonfinite": "non-finite attribution values <= value",
    "min_agreement": "mean Spearman correlation with the compared run >= value",
    "min_topk_overlap": "mean top-k overlap with the compared run >= value",
    "min_mass_inside": "mean attribution mass inside the masks >= value",
    "require_beats_random": "deletion and insertion AUC better than the random control (value true)",
    "require_randomization": "the randomization check passes (value true)",
}


# ----------------------------------------------------------------------------------------------
# streaming summaries
# ----------------------------------------------------------------------------------------------


class Distribution:
    """Bounded-memory summary of one scalar per sample: moments, histogram, reservoir quantiles."""

    def __init__(self, edges: np.ndarray, reservoir: int = RESERVOIR, seed: int = 0) -> None:
        self.edges = np.asarray(edges, dtype=np.float64)
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.underflow = 0  # below the first edge (zeros on a log scale)
        self.overflow = 0
        self.count = 0  # finite values seen
        self.nonfinite = 0
        self._sum = 0.0
        self._sumsq = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._cap = int(reservoir)
        self._res = np.empty(self._cap, dtype=np.float64)
        self._rng = np.random.default_rng(seed)

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(v)
        self.nonfinite += int((~finite).sum())
        v = v[finite]
        if not v.size:
            return
        self._sum += float(v.sum())
        self._sumsq += float(np.square(v).sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        self.underflow += int((v < self.edges[0]).sum())
        self.overflow += int((v > self.edges[-1]).sum())
        inside = v[(v >= self.edges[0]) & (v <= self.edges[-1])]
        self.counts += np.histogram(inside, bins=self.edges)[0]
        # Algorithm R, vectorised: value number i (0-based) replaces slot j ~ U[0, i] when j < cap.
        pos = self.count + np.arange(v.size)
        fill = pos < self._cap
        self._res[pos[fill]] = v[fill]
        rest = ~fill
        if rest.any():
            j = np.floor(self._rng.random(int(rest.sum())) * (pos[rest] + 1)).astype(np.int64)
            keep = j < self._cap
            self._res[j[keep]] = v[rest][keep]
        self.count += v.size

    @property
    def mean(self) -> float:
        return self._sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        held = self._res[: min(self.count, self._cap)]
        return float(np.quantile(held, q)) if held.size else math.nan

    def to_dict(self) -> dict[str, Any]:
        var = max(self._sumsq / self.count - self.mean**2, 0.0) if self.count else math.nan
        return {
            "count": self.count,
            "nonfinite": self.nonfinite,
            "mean": self.mean,
            "std": math.sqrt(var) if self.count else math.nan,
            "min": self.min if self.count else math.nan,
            "max": self.max if self.count else math.nan,
            "quantiles": {f"p{round(q * 100):02d}": self.quantile(q) for q in QUANTILES},
            "quantiles_exact": self.count <= self._cap,
            "histogram": {"edges": self.edges.tolist(), "counts": self.counts.tolist(), "underflow": self.underflow, "overflow": self.overflow},
        }


# ----------------------------------------------------------------------------------------------
# per-sample metrics on (B, F) arrays
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# streaming over a run
# ----------------------------------------------------------------------------------------------


def _flat(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).reshape(a.shape[0], -1)


def _class_key(target_row: np.ndarray) -> str:
    t = np.atleast_1d(target_row)
    return ",".join(str(int(v)) for v in t)


class StreamingAudit:
    """Accumulates the attribution-only metrics batch by batch (memory: fixed-size summaries)."""

    def __init__(self, name: str, feature_shape: tuple[int, ...], *, top_k: int | None = None, max_class_maps: int = 64, seed: int = 0) -> None:
        self.name = name
        self.feature_shape = tuple(feature_shape)
        n = math.prod(self.feature_shape)
        self.top_k = top_k if top_k is not None else max(1, round(0.1 * n))
        if not 1 <= self.top_k <= n:
            raise AuditError(f"top_k must be in [1, {n}] for attributions of shape {self.feature_shape}, got {self.top_k}")
        self.max_class_maps = max_class_maps
        self.samples = 0
        self.residual_abs = Distribution(LOG_BINS, seed=seed)
        self.residual_rel = Distribution(LOG_BINS, seed=seed + 1)
        self.residual_undefined = 0
        self.nonfinite_values = 0
        self.nonfinite_samples = 0
        self.zero_samples = 0
        self.gini = Distribution(UNIT_BINS, seed=seed + 2)
        self.entropy = Distribution(np.linspace(0.0, math.log(n) if n > 1 else 1.0, 51), seed=seed + 3)
        self.entropy_norm = Distribution(UNIT_BINS, seed=seed + 4)
        self.class_sums: dict[str, np.ndarray] = {}
        self.class_counts: dict[str, int] = {}
        self.unmapped_samples = 0  # samples of classes beyond max_class_maps
        self.compared = 0
        self.spearman = Distribution(SIGNED_BINS, seed=seed + 5)
        self.topk = Distribution(UNIT_BINS, seed=seed + 6)
        self.rel_l2 = Distribution(LOG_BINS, seed=seed + 7)
        self.localized = 0
        self.mass_inside = Distribution(UNIT_BINS, seed=seed + 8)
        self.pointing_hits = 0
        self.mask_fraction_sum = 0.0

    def update(self, batch: Mapping[str, Any], other: Mapping[str, Any] | None = None, masks: np.ndarray | None = None) -> None:
        """One batch as RunReader returns it; ``other``: the compared run's rows for the same
        indices; ``masks``: (rows, ...) booleans broadcastable to one sample's attribution."""
        a = np.asarray(batch["attributions"][self.name])
        rows = a.shape[0]
        self.samples += rows
        # Residuals: NaN with a NaN baseline output means "not defined by the method".
        delta = np.asarray(batch["delta"], dtype=np.float64)
        diff = np.abs(np.asarray(batch["output"], dtype=np.float64) - np.asarray(batch["baseline_output"], dtype=np.float64))
        undefined = np.isnan(delta) & np.isnan(np.asarray(batch["baseline_output"], dtype=np.float64))
        self.residual_undefined += int(undefined.sum())
        d = np.abs(delta[~undefined])
        self.residual_abs.add(d)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.residual_rel.add(d / np.maximum(diff[~undefined], REL_EPS))
        self.nonfinite_values += int(np.asarray(batch["stats"]["nonfinite"], dtype=np.int64).sum())

        flat = _flat(a).astype(np.float64)
        finite = np.isfinite(flat).all(1)
        self.nonfinite_samples += int((~finite).sum())
        self._class_maps(np.where(np.isfinite(flat), flat, 0.0), np.asarray(batch["target"]))
        nonzero = (flat != 0).any(1) & finite
        self.zero_samples += int((finite & ~nonzero).sum())
        ok = flat[nonzero]
        if ok.shape[0]:
            self.gini.add(gini(ok))
            h, hn = entropy(ok)
            self.entropy.add(h)
            self.entropy_norm.add(hn)
        if other is not None:
            b = _flat(np.asarray(other["attributions"][self.name])).astype(np.float64)
            both = nonzero & np.isfinite(b).all(1) & (b != 0).any(1)
            self.compared += int(both.sum())
            if both.any():
                x, y = flat[both], b[both]
                self.spearman.add(spearman(x, y))
                self.topk.add(topk_overlap(x, y, self.top_k))
                self.rel_l2.add(np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1))
        if masks is not None:
            m = _flat(np.broadcast_to(np.asarray(masks, dtype=bool), a.shape))
            self.mask_fraction_sum += float(m[nonzero].mean(1).sum())
            self.localized += int(nonzero.sum())
            if ok.shape[0]:
                self.mass_inside.add(mass_inside(ok, m[nonzero]))
                self.pointing_hits += int(pointing_game(ok, m[nonzero]).sum())

    def _class_maps(self, flat: np.ndarray, target: np.ndarray) -> None:
        keys = [_class_key(t) for t in target] if target.ndim > 1 else [str(int(t)) for t in target]
        for key in dict.fromkeys(keys):
            sel = np.fromiter((k == key for k in keys), dtype=bool, count=len(keys))
            if key not in self.class_sums:
                if len(self.class_sums) >= self.max_class_maps:
                    self.unmapped_samples += int(sel.sum())
                    continue
                self.class_sums[key] = np.zeros(flat.shape[1], dtype=np.float64)
                self.class_counts[key] = 0
            self.class_sums[key] += flat[sel].sum(0)
            self.class_counts[key] += int(sel.sum())

    def class_maps(self) -> dict[str, np.ndarray]:
        """Mean attribution map per target class, in the attribution's shape."""
        return {k: (s / self.class_counts[k]).reshape(self.feature_shape) for k, s in sorted(self.class_sums.items(), key=lambda kv: _sort_key(kv[0]))}

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "samples": self.samples,
            "attribution": {"name": self.name, "shape": list(self.feature_shape)},
            "residual": {
                "abs": self.residual_abs.to_dict(),
                "rel": self.residual_rel.to_dict(),
                "undefined": self.residual_undefined,
                "nonfinite": self.residual_abs.nonfinite,
            },
            "nonfinite": {"values": self.nonfinite_values, "samples": self.nonfinite_samples},
            "zero_samples": self.zero_samples,
            "gini": self.gini.to_dict(),
            "entropy": self.entropy.to_dict(),
            "entropy_normalized": self.entropy_norm.to_dict(),
            "class_maps": {
                "classes": {
                    k: {"count": self.class_counts[k], "sum": float(m.sum()), "l1": float(np.abs(m).sum())} for k, m in self.class_maps().items()
                },
                "unmapped_samples": self.unmapped_samples,
                "max_classes": self.max_class_maps,
            },
        }
        if self.compared or self.spearman.nonfinite:
            out["agreement"] = {"samples": self.compared, "top_k": self.top_k, "spearman": self.spearman.to_dict(), "topk_overlap": self.topk.to_dict(), "rel_l2": self.rel_l2.to_dict()}
        if self.localized:
            out["localization"] = {
                "samples": self.localized,
                "mass_inside": self.mass_inside.to_dict(),
                "pointing_game": self.pointing_hits / self.localized,
                "mask_fraction": self.mask_fraction_sum / self.localized,
            }
        return out


def _sort_key(key: str) -> tuple[int, ...] | tuple[float]:
    try:
        return tuple(int(v) for v in key.split(","))
    except ValueError:
        return (math.inf,)


# ----------------------------------------------------------------------------------------------
# model-based checks
# ----------------------------------------------------------------------------------------------


def _score(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """(rows,) model score at the target: softmax probability or raw output."""
    out = model(x)
    flat = out.reshape(out.shape[0], -1).float()
    if flat.shape[1] == 1:
        return flat[:, 0]
    if score == "softmax":
        flat = flat.softmax(1)
    return flat.gather(1, target.reshape(-1, 1)).squeeze(1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the last two dimensions (replicate padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    h, w = x.shape[-2:]
    y = x.reshape(-1, 1, h, w)
    y = torch.nn.functional.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    y = torch.nn.functional.pad(y, (0, 0, radius, radius), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(x.shape)


def _replacement(x: torch.Tensor, replacement: str, value: float, blur_sigma: float) -> torch.Tensor:
    if replacement == "blur":
        return _blur(x, blur_sigma)
    return torch.full_like(x, value)


def _feature_view(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Features per sample and the broadcast shape of a feature mask: pixels for (C, H, W)."""
    if len(shape) == 3:
        return shape[1] * shape[2], (1, shape[1], shape[2])
    return math.prod(shape), shape


def perturbation_curves(
    model: torch.nn.Module,
    x: torch.Tensor,
    attr: torch.Tensor | None,
    target: torch.Tensor,
    *,
    steps: int = 20,
    replacement: str = "baseline",
    value: float = 0.0,
    blur_sigma: float = 2.0,
    score: str = "softmax",
    max_rows: int = 2048,
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves, each (B, steps + 1), for inputs x (B, *shape).

    Features are ordered by descending attribution (``attr`` of x's shape; for (C, H, W) inputs
    the channel sum per pixel), or uniformly at random with ``generator`` when ``attr`` is None.
    After step t the first round(t * P / steps) of the P features are replaced (deletion) or
    restored onto the replacement (insertion). Forward passes only, at most ``max_rows`` rows each.
    """
    if steps < 1:
        raise AuditError(f"steps must be >= 1, got {steps}")
    b, shape = x.shape[0], tuple(x.shape[1:])
    p, mask_shape = _feature_view(shape)
    if attr is not None:
        imp = attr.detach().to(torch.float64).cpu().reshape(b, *shape)
        imp = imp.sum(1) if len(shape) == 3 else imp
        keys = -imp.reshape(b, p).numpy()
    else:
        if generator is None:
            raise AuditError("perturbation_curves needs attr or a random generator for the control")
        keys = generator.random((b, p))
    order = np.argsort(keys, axis=1, kind="stable")
    ranks = np.empty((b, p), dtype=np.int64)
    np.put_along_axis(ranks, order, np.arange(p), axis=1)
    ranks_t = torch.from_numpy(ranks).to(x.device).reshape(b, *mask_shape)
    base = _replacement(x, replacement, value, blur_sigma)
    counts = [round(t * p / steps) for t in range(steps + 1)]
    per_chunk = max(1, max_rows // b)
    curves = {"deletion": np.empty((b, steps + 1)), "insertion": np.empty((b, steps + 1))}
    tgt = target.to(x.device)
    with torch.no_grad():
        for lo in range(0, steps + 1, per_chunk):
            ts = range(lo, min(lo + per_chunk, steps + 1))
            masks = torch.stack([ranks_t < counts[t] for t in ts])  # (T, B, *mask_shape): True = changed
            deleted = torch.where(masks, base.unsqueeze(0), x.unsqueeze(0)).reshape(-1, *shape)
            inserted = torch.where(masks, x.unsqueeze(0), base.unsqueeze(0)).reshape(-1, *shape)
            tt = tgt.repeat(len(ts))
            curves["deletion"][:, lo : lo + len(ts)] = _score(model, deleted, tt, score).reshape(len(ts), b).T.cpu().numpy()
            curves["insertion"][:, lo : lo + len(ts)] = _score(model, inserted, tt, score).reshape(len(ts), b).T.cpu().numpy()
    return curves["deletion"], curves["insertion"]


def parameterized_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules holding parameters of their own, in registration order (the input side first for
    sequential models; cascading randomization walks this list backwards)."""
    return [(name, m) for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Replace each parameter with Gaussian noise of its own mean and std (1e-2 if constant)."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            f = p.detach().double()
            std = float(f.std()) if p.numel() > 1 else 0.0
            std = std if std > 0 else 1e-2
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * std + float(f.mean())
            p.copy_(noise.to(device=p.device, dtype=p.dtype))


def _similarity(original: np.ndarray, new: torch.Tensor) -> tuple[float, float]:
    """Mean Spearman of |attr| and of signed attr over the samples (rows with no signal skipped)."""
    a = _flat(original).astype(np.float64)
    b = _flat(new.detach().double().cpu().numpy())
    abs_rho, signed_rho = spearman(np.abs(a), np.abs(b)), spearman(a, b)
    return float(np.nanmean(abs_rho)) if np.isfinite(abs_rho).any() else math.nan, float(np.nanmean(signed_rho)) if np.isfinite(signed_rho).any() else math.nan


def randomization_check(
    model: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    original: np.ndarray,
    attribute_fn: AttributeFn,
    *,
    mode: str = "cascade",
    max_similarity: float = DEFAULT_MAX_SIMILARITY,
    seed: int = 0,
) -> dict[str, Any]:
    """Adebayo et al.'s model-parameter randomization test on a deep copy of ``model``.

    ``original``: the attributions under test for x (B, *shape); ``attribute_fn(model, x, target)``
    re-attributes. mode "cascade" randomizes layers from the top down, re-attributing after each;
    "all" randomizes every layer at once. Passes when the similarity with every layer randomized
    is below ``max_similarity``.
    """
    if mode not in ("cascade", "all"):
        raise AuditError(f"randomization mode must be 'cascade' or 'all', got {mode!r}")
    if not 0 < max_similarity <= 1:
        raise AuditError(f"max_similarity must be in (0, 1], got {max_similarity}")
    work = copy.deepcopy(model)
    layers = parameterized_layers(work)
    if not layers:
        raise AuditError("the randomization check needs a model with parameters")
    gen = torch.Generator().manual_seed(seed)
    reproduced, _ = _similarity(original, attribute_fn(work, x, target))
    results: list[dict[str, Any]] = []
    if mode == "cascade":
        for name, module in reversed(layers):
            _randomize(module, gen)
            sim, signed = _similarity(original, attribute_fn(work, x, target))
            results.append({"layer": f"{name} ({type(module).__name__})" if name else type(module).__name__, "similarity": sim, "signed_similarity": signed})
            logger.debug("randomized down to %s: similarity %.3f", name, sim)
    else:
        for _, module in layers:
            _randomize(module, gen)
        sim, signed = _similarity(original, attribute_fn(work, x, target))
        results.append({"layer": "all layers", "similarity": sim, "signed_similarity": signed})
    final = results[-1]["similarity"]
    return {
        "mode": mode,
        "samples": int(x.shape[0]),
        "reproduced": reproduced,
        "layers": results,
        "final_similarity": final,
        "max_similarity": max_similarity,
        "passed": bool(final < max_similarity),
    }


def method_from_run(metadata: Mapping[str, Any]) -> AttributeFn:
    """Re-attribution matching a run's recorded method and parameters (fastattr's own classes)."""
    from .methods import InputXGradient, IntegratedGradients, Saliency

    method, params = metadata.get("method"), dict(metadata.get("params") or {})
    if method == "integrated_gradients":
        desc = params.get("baselines", "zeros")
        if desc not in ("zeros", None) and not isinstance(desc, (int, float)):
            raise AuditError(f"the run used baselines {desc!r}, which cannot be rebuilt from the manifest; pass attribute_fn= or skip the randomization check")
        baselines = None if desc in ("zeros", None) else float(desc)
        n_steps, rule, mbi = int(params.get("n_steps", 50)), str(params.get("rule", "gausslegendre")), bool(params.get("multiply_by_inputs", True))

        def ig(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return IntegratedGradients(model, multiply_by_inputs=mbi).attribute(x, baselines=baselines, target=t, n_steps=n_steps, method=rule)

        return ig
    if method == "saliency":
        absolute = bool(params.get("abs", True))
        return lambda model, x, t: Saliency(model).attribute(x, target=t, abs=absolute)
    if method == "input_x_gradient":
        mbi = bool(params.get("multiply_by_inputs", True))
        return lambda model, x, t: InputXGradient(model, multiply_by_inputs=mbi).attribute(x, target=t)
    # any other method: the run's own plan, rebuilt from the manifest (fastattr/run_methods.py)
    from .run_methods import Batch, plan_from_manifest

    meta = dict(metadata)
    try:
        plan_from_manifest(torch.nn.Identity(), meta) if method != "layer_integrated_gradients" else None  # fail before any work
    except ValueError as exc:
        raise AuditError(f"{exc}; pass attribute_fn= (API) or --randomization none (CLI) to skip the randomization check") from None

    def generic(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        plan, baselines = plan_from_manifest(model, meta)
        return plan.attribute(Batch((x,), t, baselines, 0, x.shape[0], None)).attributions[0]

    return generic


# ----------------------------------------------------------------------------------------------
# the whole audit
# ----------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """The audit document (JSON-able; every number with a definition), the per-class mean maps,
    and the threshold violations (empty: the audit passes)."""

    doc: dict[str, Any]
    class_maps: dict[str, np.ndarray] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations


def check_thresholds(doc: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """Human-readable violations of ``thresholds`` (names in THRESHOLDS) by an audit document."""
    out: list[str] = []

    def need(section: str, flag: str) -> Any:
        if section not in doc:
            out.append(f"{flag}: not measured (the audit has no {section} section)")
            return None
        return doc[section]

    for key, limit in thresholds.items():
        if limit is None or limit is False:
            continue
        if key == "max_residual":
            v = doc["residual"]["abs"]["max"]
            if not v <= limit:
                out.append(f"max absolute residual {v:.3g} > {limit:g}")
        elif key == "max_rel_residual":
            v = doc["residual"]["rel"]["quantiles"]["p50"]
            if not v <= limit:
                out.append(f"median relative residual {v:.3g} > {limit:g}")
        elif key == "max_nonfinite":
            v = doc["nonfinite"]["values"]
            if v > limit:
                out.append(f"{v} non-finite attribution values > {limit:g}")
        elif key in ("min_agreement", "min_topk_overlap"):
            sec = need("agreement", key)
            if sec is not None:
                metric = "spearman" if key == "min_agreement" else "topk_overlap"
                v = sec[metric]["mean"]
                if not v >= limit:
                    out.append(f"mean {metric} agreement {v:.3g} < {limit:g}")
        elif key == "min_mass_inside":
            sec = need("localization", key)
            if sec is not None and not sec["mass_inside"]["mean"] >= limit:
                out.append(f"mean mass inside the masks {sec['mass_inside']['mean']:.3g} < {limit:g}")
        elif key == "require_beats_random":
            sec = need("perturbation", key)
            if sec is not None and not sec["beats_random"]:
                out.append("deletion/insertion AUC does not beat the random-order control")
        elif key == "require_randomization":
            sec = need("randomization", key)
            if sec is not None and not sec["passed"]:
                out.append(f"randomization check failed: similarity {sec['final_similarity']:.3g} with all layers randomized >= {sec['max_similarity']:g}")
        else:
            raise AuditError(f"unknown threshold {key!r}; known: {', '.join(THRESHOLDS)}")
    return out


def _covered(reader: RunReader) -> list[tuple[int, int]]:
    return [(s["start"], s["stop"]) for s in reader.metadata["shards"]]


def _check_covers(a: RunReader, b: RunReader) -> None:
    """Every sample stored in a must be stored in b (compared by global index)."""
    theirs = sorted(_covered(b))
    for start, stop in _covered(a):
        pos = start
        for s, e in theirs:
            if s <= pos < e:
                pos = e
            if pos >= stop:
                break
        if pos < stop:
            raise AuditError(f"the compared run {b.run_dir} does not store samples [{pos}, {stop}) that {a.run_dir} holds")


def _load_masks(masks: Any, total: int, feature_shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(masks, (str, os.PathLike)):
        path = str(masks)
        if not os.path.isfile(path) or not path.endswith(".npy"):
            raise AuditError(f"masks must be a .npy file; no such file: {path}")
        masks = np.load(path, mmap_mode="r")
    # Memory-mapped masks stay on disk: only each batch's rows are read.
    m = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else masks if isinstance(masks, np.ndarray) else np.asarray(masks)
    if m.shape[0] < total:
        raise AuditError(f"masks hold {m.shape[0]} samples; the run has {total}")
    try:
        fits = np.broadcast_shapes(m.shape[1:], feature_shape) == feature_shape
    except ValueError:
        fits = False
    if not fits:
        raise AuditError(f"a mask has shape {m.shape[1:]}, which does not broadcast to the attribution's {feature_shape}")
    return m


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


def audit_run(
    run: str | os.PathLike[str] | RunReader,
    *,
    model: torch.nn.Module | None = None,
    data: Any = None,
    compare: str | os.PathLike[str] | RunReader | None = None,
    masks: Any = None,
    name: str | None = None,
    sample: int = 256,
    batch_size: int = 256,
    top_k: int | None = None,
    steps: int = 20,
    replacement: str = "baseline",
    replacement_value: float = 0.0,
    blur_sigma: float = 2.0,
    score: str = "softmax",
    randomization: str = "cascade",
    randomization_sample: int = 64,
    max_similarity: float = DEFAULT_MAX_SIMILARITY,
    attribute_fn: AttributeFn | None = None,
    max_rows: int = 2048,
    max_class_maps: int = 64,
    thresholds: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> AuditResult:
    """Audit a run directory (or an open RunReader).

    Attribution-only metrics stream over every stored sample. With ``model`` and ``data`` (the
    run's data, aligned by global index), deletion/insertion runs on ``sample`` samples drawn at
    random (fixed ``seed``) and the randomization check ("cascade", "all" or "none") on the first
    ``randomization_sample`` of them. ``compare``: a second run for agreement; ``masks``: (N, ...)
    booleans (array or .npy) for localization. Every option is checked before any work.
    """
    from .sources import open_source

    thresholds = dict(thresholds or {})
    unknown = set(thresholds) - set(THRESHOLDS)
    if unknown:
        raise AuditError(f"unknown thresholds {sorted(unknown)}; known: {', '.join(THRESHOLDS)}")
    if replacement not in ("baseline", "blur"):
        raise AuditError(f"replacement must be 'baseline' or 'blur', got {replacement!r}")
    if score not in ("softmax", "logit"):
        raise AuditError(f"score must be 'softmax' or 'logit', got {score!r}")
    if randomization not in ("cascade", "all", "none"):
        raise AuditError(f"randomization must be 'cascade', 'all' or 'none', got {randomization!r}")
    for label, v in (("sample", sample), ("batch_size", batch_size), ("steps", steps), ("randomization_sample", randomization_sample), ("max_rows", max_rows)):
        if not isinstance(v, int) or v < 1:
            raise AuditError(f"{label} must be a positive int, got {v!r}")
    if blur_sigma <= 0:
        raise AuditError(f"blur_sigma must be > 0, got {blur_sigma}")
    if (model is None) != (data is None):
        raise AuditError("model-based checks need both the model and the run's data (got only one)")
    needs_model = {"require_beats_random", "require_randomization"} & {k for k, v in thresholds.items() if v}
    if needs_model and model is None:
        raise AuditError(f"thresholds {sorted(needs_model)} need the model and data")
    if thresholds.get("min_agreement") is not None or thresholds.get("min_topk_overlap") is not None:
        if compare is None:
            raise AuditError("agreement thresholds need a run to compare with")
    if thresholds.get("min_mass_inside") is not None and masks is None:
        raise AuditError("min_mass_inside needs ground-truth masks")

    reader = run if isinstance(run, RunReader) else open_run(run)
    other = compare if isinstance(compare, RunReader) or compare is None else open_run(compare)
    try:
        if len(reader) == 0:
            raise AuditError(f"{reader.run_dir} stores no samples")
        name = name or reader.attribution_names[0]
        if name not in reader.attribution_names:
            raise AuditError(f"no attribution {name!r} in {reader.run_dir}; it stores {', '.join(reader.attribution_names)}")
        first = reader[int(reader.metadata["shards"][0]["start"])]
        feature_shape = tuple(first["attributions"][name].shape)
        if other is not None:
            if name not in other.attribution_names:
                raise AuditError(f"the compared run {other.run_dir} has no attribution {name!r}; it stores {', '.join(other.attribution_names)}")
            if len(other) == 0:
                raise AuditError(f"the compared run {other.run_dir} stores no samples")
            theirs = tuple(other[int(other.metadata["shards"][0]["start"])]["attributions"][name].shape)
            if theirs != feature_shape:
                raise AuditError(f"attribution {name!r} has shape {feature_shape} in {reader.run_dir} but {theirs} in {other.run_dir}")
            _check_covers(reader, other)
        mask_arr = _load_masks(masks, reader.total, feature_shape) if masks is not None else None
        source = None
        if model is not None:
            source = open_source(data)
            if len(source) < reader.total:
                raise AuditError(f"the data holds {len(source)} samples; the run was made from {reader.total}")
            if len(source.sample_shapes) != 1:
                raise AuditError(f"model-based checks support single-input models; the data has {len(source.sample_shapes)} inputs")
            if tuple(source.sample_shapes[0]) != feature_shape:
                raise AuditError(f"attribution {name!r} has shape {feature_shape} but the data's samples have {source.sample_shapes[0]}: model-based checks need input attributions")
            if replacement == "blur" and len(feature_shape) < 2:
                raise AuditError(f"replacement 'blur' needs samples with two spatial dimensions; they have shape {feature_shape}")
            if randomization != "none" and attribute_fn is None:
                attribute_fn = method_from_run(reader.metadata)

        # 1. attribution-only metrics, streamed.
        acc = StreamingAudit(name, feature_shape, top_k=top_k, max_class_maps=max_class_maps, seed=seed)
        for batch in reader.iter_batches(batch_size):
            idx = batch["index"]
            lo, hi = int(idx[0]), int(idx[-1]) + 1  # a batch is contiguous: it never spans shards
            theirs_b = other[lo:hi] if other is not None else None
            mb = np.asarray(mask_arr[lo:hi]) if mask_arr is not None else None
            acc.update(batch, theirs_b, mb)
        doc = acc.result()
        doc["definitions"] = dict(DEFINITIONS)
        meta = reader.metadata
        doc["run"] = {"dir": str(reader.run_dir), "method": meta.get("method"), "params": meta.get("params"), "precision": meta.get("precision"), "status": meta.get("status"), "total": meta.get("total")}
        if other is not None:
            doc["run"]["compare"] = {"dir": str(other.run_dir), "method": other.metadata.get("method"), "precision": other.metadata.get("precision")}

        # 2. model-based checks on a random sample.
        if model is not None and source is not None:
            doc.update(_model_checks(reader, source, model, name, sample=sample, steps=steps, replacement=replacement, value=replacement_value,
                                     blur_sigma=blur_sigma, score=score, randomization=randomization, randomization_sample=randomization_sample,
                                     max_similarity=max_similarity, attribute_fn=attribute_fn, max_rows=max_rows, batch_size=batch_size, seed=seed))  # fmt: skip
        doc["thresholds"] = {k: v for k, v in thresholds.items() if v is not None and v is not False}
        result = AuditResult(doc, acc.class_maps(), check_thresholds(doc, thresholds))
        doc["passed"] = result.passed
        doc["violations"] = list(result.violations)
        return result
    finally:  # close only what this call opened
        if not isinstance(run, RunReader):
            reader.close()
        if other is not None and not isinstance(compare, RunReader):
            other.close()


def _model_checks(
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
    n_features = _feature_view(tuple(x.shape[1:]))[0]
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
