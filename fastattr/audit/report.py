"""Write an audit for people: ``audit.json`` (every number with its definition), ``report.md`` with
PNG plots, ``class_maps.npz`` (the per-class mean maps), and a one-screen terminal summary.

The plots need matplotlib (``pip install fastattr[render]`` or ``pip install matplotlib``); it is
imported only when a report is written, and ``require_matplotlib()`` lets a caller fail before
any audit work when it is missing. JSON is strict: NaN and infinities are written as null.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditReportError
from .definitions import DEFINITIONS
from .plots import plot_class_maps, plot_localization, plot_pair, plot_perturbation, plot_randomization, plot_residuals
from .verdict import AuditResult, named, outcome

logger = logging.getLogger(__name__)

__all__ = ["AuditReportError", "require_matplotlib", "summary_lines", "write_report"]


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or AuditReportError naming the fix."""
    from ..render import RenderError, pyplot

    try:
        return pyplot()
    except RenderError as exc:
        raise AuditReportError("audit reports need matplotlib for their plots: pip install matplotlib (or fastattr[render])") from exc


def _strict(obj: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (|x| would end the cell)."""
    return text.replace("|", "\\|")


def _dist_rows(label: str, key: str, dist: dict[str, Any]) -> list[str]:
    q = dist["quantiles"]
    how = "" if not dist["count"] else " (exact quantiles)" if dist["quantiles_exact"] else " (quantiles: reservoir estimate)"  # of nothing: no claim
    return [
        f"| {label} | {_fmt(dist['mean'])} | {_fmt(q['p50'])} | {_fmt(q['p95'])} | {_fmt(q['p99'])} | {_fmt(dist['max'])} | {_fmt(dist['count'])}{how} |",
        f"|  | *{_cell(DEFINITIONS.get(key, ''))}* | | | | | |",
    ]


DIST_HEADER = ["| metric | mean | median | p95 | p99 | max | samples |", "| --- | --- | --- | --- | --- | --- | --- |"]


def _markdown(doc: dict[str, Any], images: dict[str, str]) -> str:
    run = doc["run"]
    lines = [f"# fastattr audit: `{run['dir']}`", ""]
    verdict = "PASSED" if doc["passed"] else "FAILED"
    warnings = doc.get("warnings", [])
    lines += [f"**{verdict}**" + (f" (thresholds: {', '.join(f'{k}={v}' for k, v in doc['thresholds'].items())})" if doc["thresholds"] else " (no thresholds set)"), ""]
    lines += [f"- violation: {v}" for v in doc["violations"]]
    lines += [f"- warning: {w}" for w in warnings]
    if warnings and doc["passed"]:
        lines += ["", "Warnings are checks that did not pass while no threshold requires them; they do not fail the audit."]
    lines += [
        "",
        f"Run: method `{run['method']}` {json.dumps(run['params'])}, precision {run['precision']}, status {run['status']}, "
        f"{doc['samples']:,} of {run['total']:,} samples read; attribution `{doc['attribution']['name']}` of shape {tuple(doc['attribution']['shape'])}.",
        "Every number below is also in `audit.json`, next to its definition.",
        "",
        "## Completeness and numerical health",
        "",
        *DIST_HEADER,
        *_dist_rows("absolute residual", "residual.abs", doc["residual"]["abs"]),
        *_dist_rows("relative residual", "residual.rel", doc["residual"]["rel"]),
        "",
        f"- samples without a defined residual: {_fmt(doc['residual']['undefined'])} ({DEFINITIONS['residual.undefined']})",
        f"- non-finite residuals: {_fmt(doc['residual']['nonfinite'])} ({DEFINITIONS['residual.nonfinite']})",
        f"- non-finite attribution values: {_fmt(doc['nonfinite']['values'])}; samples affected: {_fmt(doc['nonfinite']['samples'])}",
        f"- {_nonfinite_line(doc)}",
        f"- all-zero attributions: {_fmt(doc['zero_samples'])}",
        "",
        f"![residual histograms]({images['residuals']})",
        "",
        "## Sparseness and complexity",
        "",
        *DIST_HEADER,
        *_dist_rows("Gini", "gini", doc["gini"]),
        *_dist_rows("entropy (nats)", "entropy", doc["entropy"]),
        *_dist_rows("normalized entropy", "entropy_normalized", doc["entropy_normalized"]),
        "",
        f"![Gini and entropy]({images['sparseness']})",
        "",
        "## Per-class mean attribution",
        "",
        DEFINITIONS["class_maps"] + ".",
        "",
        "| target | samples | map sum | map L1 |",
        "| --- | --- | --- | --- |",
    ]
    for key, c in doc["class_maps"]["classes"].items():
        lines.append(f"| {key} | {_fmt(c['count'])} | {_fmt(c['sum'])} | {_fmt(c['l1'])} |")
    if doc["class_maps"]["unmapped_samples"]:
        lines.append(f"\n{doc['class_maps']['unmapped_samples']} samples belong to classes beyond the first {doc['class_maps']['max_classes']} and have no map.")
    if "class_maps" in images:
        lines += ["", f"![per-class maps]({images['class_maps']})"]
    if "agreement" in doc:
        ag = doc["agreement"]
        lines += [
            "",
            f"## Agreement with `{run['compare']['dir']}`",
            "",
            f"{_fmt(ag['samples'])} samples compared, top-k with k = {ag['top_k']}.",
            "",
            *DIST_HEADER,
            *_dist_rows("Spearman", "agreement.spearman", ag["spearman"]),
            *_dist_rows("top-k overlap", "agreement.topk_overlap", ag["topk_overlap"]),
            *_dist_rows("relative L2 difference", "agreement.rel_l2", ag["rel_l2"]),
            "",
            f"![agreement]({images['agreement']})",
        ]
    if "localization" in doc:
        loc = doc["localization"]
        lines += [
            "",
            "## Localization against ground-truth masks",
            "",
            *DIST_HEADER,
            *_dist_rows("mass inside the mask", "localization.mass_inside", loc["mass_inside"]),
            "",
            f"- pointing game: {_fmt(loc['pointing_game'])} ({DEFINITIONS['localization.pointing_game']})",
            f"- mask fraction: {_fmt(loc['mask_fraction'])} ({DEFINITIONS['localization.mask_fraction']})",
            "",
            f"![mass inside]({images['localization']})",
        ]
    if "perturbation" in doc:
        p = doc["perturbation"]
        rc = p["random_control"]
        lines += [
            "",
            "## Deletion and insertion",
            "",
            f"{DEFINITIONS['deletion']}. Insertion: {DEFINITIONS['insertion']}. AUC: {DEFINITIONS['auc']}. Control: {DEFINITIONS['random_control']}.",
            "",
            "| curve | AUC (attribution order) | AUC (random order) | samples where attribution beats random |",
            "| --- | --- | --- | --- |",
            f"| deletion (lower is better) | {_fmt(p['deletion']['auc'])} | {_fmt(rc['deletion']['auc'])} | {_fmt(p['deletion_beats_random_share'])} |",
            f"| insertion (higher is better) | {_fmt(p['insertion']['auc'])} | {_fmt(rc['insertion']['auc'])} | {_fmt(p['insertion_beats_random_share'])} |",
            "",
            f"Beats random: **{_fmt(p['beats_random'])}**{'' if p['beats_random'] else ' (' + _short(outcome(doc, 'perturbation')) + ')'} on {p['samples']} samples, {p['steps']} steps, replacement {p['replacement']}, score {p['score']}.",
            "",
            f"![deletion and insertion curves]({images['perturbation']})",
        ]
    if "text_deletion" in doc:
        td = doc["text_deletion"]
        lines += [
            "",
            "## Text deletion (LLM run)",
            "",
            f"{DEFINITIONS['text_deletion']}",
            "",
            "| prompt tokens replaced | mean drop in log p(target) | median |",
            "| --- | --- | --- |",
            f"| top-{'k' if td['top_k'] is None else td['top_k']} by seq_attr | {_fmt(td['drop']['mean'])} | {_fmt(td['drop']['median'])} |",
            f"| random ({td['draws']} draws) | {_fmt(td['random_drop']['mean'])} | {_fmt(td['random_drop']['median'])} |",
            "",
            f"Beats random: **{_fmt(td['beats_random'])}** on {td['samples']} samples (k mean {_fmt(td['k_mean'])}, baseline token {td['baseline_token']}); "
            f"top-k drop above the random drop in {_fmt(td['beats_random_share'])} of them.",
        ]
    if "randomization" in doc:
        r = doc["randomization"]
        lines += [
            "",
            "## Randomization sanity check",
            "",
            DEFINITIONS["randomization"] + ". " + DEFINITIONS["randomization.passed"] + ".",
            "",
            "| parameters randomized | similarity (Spearman of abs attr) | signed Spearman |",
            "| --- | --- | --- |",
            f"| none (re-attribution with the unchanged model) | {_fmt(r['reproduced'])} | |",
        ]
        for layer in r["layers"]:
            lines.append(f"| {'down to ' if r['mode'] == 'cascade' else ''}{layer['layer']} | {_fmt(layer['similarity'])} | {_fmt(layer['signed_similarity'])} |")
        lines += [
            "",
            f"Result: **{outcome(doc, 'randomization')}** (similarity {_fmt(r['final_similarity'])} with all layers randomized, pass below {r['max_similarity']:g}; {r['samples']} samples).",
            "",
            f"![randomization similarity by layer]({images['randomization']})",
        ]
    return "\n".join(lines) + "\n"


def _short(outcome: str) -> str:
    """An outcome after a statement that already says the check did not pass."""
    return outcome.removeprefix("did not pass: ")


def _nonfinite_line(doc: dict[str, Any]) -> str:
    nf = doc["nonfinite"]
    if not nf["flagged"]:
        return f"non-finite values: {nf['values']} (no sample has a non-finite output, delta or attribution)"
    return (
        f"non-finite values: {nf['values']} in attributions; {nf['flagged']} samples with a non-finite output ({nf['output']}), "
        f"baseline output ({nf['baseline_output']}), delta ({nf['delta']}) or attribution ({nf['attribution_samples']}): "
        f"{named(nf['flagged_index'], nf['flagged'])}"
    )


def write_report(result: AuditResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write audit.json, class_maps.npz, the PNG plots and report.md into ``out_dir``; returns
    the paths written by kind."""
    plt = require_matplotlib()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditReportError(f"cannot create the report directory {out}: {exc}") from exc
    doc = result.doc
    paths: dict[str, Path] = {"json": out / "audit.json", "markdown": out / "report.md"}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_strict(doc), f, indent=1)
        f.write("\n")
    if result.class_maps:
        paths["class_maps_npz"] = out / "class_maps.npz"
        np.savez_compressed(paths["class_maps_npz"], **{f"target_{k}": v for k, v in result.class_maps.items()})
    images: dict[str, str] = {}

    def png(kind: str, draw: Any, *args: Any) -> None:
        path = out / f"{kind}.png"
        draw(plt, *args, path)
        paths[kind] = path
        images[kind] = path.name

    png("residuals", plot_residuals, doc)
    png("sparseness", plot_pair, (doc["gini"], "Gini of |attr|"), (doc["entropy_normalized"], "entropy / log n"), "sparseness and complexity")
    if result.class_maps:
        png("class_maps", plot_class_maps, result.class_maps)
    if "agreement" in doc:
        png("agreement", plot_pair, (doc["agreement"]["spearman"], "Spearman"), (doc["agreement"]["topk_overlap"], f"top-{doc['agreement']['top_k']} overlap"), "agreement per sample")
    if "localization" in doc:
        loc = doc["localization"]
        png("localization", plot_localization, loc)
    if "perturbation" in doc:
        png("perturbation", plot_perturbation, doc["perturbation"])
    if "randomization" in doc:
        png("randomization", plot_randomization, doc["randomization"], outcome(doc, "randomization"))
    paths["markdown"].write_text(_markdown(doc, images), encoding="utf-8")
    logger.info("wrote the audit report to %s", out)
    return paths


