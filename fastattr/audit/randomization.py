"""The model-parameter randomization check (Adebayo et al. 2018) and the re-attribution it runs:
``method_from_run`` rebuilds a run's method and options from its manifest."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import AuditError
from .definitions import DEFAULT_MAX_SIMILARITY, AttributeFn
from .metrics import flatten_rows, spearman

logger = logging.getLogger(__name__)

__all__ = ["method_from_run", "parameterized_layers", "randomization_check", "reduced_like_run"]


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
    a = flatten_rows(original).astype(np.float64)
    b = flatten_rows(new.detach().double().cpu().numpy())
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


def reduced_like_run(attribute_fn: AttributeFn, mode: str) -> AttributeFn:
    """Re-attribution for a run stored channel-reduced (run(channel_reduce=mode)): full (B, C, H, W)
    results are reduced the same way, so they compare with the stored (B, H, W) maps."""
    from ..run_reduce import reduce_channels

    def reduced(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = attribute_fn(model, x, t)
        return reduce_channels(a, mode) if a.dim() == x.dim() and a.shape == x.shape else a

    return reduced


def method_from_run(metadata: Mapping[str, Any]) -> AttributeFn:
    """Re-attribution matching a run's recorded method and parameters (fastattr's own classes)."""
    from ..methods import InputXGradient, IntegratedGradients, Saliency

    method, params = metadata.get("method"), dict(metadata.get("params") or {})
    given = [k for k in ("output", "forward_kwargs") if metadata.get(k) is not None]
    if given:  # re-attributing without them would attribute another output or drop the attention mask
        raise AuditError(f"the run used {' and '.join(k + '=' for k in given)}, which the randomization check does not rebuild from the manifest; "
                         "pass attribute_fn= (API) or --randomization none (CLI)")
    if method == "integrated_gradients" and params.get("n_steps") != "auto":  # adaptive steps: the run's plan (below)
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
    from ..run_methods import Batch, plan_from_manifest

    meta = dict(metadata)
    try:
        plan_from_manifest(torch.nn.Identity(), meta) if method != "layer_integrated_gradients" else None  # fail before any work
    except ValueError as exc:
        raise AuditError(f"{exc}; pass attribute_fn= (API) or --randomization none (CLI) to skip the randomization check") from None

    def generic(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        plan, baselines = plan_from_manifest(model, meta)
        return plan.attribute(Batch((x,), t, baselines, 0, x.shape[0], None)).attributions[0]

    return generic
