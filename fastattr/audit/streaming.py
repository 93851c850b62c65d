"""``StreamingAudit``: the attribution-only metrics, accumulated batch by batch over a run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import AuditError
from .definitions import LOG_BINS, REL_EPS, SIGNED_BINS, UNIT_BINS
from .metrics import entropy, flatten_rows, gini, mass_inside, pointing_game, spearman, topk_overlap
from .summaries import Distribution

__all__ = ["StreamingAudit"]


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

        flat = flatten_rows(a).astype(np.float64)
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
            b = flatten_rows(np.asarray(other["attributions"][self.name])).astype(np.float64)
            both = nonzero & np.isfinite(b).all(1) & (b != 0).any(1)
            self.compared += int(both.sum())
            if both.any():
                x, y = flat[both], b[both]
                self.spearman.add(spearman(x, y))
                self.topk.add(topk_overlap(x, y, self.top_k))
                self.rel_l2.add(np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1))
        if masks is not None:
            m = flatten_rows(np.broadcast_to(np.asarray(masks, dtype=bool), a.shape))
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