def summary_lines(result: AuditResult) -> list[str]:
    """A one-screen summary for the terminal."""
    doc = result.doc
    r = doc["residual"]
    out = [
        f"audit of {doc['run']['dir']}: {doc['samples']:,} samples, method {doc['run']['method']}, attribution {doc['attribution']['name']}",
        f"residual |delta|: median {_fmt(r['abs']['quantiles']['p50'])}, p99 {_fmt(r['abs']['quantiles']['p99'])}, max {_fmt(r['abs']['max'])}; "
        f"relative median {_fmt(r['rel']['quantiles']['p50'])} ({r['undefined']} undefined, {r['nonfinite']} non-finite)",
        _nonfinite_line(doc) + f"; all-zero samples: {doc['zero_samples']}",
        f"sparseness (Gini) mean {_fmt(doc['gini']['mean'])}; normalized entropy mean {_fmt(doc['entropy_normalized']['mean'])}",
        f"per-class maps: {len(doc['class_maps']['classes'])} class{'' if len(doc['class_maps']['classes']) == 1 else 'es'}",
    ]
    if "agreement" in doc:
        ag = doc["agreement"]
        out.append(f"agreement with {doc['run']['compare']['dir']}: Spearman mean {_fmt(ag['spearman']['mean'])}, top-{ag['top_k']} overlap mean {_fmt(ag['topk_overlap']['mean'])}")
    if "localization" in doc:
        loc = doc["localization"]
        out.append(f"localization: mass inside {_fmt(loc['mass_inside']['mean'])} (random {_fmt(loc['mask_fraction'])}), pointing game {_fmt(loc['pointing_game'])}")
    if "perturbation" in doc:
        p = doc["perturbation"]
        rc = p["random_control"]
        out.append(
            f"deletion AUC {_fmt(p['deletion']['auc'])} (random {_fmt(rc['deletion']['auc'])}), insertion AUC {_fmt(p['insertion']['auc'])} "
            f"(random {_fmt(rc['insertion']['auc'])}): {'beats' if p['beats_random'] else 'does NOT beat'} random on {p['samples']} samples"
            + ("" if p["beats_random"] else f": {_short(outcome(doc, 'perturbation'))}")
        )
    if "text_deletion" in doc:
        td = doc["text_deletion"]
        out.append(
            f"text deletion: top-attributed prompt tokens -> baseline token {td['baseline_token']} drop log p(target) by {_fmt(td['drop']['mean'])} "
            f"(random tokens {_fmt(td['random_drop']['mean'])}; k mean {_fmt(td['k_mean'])}): {'beats' if td['beats_random'] else 'does NOT beat'} random "
            f"on {td['samples']} samples, in {_fmt(td['beats_random_share'])} of them"
        )
    if "randomization" in doc:
        rnd = doc["randomization"]
        out.append(
            f"randomization ({rnd['mode']}): similarity {_fmt(rnd['reproduced'])} unchanged -> {_fmt(rnd['final_similarity'])} all layers randomized "
            f"(pass below {rnd['max_similarity']:g}): {outcome(doc, 'randomization')}"
        )
    out += [f"WARNING: {w}" for w in result.warnings]
    if not result.passed:
        out.append(f"FAILED: {'; '.join(result.violations)}")
    else:
        n = len(result.warnings)
        out.append(f"PASSED with {n} warning{'s' if n > 1 else ''}" if n else "PASSED")
    return out
