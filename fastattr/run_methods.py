"""The methods of a dataset run: a method name and its options -> one call per batch.

``fastattr.run`` asks this module for a ``MethodPlan``: the options the run records in its
manifest (a resume compares them), the attribution call for one batch of samples, and how
many gradient rows one sample costs (where the out-of-memory fallback starts). Each method's
own module does the work; this one only validates the options and maps them to that module's
``attribute_batch``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .methods import BatchResult, InputXGradient, IntegratedGradients, Saliency

ALIASES = {"ig": "integrated_gradients"}


@dataclass
class Batch:
    """One batch of a dataset run, on the device."""

    inputs: tuple[torch.Tensor, ...]
    target: Any
    baselines: Any
    start: int  # global index of the first sample
    stop: int
    max_rows: int | None  # rows per forward (None: the engine's planner decides)


@dataclass
class MethodPlan:
    name: str
    params: dict[str, Any]  # recorded in the run's config
    attribute: Callable[[Batch], BatchResult]
    rows_per_sample: int  # gradient rows one sample costs (the OOM fallback halves from there)


def describe(value: Any) -> Any:
    """JSON-friendly description of a target, baseline or reference argument."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, tuple):
        return [describe(v) for v in value]
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return {"array": list(arr.shape), "dtype": str(arr.dtype), "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]}


def _ig(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    ig = IntegratedGradients(model, multiply_by_inputs=opts["multiply_by_inputs"])
    n_steps, rule = opts["n_steps"], opts["rule"]
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")

    def attribute(b: Batch) -> BatchResult:
        inputs = b.inputs if len(b.inputs) > 1 else b.inputs[0]
        return ig.attribute_batch(inputs, b.baselines, b.target, None, n_steps, rule, b.max_rows, True, **engine_opts)

    params = {"multiply_by_inputs": opts["multiply_by_inputs"], "n_steps": n_steps, "rule": rule, "baselines": opts["baselines_desc"]}
    return MethodPlan("integrated_gradients", params, attribute, n_steps)


def _saliency(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    sal, absolute = Saliency(model), opts["abs"]

    def attribute(b: Batch) -> BatchResult:
        inputs = b.inputs if len(b.inputs) > 1 else b.inputs[0]
        return sal.attribute_batch(inputs, b.target, absolute, None, True, max_rows=b.max_rows, **engine_opts)

    return MethodPlan("saliency", {"abs": absolute}, attribute, 1)


def _input_x_gradient(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    ixg = InputXGradient(model, multiply_by_inputs=opts["multiply_by_inputs"])

    def attribute(b: Batch) -> BatchResult:
        inputs = b.inputs if len(b.inputs) > 1 else b.inputs[0]
        return ixg.attribute_batch(inputs, b.target, None, True, max_rows=b.max_rows, **engine_opts)

    return MethodPlan("input_x_gradient", {"multiply_by_inputs": opts["multiply_by_inputs"]}, attribute, 1)


PLANS: dict[str, Callable[[torch.nn.Module, dict[str, Any], dict[str, Any]], MethodPlan]] = {
    "integrated_gradients": _ig,
    "saliency": _saliency,
    "input_x_gradient": _input_x_gradient,
}
METHOD_NAMES = (*PLANS, *ALIASES)


def plan_method(model: torch.nn.Module, method: str, options: dict[str, Any], *, precision: str, memory_budget: Any) -> MethodPlan:
    """Validate ``method`` and its options; raises ValueError naming the problem before any work."""
    name = ALIASES.get(method, method)
    if name not in PLANS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    opts = dict(options)
    opts["baselines_desc"] = describe(opts.get("baselines")) if opts.get("baselines") is not None else "zeros"
    return PLANS[name](model, opts, {"precision": precision, "memory_budget": memory_budget})
