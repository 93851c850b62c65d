"""What every number in an audit means: the constants, DEFINITIONS (one per number in the JSON
document, keyed by its path) and THRESHOLDS (the gates an audit can be run with)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_MAX_SIMILARITY", "DEFINITIONS", "THRESHOLDS", "AttributeFn", "defines_delta", "defines_output", "is_padded"]

RESERVOIR = 8192  # values kept per Distribution for quantiles (exact below this many samples)
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
REL_EPS = 1e-12  # floor of |F(x) - F(x0)| in the relative residual (the runner's summary uses the same)
LOG_BINS = np.logspace(-12, 4, 16 * 8 + 1)  # 8 bins per decade from 1e-12 to 1e4 (residuals, errors)
UNIT_BINS = np.linspace(0.0, 1.0, 51)
SIGNED_BINS = np.linspace(-1.0, 1.0, 81)
DEFAULT_MAX_SIMILARITY = 0.5
NAMED = 20  # global indices of flagged samples kept (and printed) per kind

# Runs of these methods store F(x0) and the completeness residual for every sample, so a NaN there
# is a broken sample, never "not defined by the method"; activations runs store no F(x) at all.
DELTA_METHODS = ("integrated_gradients", "layer_integrated_gradients", "gradient_shap", "llm_integrated_gradients")
NO_OUTPUT_METHODS = ("activations",)

AttributeFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# Every number in the JSON report is defined here, keyed by its path in the document.
DEFINITIONS: dict[str, str] = {
    "samples": "stored samples read (the whole run, streamed shard by shard)",
    "passed": "true when no threshold is violated (the CLI exits 0); checks no threshold requires never change it",
    "violations": "one line per violated threshold (the CLI exits 1)",
    "warnings": "checks that were measured and did not pass while no threshold requires them (randomization, deletion/insertion, "
    "samples with non-finite values): reported as warnings, never as failures",
    "residual.abs": "completeness residual |delta| = |sum(attr) - (F(x) - F(x0))| per sample, as stored by the run",
    "residual.rel": f"relative completeness residual |delta| / max(|F(x) - F(x0)|, {REL_EPS:g}) per sample",
    "residual.undefined": "samples whose method defines no residual (no baseline output, e.g. saliency); never counted for "
    "methods that always define one (integrated gradients, layer IG, GradientShap, noise tunnel over IG)",
    "residual.nonfinite": "samples whose residual is NaN or infinite although the method defines one (e.g. a NaN model output)",
    "nonfinite.values": "non-finite attribution values (NaN, +-inf) over all stored attributions (sum of stats/nonfinite)",
    "nonfinite.samples": "samples of the audited attribution with at least one non-finite value (excluded from the per-sample metrics)",
    "nonfinite.output": "samples whose stored model output F(x) is NaN or infinite (methods that store one)",
    "nonfinite.baseline_output": "samples whose stored baseline output F(x0) is NaN or infinite although the method defines one",
    "nonfinite.delta": "samples whose completeness residual is NaN or infinite although the method defines one",
    "nonfinite.attribution_samples": "samples with a non-finite value in any stored attribution (stats/nonfinite > 0 or the audited one)",
    "nonfinite.flagged": f"samples with any of the above; flagged_index lists the first {NAMED} global indices (one list per kind in index)",
    "padding": "runs storing extras/lengths (padded token rows, dim 1 of a sample is the sequence): every per-sample metric "
    "(Gini, entropy, agreement, localization, class maps, all-zero samples) uses only the first `length` positions of "
    "each sample; top-k uses k = min(k, the sample's real features), by default 10% of them",
    "zero_samples": "samples whose audited attribution is all zero (excluded from Gini, entropy, agreement, localization)",
    "gini": "sparseness: Gini index of |attr| per sample, sum_k (2k - n - 1) a_(k) / (n sum_k a_(k)) over the n values "
    "sorted ascending (0: uniform, 1 - 1/n: one feature holds everything; Hurley & Rickard 2009, Chalasani et al. 2020)",
    "entropy": "complexity: Shannon entropy -sum p log p (nats) of p = |attr| / sum|attr| per sample (Bhatt et al. 2020)",
    "entropy_normalized": "entropy / log(n) per sample: 0 when one feature holds all mass, 1 when the mass is uniform",
    "class_maps": "per target class: the mean attribution map over the samples with that target (non-finite values as 0; in "
    "padded runs each position's mean is over the samples with a real token there, NaN where none has); "
    "maps in class_maps.npz, here the count, the map's sum and its L1 norm",
    "agreement.spearman": "per sample, Spearman rank correlation between the two runs' attributions (signed values; ties get "
    "their average rank), samples aligned by global index",
    "agreement.topk_overlap": "per sample, |top-k(|a|) & top-k(|b|)| / k, the share of the k largest-magnitude features both runs agree on",
    "agreement.rel_l2": "per sample, ||a - b||_2 / ||b||_2 with b the compared run",
    "run.model_matches": "whether the audited model's parameters and buffers hash to the run's recorded fingerprint (null: not recorded); "
    "false is a warning",
    "randomization_skipped": "why the randomization check did not run under --randomization auto (the run's method cannot be rebuilt "
    "from its manifest, e.g. GradientShap reference sets or array baselines); a warning",
    "agreement.target_mismatch": "samples whose target differs between the two runs (a warning: their agreement compares different classes); "
    "target_mismatch_index lists the first of them",
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
    "text_deletion": "LLM runs: the prompt tokens with the highest seq_attr (k: --top-k, default 20% of the tokens that differ from the "
    "baseline token) are replaced by the run's baseline token, and the drop in log p(target | prompt) (summed over the target "
    "tokens, teacher-forced) is compared with the mean drop when k random such tokens are replaced (8 draws)",
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
    "max_residual": "largest absolute completeness residual <= value, and no non-finite residual where the method defines one",
    "max_rel_residual": "median relative completeness residual <= value, and no non-finite residual where the method defines one",
    "max_nonfinite": "non-finite values stored <= value: attribution values plus non-finite outputs, baseline outputs and deltas "
    "(where the method defines them), one per sample each",
    "min_agreement": "mean Spearman correlation with the compared run >= value",
    "min_topk_overlap": "mean top-k overlap with the compared run >= value",
    "min_mass_inside": "mean attribution mass inside the masks >= value",
    "require_beats_random": "deletion and insertion AUC better than the random control (value true)",
    "require_randomization": "the randomization check passes (value true)",
}


def defines_delta(metadata: Mapping[str, Any]) -> bool:
    """Whether the run's method stores F(x0) and a completeness residual for every sample."""
    method = metadata.get("method")
    if method == "noise_tunnel":
        return (metadata.get("params") or {}).get("base_method") == "integrated_gradients"
    return method in DELTA_METHODS


def defines_output(metadata: Mapping[str, Any]) -> bool:
    """Whether the run's method stores the model output F(x)."""
    return metadata.get("method") not in NO_OUTPUT_METHODS


def is_padded(metadata: Mapping[str, Any], extras: Mapping[str, Any]) -> bool:
    """Whether extras/lengths cut each sample's dim 1 (the sequence): stored lengths, and the
    attribution kept per position (a pooled activations run has no sequence dim left)."""
    return "lengths" in extras and not (metadata.get("params") or {}).get("pool")
