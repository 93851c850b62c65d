"""The audit's verdict: ``AuditResult`` and the threshold checks that decide it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import AuditError
from .definitions import THRESHOLDS

__all__ = ["AuditResult", "check_thresholds"]


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
