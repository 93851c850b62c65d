"""The audit's verdict: ``AuditResult``, the threshold checks that decide it, and the warnings.

One verdict: only a violated threshold fails an audit (exit 1 in the CLI). A check that was
measured and did not pass without a threshold requiring it (randomization without
``require_randomization``, deletion/insertion without ``require_beats_random``, samples with
non-finite values without ``max_nonfinite``) is a warning: reported as such, never as FAILED,
and the verdict stays PASSED.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import AuditError
from .definitions import THRESHOLDS

__all__ = ["AuditResult", "audit_warnings", "check_thresholds", "named", "outcome"]


@dataclass
class AuditResult:
    """The audit document (JSON-able; every number with a definition), the per-class mean maps,
    the threshold violations (empty: the audit passes) and the warnings (checks that did not
    pass but are not required; they never change the verdict)."""

    doc: dict[str, Any]
    class_maps: dict[str, np.ndarray] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations


def named(index: list[int], count: int) -> str:
    """'#2, #5, #7' for the first stored indices of ``count`` samples (', ...' when more)."""
    return ", ".join(f"#{i}" for i in index) + (", ..." if count > len(index) else "")


def _samples(n: int, verb: tuple[str, str] = ("has", "have")) -> str:
    return f"{n} sample {verb[0]}" if n == 1 else f"{n} samples {verb[1]}"


def _residual_violation(doc: Mapping[str, Any], which: str, v: float, limit: float) -> str | None:
    """Violation of a residual threshold: the measured value, and any residual that is NaN or
    infinite where the method defines one (a NaN never passes a gate)."""
    r, nf = doc["residual"], doc["nonfinite"]
    parts = []
    if r[which]["count"] == 0 and r["nonfinite"] == 0:
        return f"{'max_residual' if which == 'abs' else 'max_rel_residual'}: not measured (no sample has a residual: the method defines none)"
    if r[which]["count"] and not v <= limit:
        parts.append(f"{'max absolute' if which == 'abs' else 'median relative'} residual {v:.3g} > {limit:g}")
    if r["nonfinite"]:
        parts.append(f"{_samples(r['nonfinite'])} a non-finite residual where the method defines one: {named(nf['index']['delta'], nf['delta'])}")
    return "; ".join(parts) or None


def nonfinite_total(doc: Mapping[str, Any]) -> int:
    """Non-finite values stored: attribution values plus outputs, baseline outputs and deltas."""
    nf = doc["nonfinite"]
    return int(nf["values"] + nf["output"] + nf["baseline_output"] + nf["delta"])


def _nonfinite_detail(nf: Mapping[str, Any]) -> str:
    return (f"attribution values {nf['values']}, outputs {nf['output']}, baseline outputs {nf['baseline_output']}, "
            f"deltas {nf['delta']}")  # fmt: skip


def check_thresholds(doc: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """Human-readable violations of ``thresholds`` (names in THRESHOLDS) by an audit document,
    one per violated threshold."""
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
            if (msg := _residual_violation(doc, "abs", doc["residual"]["abs"]["max"], limit)) is not None:
                out.append(msg)
        elif key == "max_rel_residual":
            if (msg := _residual_violation(doc, "rel", doc["residual"]["rel"]["quantiles"]["p50"], limit)) is not None:
                out.append(msg)
        elif key == "max_nonfinite":
            v, nf = nonfinite_total(doc), doc["nonfinite"]
            if v > limit:
                out.append(f"{v} non-finite values stored > {limit:g} ({_nonfinite_detail(nf)}; samples {named(nf['flagged_index'], nf['flagged'])})")
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
        elif key == "require_beats_random" and "text_deletion" in doc:  # LLM runs
            sec = doc["text_deletion"]
            if not sec["beats_random"]:
                out.append(f"replacing the top-attributed prompt tokens drops log p(target) by {sec['drop']['mean']:.3g}, not more than random tokens ({sec['random_drop']['mean']:.3g})")
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


def outcome(doc: Mapping[str, Any], section: str) -> str:
    """How a model-based check ended, in the verdict's words: 'passed', 'FAILED' (required by a
    threshold) or 'did not pass: a warning, not required'."""
    required = {"randomization": "require_randomization", "perturbation": "require_beats_random"}[section]
    ok = doc[section]["passed"] if section == "randomization" else doc[section]["beats_random"]
    if ok:
        return "passed"
    return "FAILED" if doc.get("thresholds", {}).get(required) else "did not pass: a warning, not required"


def audit_warnings(doc: Mapping[str, Any], thresholds: Mapping[str, Any]) -> list[str]:
    """Checks that were measured and did not pass while no threshold requires them."""
    out: list[str] = []
    run = doc.get("run") or {}
    if run.get("status") not in (None, "complete") and isinstance(run.get("total"), int) and doc.get("samples", 0) < run["total"]:
        out.append(f"the run is {run['status']}: the audit covers the {doc['samples']:,} of {run['total']:,} samples stored so far; "
                   "rerun the same `fastattr run` to complete it, then audit again")  # fmt: skip
    if run.get("model_matches") is False:
        out.append("the model's parameters differ from those the run was made with (its recorded fingerprint): the model-based checks "
                   "measure this model, not the run's; give the run's own model")  # fmt: skip
    ag = doc.get("agreement") or {}
    if ag.get("target_mismatch"):
        out.append(f"{_samples(ag['target_mismatch'])} different targets in the compared run ({named(ag['target_mismatch_index'], ag['target_mismatch'])}): "
                   "their agreement compares attributions of different classes; make both runs with the same --target")  # fmt: skip
    nf = doc["nonfinite"]
    if nf["flagged"] and thresholds.get("max_nonfinite") is None:
        out.append(
            f"{_samples(nf['flagged'], ('holds', 'hold'))} non-finite values ({_nonfinite_detail(nf)}): "
            f"{named(nf['flagged_index'], nf['flagged'])}; --max-nonfinite 0 makes them fail the audit"
        )
    if doc.get("randomization_skipped"):
        out.append(f"randomization check skipped: {doc['randomization_skipped']}; --randomization none silences this")
    rnd = doc.get("randomization")
    if rnd is not None and not rnd["passed"] and not thresholds.get("require_randomization"):
        out.append(
            f"randomization check did not pass (similarity {rnd['final_similarity']:.3g} with all layers randomized >= "
            f"{rnd['max_similarity']:g}); not required: --require-randomization makes it fail the audit"
        )
    td = doc.get("text_deletion")
    if td is not None and not td["beats_random"] and not thresholds.get("require_beats_random"):
        out.append("replacing the top-attributed prompt tokens does not lower log p(target) more than random tokens; not required: --require-beats-random makes it fail the audit")
    pert = doc.get("perturbation")
    if pert is not None and not pert["beats_random"] and not thresholds.get("require_beats_random"):
        out.append("deletion/insertion AUC does not beat the random-order control; not required: --require-beats-random makes it fail the audit")
    return out
