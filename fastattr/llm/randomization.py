"""The model-parameter randomization check (Adebayo et al. 2018) for stored LLM runs.

An LLM run stores everything its attribution needs except the model: the prompt and target ids
(generated targets as generated) in ``extras/``, and in the manifest the embedding layer's name,
n_steps, rule, baseline token, multiply_by_inputs and padding side. ``rebuild`` makes the run's
``LLMGradientAttribution`` from those on a given model, so the audit re-attributes the first
``sample`` stored samples (targets given, no generation) on a deep copy of the model whose layers
are randomized from the top down ("cascade") or all at once ("all"), and measures the Spearman
correlation of |seq_attr| (and of the signed values) with the stored seq_attr over each sample's
own prompt tokens. It passes when the similarity with every layer randomized is below
``max_similarity``; ``reproduced`` is the similarity before any layer is randomized (about 1 when
the rebuilt method reproduces the run).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch

from ..audit.metrics import spearman
from ..audit.randomization import _randomize, parameterized_layers
from ..errors import AuditError
from ..store import RunReader

logger = logging.getLogger(__name__)

METHOD = "llm_integrated_gradients"


def rebuild(model: torch.nn.Module, metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(LLMGradientAttribution on ``model``, attribute_batch keywords) of a stored LLM run, from its manifest."""
    from ..layer_methods import LayerIntegratedGradients
    from .api import LLMGradientAttribution

    if metadata.get("method") != METHOD:
        raise AuditError(f"not an {METHOD} run: {metadata.get('method')!r}")
    params = dict(metadata.get("params") or {})
    layer = dict(model.named_modules()).get(str(params.get("layer")))
    if layer is None:
        raise AuditError(f"the model has no layer {params.get('layer')!r}, the run's embedding layer: audit with the run's model")
    base = params.get("baselines", 0)
    if isinstance(base, bool) or not isinstance(base, int):
        raise AuditError(f"the run's baseline {base!r} is not one token id; the randomization check needs one")
    probe = metadata.get("precision_probe") or {}
    precision = probe.get("policy") or metadata.get("precision") or "fp32"
    llm = LLMGradientAttribution(LayerIntegratedGradients(model, layer, multiply_by_inputs=bool(params.get("multiply_by_inputs", True))))
    kwargs = {
        "baselines": base, "n_steps": int(params.get("n_steps", 50)), "method": str(params.get("rule", "gausslegendre")),
        "padding_side": str(params.get("padding_side", "right")), "precision": "fp32" if precision == "auto" else precision, "seq_only": True,
    }  # fmt: skip
    return llm, kwargs


def _similarity(original: np.ndarray, new: np.ndarray, lengths: np.ndarray) -> tuple[float, float]:
    """Mean Spearman of |seq_attr| and of signed seq_attr over the samples, each over its own prompt tokens."""
    out = []
    for a, b in ((np.abs(original), np.abs(new)), (original, new)):
        rho = spearman(a, b, lengths)
        out.append(float(np.nanmean(rho)) if np.isfinite(rho).any() else math.nan)
    return out[0], out[1]


def randomization_check(
    reader: RunReader, model: torch.nn.Module, *, mode: str = "cascade", sample: int = 64, max_similarity: float = 0.5, seed: int = 0
) -> dict[str, Any]:
    """The check above on the first ``sample`` stored samples; a JSON-able section of the audit (as
    fastattr/audit/randomization.py's, so the report and the verdict read it the same way)."""
    if mode not in ("cascade", "all"):
        raise AuditError(f"randomization mode must be 'cascade' or 'all', got {mode!r}")
    if not 0 < max_similarity <= 1:
        raise AuditError(f"max_similarity must be in (0, 1], got {max_similarity}")
    meta = reader.metadata
    index = np.concatenate([np.arange(s["start"], s["stop"]) for s in meta["shards"]])[:sample]
    prompts, targets, stored = [], [], []
    for i in index.tolist():
        row = reader[int(i)]
        ex = row["extras"]
        p, t = int(ex["prompt_length"]), int(ex["target_length"])
        prompts.append(torch.as_tensor(np.asarray(ex["prompt_ids"][:p]), dtype=torch.long))
        targets.append(torch.as_tensor(np.asarray(ex["target_ids"][:t]), dtype=torch.long))
        stored.append(np.asarray(row["attributions"]["seq_attr"], dtype=np.float64))
    lengths = np.array([len(p) for p in prompts])
    original = np.stack(stored)
    work = copy.deepcopy(model).eval()
    layers = parameterized_layers(work)
    if not layers:
        raise AuditError("the randomization check needs a model with parameters")
    llm, kwargs = rebuild(work, meta)

    def attribute() -> np.ndarray:
        res = llm.attribute_batch(prompts, targets, **kwargs)
        out = np.zeros_like(original)
        out[:, : res.seq_attr.shape[1]] = res.seq_attr.detach().double().cpu().numpy()
        return out

    gen = torch.Generator().manual_seed(seed)
    reproduced, _ = _similarity(original, attribute(), lengths)
    results: list[dict[str, Any]] = []
    steps = list(reversed(layers)) if mode == "cascade" else [("", None)]
    for name, module in steps:
        for _, m in [(name, module)] if module is not None else layers:
            _randomize(m, gen)
        sim, signed = _similarity(original, attribute(), lengths)
        label = "all layers" if module is None else (f"{name} ({type(module).__name__})" if name else type(module).__name__)
        results.append({"layer": label, "similarity": sim, "signed_similarity": signed})
        logger.debug("randomized %s: similarity %.3f", label, sim)
    final = results[-1]["similarity"]
    return {
        "mode": mode, "samples": len(prompts), "reproduced": reproduced, "layers": results, "final_similarity": final,
        "max_similarity": max_similarity, "passed": bool(final < max_similarity),
    }  # fmt: skip
