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
number sits next to its definition); ``write_report`` writes the JSON, a Markdown report with PNG
plots, and ``summary_lines`` the terminal summary.

One job per module: definitions (constants, DEFINITIONS, THRESHOLDS), summaries (Distribution),
metrics (per-sample metrics), streaming (StreamingAudit), perturbation (deletion/insertion),
randomization (the randomization check, method_from_run), model_checks (both on a sample of a
run), verdict (AuditResult, thresholds), run (audit_run), plots and report (the report).
"""

from __future__ import annotations

from ..errors import AuditError, AuditReportError
from .definitions import DEFINITIONS, THRESHOLDS
from .metrics import auc, entropy, gini, mass_inside, pointing_game, rankdata, spearman, topk_overlap
from .perturbation import perturbation_curves
from .randomization import method_from_run, parameterized_layers, randomization_check
from .report import require_matplotlib, summary_lines, write_report
from .run import audit_run
from .streaming import StreamingAudit
from .summaries import Distribution
from .verdict import AuditResult, audit_warnings, check_thresholds

__all__ = [
    "DEFINITIONS",
    "THRESHOLDS",
    "AuditError",
    "AuditReportError",
    "AuditResult",
    "Distribution",
    "StreamingAudit",
    "audit_run",
    "audit_warnings",
    "auc",
    "check_thresholds",
    "entropy",
    "gini",
    "mass_inside",
    "method_from_run",
    "parameterized_layers",
    "perturbation_curves",
    "pointing_game",
    "randomization_check",
    "rankdata",
    "require_matplotlib",
    "spearman",
    "summary_lines",
    "topk_overlap",
    "write_report",
]
