"""``StreamingAudit``: the attribution-only metrics, accumulated batch by batch over a run.

Padded token runs (``padded=True``: the run stores extras/lengths and dim 1 of a sample is the
sequence) keep only each sample's first ``length`` positions in every per-sample metric: a
sample's real features are the first ``length * prod(shape[1:])`` of its flattened row, which the
metrics take as their per-row ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import AuditError
from .definitions import LOG_BINS, REL_EPS, SIGNED_BINS, UNIT_BINS
from .metrics import entropy, flatten_rows, gini, mass_inside, pointing_game, spearman, topk_overlap
from .summaries import Distribution, Flagged

__all__ = ["StreamingAudit"]

NONFINITE_KINDS = ("output", "baseline_output", "delta", "attributions")


def _class_key(target_row: np.ndarray) -> str:
    t = np.atleast_1d(target_row)
    return ",".join(str(int(v)) for v in t)


class StreamingAudit:
    """Accumulates the attribution-only metrics batch by batch (memory: fixed-size summaries).

    ``defines_delta``: the run's method stores F(x0) and a residual for every sample, so a NaN
    there is a broken sample (else NaN delta with NaN F(x0) means "not defined by the method");
    ``defines_output``: it stores F(x); ``padded``: cut each sample to its extras/lengths.
    """

    def __init__(
        self,
        name: str,
        feature_shape: tuple[int, ...],
        *,
        top_k: int | None = None,
        max_class_maps: int = 64,
        seed: int = 0,
        defines_delta: bool = False,
        defines_output: bool = True,
        padded: bool = False,
    ) -> None:
        self.name = name
        self.feature_shape = tuple(feature_shape)
        n = math.prod(self.feature_shape)
        self.n_features = n
        self.explicit_top_k = top_k
        self.top_k = top_k if top_k is not None else max(1, round(0.1 * n))
        if not 1 <= self.top_k <= n:
            raise AuditError(f"top_k must be in [1, {n}] for attributions of shape {self.feature_shape}, got {self.top_k}")
        if padded and not self.feature_shape:
            raise AuditError(f"attribution {name!r} has no sequence dim to cut to extras/lengths (shape {self.feature_shape})")
        self.defines_delta, self.defines_output, self.padded = defines_delta, defines_output, padded
        self.per_position = n // self.feature_shape[0] if padded and self.feature_shape[0] else n
        self.max_class_maps = max_class_maps
        self.samples = 0
        self.residual_abs = Distribution(LOG_BINS, seed=seed)
        self.residual_rel = Distribution(LOG_BINS, seed=seed + 1)
        self.residual_undefined = 0
        self.nonfinite_values = 0
        self.nonfinite_samples = 0
        self.flagged = Flagged(NONFINITE_KINDS)
        self.zero_samples = 0
        self.gini = Distribution(UNIT_BINS, seed=seed + 2)
        self.entropy = Distribution(np.linspace(0.0, math.log(n) if n > 1 else 1.0, 51), seed=seed + 3)
        self.entropy_norm = Distribution(UNIT_BINS, seed=seed + 4)
        self.class_sums: dict[str, np.ndarray] = {}
        self.class_cover: dict[str, np.ndarray] = {}  # per feature: samples with a real value there
        self.class_counts: dict[str, int] = {}
        self.unmapped_samples = 0  # samples of classes beyond max_class_maps
        self.compared = 0
        self.target_mismatch: list[int] = []  # samples whose two runs attribute different targets
        self.target_mismatches = 0
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
        index = np.asarray(batch["index"]).reshape(-1)
        flat = flatten_rows(a).astype(np.float64)
        finite = np.isfinite(flat).all(1)
        self._residuals(batch, index, finite)
        self.nonfinite_samples += int((~finite).sum())

        real = self._real_features(batch, index, rows)  # (rows,) features that count per sample
        valid = np.arange(self.n_features)[None, :] < real[:, None] if self.padded else None
        if valid is not None:
            flat = np.where(valid, flat, 0.0)  # padding counts nowhere below
        self._class_maps(np.where(np.isfinite(flat), flat, 0.0), valid, np.asarray(batch["target"]))
        nonzero = (flat != 0).any(1) & finite
        self.zero_samples += int((finite & ~nonzero).sum())
        ok, n_ok = flat[nonzero], self._n(real[nonzero])
        if ok.shape[0]:
            self.gini.add(gini(ok, n_ok))
            h, hn = entropy(ok, n_ok)
            self.entropy.add(h)
            self.entropy_norm.add(hn)
        if other is not None:
            b = flatten_rows(np.asarray(other["attributions"][self.name])).astype(np.float64)
            b = b if valid is None else np.where(valid, b, 0.0)
            both = nonzero & np.isfinite(b).all(1) & (b != 0).any(1)
            t_a, t_b = np.asarray(batch["target"]), np.asarray(other["target"])
            if t_a.shape == t_b.shape:  # agreement between attributions of two different classes says nothing about either
                differs = (t_a != t_b).reshape(rows, -1).any(1)
                self.target_mismatches += int(differs.sum())
                self.target_mismatch += index[differs][: 10 - len(self.target_mismatch)].tolist() if len(self.target_mismatch) < 10 else []
            self.compared += int(both.sum())
            if both.any():
                x, y, n_both = flat[both], b[both], self._n(real[both])
                self.spearman.add(spearman(x, y, n_both))
                self.topk.add(topk_overlap(x, y, self._top_k(real[both]), n_both))
                self.rel_l2.add(np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1))
        if masks is not None:
            m = flatten_rows(np.broadcast_to(np.asarray(masks, dtype=bool), a.shape))
            m = m if valid is None else m & valid
            self.mask_fraction_sum += float((m[nonzero].sum(1) / real[nonzero]).sum())
            self.localized += int(nonzero.sum())
            if ok.shape[0]:
                self.mass_inside.add(mass_inside(ok, m[nonzero], n_ok))
                self.pointing_hits += int(pointing_game(ok, m[nonzero], n_ok).sum())

    def _residuals(self, batch: Mapping[str, Any], index: np.ndarray, finite: np.ndarray) -> None:
        """Residual distributions, and the samples whose output, F(x0), delta or attributions are
        non-finite where the method defines them."""
        delta = np.asarray(batch["delta"], dtype=np.float64)
        out = np.asarray(batch["output"], dtype=np.float64)
        base = np.asarray(batch["baseline_output"], dtype=np.float64)
        undefined = np.zeros(delta.shape, dtype=bool) if self.defines_delta else np.isnan(delta) & np.isnan(base)
        self.residual_undefined += int(undefined.sum())
        d = np.abs(delta[~undefined])
        self.residual_abs.add(d)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.residual_rel.add(d / np.maximum(np.abs(out - base)[~undefined], REL_EPS))
        stats_nonfinite = np.asarray(batch["stats"]["nonfinite"], dtype=np.int64).reshape(len(index), -1).sum(1)
        self.nonfinite_values += int(stats_nonfinite.sum())
        self.flagged.add(index, {
            "output": ~np.isfinite(out) if self.defines_output else np.zeros(out.shape, dtype=bool),
            "baseline_output": ~np.isfinite(base) & ~undefined,
            "delta": ~np.isfinite(delta) & ~undefined,
            "attributions": (stats_nonfinite > 0) | ~finite,
        })  # fmt: skip

    def _real_features(self, batch: Mapping[str, Any], index: np.ndarray, rows: int) -> np.ndarray:
        if not self.padded:
            return np.full(rows, self.n_features, dtype=np.int64)
        lengths = np.asarray(batch["extras"]["lengths"]).astype(np.int64).reshape(rows)
        bad = (lengths < 0) | (lengths > self.feature_shape[0])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise AuditError(
                f"sample {int(index[i])}: extras/lengths is {int(lengths[i])}, outside [0, {self.feature_shape[0]}] "
                f"(the sequence dim of attribution {self.name!r}); the run's lengths do not fit its attributions"
            )
        return lengths * self.per_position

    def _n(self, real: np.ndarray) -> np.ndarray | None:
        """The metrics' ``n`` argument: real features per row in padded runs, None otherwise."""
        return real if self.padded else None

    def _top_k(self, real: np.ndarray) -> int | np.ndarray:
        """k per row: in padded runs min(k, real features), by default 10% of them."""
        if not self.padded:
            return self.top_k
        if self.explicit_top_k is not None:
            return np.minimum(self.explicit_top_k, real)
        return np.maximum(1, np.round(0.1 * real)).astype(np.int64)

    def _class_maps(self, flat: np.ndarray, valid: np.ndarray | None, target: np.ndarray) -> None:
        keys = [_class_key(t) for t in target] if target.ndim > 1 else [str(int(t)) for t in target]
        for key in dict.fromkeys(keys):
            sel = np.fromiter((k == key for k in keys), dtype=bool, count=len(keys))
            if key not in self.class_sums:
                if len(self.class_sums) >= self.max_class_maps:
                    self.unmapped_samples += int(sel.sum())
                    continue
                self.class_sums[key] = np.zeros(flat.shape[1], dtype=np.float64)
                self.class_cover[key] = np.zeros(flat.shape[1], dtype=np.int64)
                self.class_counts[key] = 0
            self.class_sums[key] += flat[sel].sum(0)
            self.class_cover[key] += valid[sel].sum(0) if valid is not None else int(sel.sum())
            self.class_counts[key] += int(sel.sum())

    def class_maps(self) -> dict[str, np.ndarray]:
        """Mean attribution map per target class, in the attribution's shape (NaN at positions
        no sample of the class reaches, in padded runs)."""
        out = {}
        for k, s in sorted(self.class_sums.items(), key=lambda kv: _sort_key(kv[0])):
            cover = self.class_cover[k]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[k] = np.where(cover > 0, s / np.maximum(cover, 1), np.nan).reshape(self.feature_shape)
        return out

    def result(self) -> dict[str, Any]:
        f = self.flagged
        out: dict[str, Any] = {
            "samples": self.samples,
            "attribution": {"name": self.name, "shape": list(self.feature_shape), "padded": self.padded},
            "residual": {
                "abs": self.residual_abs.to_dict(),
                "rel": self.residual_rel.to_dict(),
                "undefined": self.residual_undefined,
                "nonfinite": self.residual_abs.nonfinite,
            },
            "nonfinite": {
                "values": self.nonfinite_values,
                "samples": self.nonfinite_samples,
                "output": f.count["output"],
                "baseline_output": f.count["baseline_output"],
                "delta": f.count["delta"],
                "attribution_samples": f.count["attributions"],
                "flagged": f.count["any"],
                "flagged_index": list(f.index["any"]),
                "index": {k: list(f.index[k]) for k in NONFINITE_KINDS},
            },
            "zero_samples": self.zero_samples,
            "gini": self.gini.to_dict(),
            "entropy": self.entropy.to_dict(),
            "entropy_normalized": self.entropy_norm.to_dict(),
            "class_maps": {
                "classes": {
                    k: {"count": self.class_counts[k], "sum": float(np.nansum(m)), "l1": float(np.nansum(np.abs(m)))}
                    for k, m in self.class_maps().items()
                },
                "unmapped_samples": self.unmapped_samples,
                "max_classes": self.max_class_maps,
            },
        }
        if self.compared or self.spearman.nonfinite:
            out["agreement"] = {"samples": self.compared, "target_mismatch": self.target_mismatches, "target_mismatch_index": self.target_mismatch, "top_k": self.top_k, "spearman": self.spearman.to_dict(), "topk_overlap": self.topk.to_dict(), "rel_l2": self.rel_l2.to_dict()}
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
