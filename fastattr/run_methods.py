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

from .errors import OptionError
from .methods import BatchResult, InputXGradient, IntegratedGradients, Saliency
from .options import positive_int

ALIASES = {"llm_ig": "llm_integrated_gradients", "ig": "integrated_gradients", "smoothgrad": "noise_tunnel", "expected_gradients": "gradient_shap", "layer_ig": "layer_integrated_gradients"}


@dataclass
class Batch:
    """One batch of a dataset run, on the device."""

    inputs: tuple[torch.Tensor, ...]
    target: Any
    baselines: Any
    start: int  # global index of the first sample
    stop: int
    max_rows: int | None  # rows per forward (None: the engine's planner decides)
    forward_args: tuple = ()  # per-sample additional_forward_args (e.g. an attention mask), not attributed
    forward_kwargs: dict[str, Any] | None = None  # this batch's keyword arguments for the model's forward

    @property
    def kw(self) -> dict[str, Any]:
        """forward_kwargs= for the attribution call, where there are any."""
        return {"forward_kwargs": self.forward_kwargs} if self.forward_kwargs else {}

    @property
    def model_inputs(self) -> Any:
        """The inputs as the attribution classes take them: a tensor, or a tuple of several."""
        return self.inputs if len(self.inputs) > 1 else self.inputs[0]


@dataclass
class MethodPlan:
    name: str
    params: dict[str, Any]  # recorded in the run's config
    attribute: Callable[[Batch], BatchResult]
    rows_per_sample: int  # gradient rows one sample costs (the OOM fallback halves from there)
    uses_target: bool = True  # False: forward-only capture, no target to resolve per batch
    attributor: Any = None  # the attribution object (noise_tunnel wraps its base method's)
    needs_float: bool = True  # it interpolates or perturbs the inputs (layer methods take token ids)
    examples_per_batch: int | None = None  # the method's default samples per engine call (None: the runner's)
    make_source: Callable[[Any, Any], Any] | None = None  # (data, labels) -> Source, where the method reads its own data (LLM prompts)
    fuses_predicted: bool = False  # target="predicted" is resolved from the method's own forward (run_inputs.PredictedTarget)


def describe(value: Any) -> Any:
    """JSON-friendly description of a target, baseline or reference argument."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    if isinstance(value, tuple):
        return [describe(v) for v in value]
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return {"array": list(arr.shape), "dtype": str(arr.dtype), "sha256": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:32]}


def _ig_settings(opts: dict[str, Any]) -> tuple[int | str, str, dict[str, Any], dict[str, Any]]:
    """n_steps, the resolved rule, the adaptive settings given, and the params a run records:
    checked as IG's first batch would check them (IG and layer IG share this)."""
    from .adaptive import DEFAULT_RULE, given, resolve

    n_steps = opts["n_steps"]
    auto = given(**{k: opts.get(k) for k in ("tolerance", "max_steps", "abs_tolerance")})
    # rule None: Captum's gausslegendre for fixed steps, the adaptive default for "auto"; recorded resolved
    rule = opts["rule"] or (DEFAULT_RULE if n_steps == "auto" else "gausslegendre")
    if not isinstance(n_steps, str):
        positive_int("n_steps", n_steps)
    resolve(n_steps, rule, auto)
    params = {"multiply_by_inputs": opts["multiply_by_inputs"], "n_steps": n_steps, "rule": rule, "baselines": opts["baselines_desc"], **auto}
    return n_steps, rule, auto, params


def _ig(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    n_steps, rule, auto, params = _ig_settings(opts)
    ig = IntegratedGradients(model, multiply_by_inputs=opts["multiply_by_inputs"])

    def attribute(b: Batch) -> BatchResult:
        return ig.attribute_batch(b.model_inputs, b.baselines, b.target, b.forward_args or None, n_steps, rule, b.max_rows, True, **engine_opts, **auto, **b.kw)

    # an adaptive sample costs at most max_steps rows; start the OOM fallback from the fixed default
    return MethodPlan("integrated_gradients", params, attribute, n_steps if isinstance(n_steps, int) else 50, attributor=ig, fuses_predicted=True)


def _saliency(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    sal, absolute = Saliency(model), opts["abs"]

    def attribute(b: Batch) -> BatchResult:
        return sal.attribute_batch(b.model_inputs, b.target, absolute, b.forward_args or None, True, max_rows=b.max_rows, **engine_opts, **b.kw)

    return MethodPlan("saliency", {"abs": absolute}, attribute, 1, attributor=sal, fuses_predicted=True)


def _input_x_gradient(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    ixg = InputXGradient(model, multiply_by_inputs=opts["multiply_by_inputs"])

    def attribute(b: Batch) -> BatchResult:
        return ixg.attribute_batch(b.model_inputs, b.target, b.forward_args or None, True, max_rows=b.max_rows, **engine_opts, **b.kw)

    return MethodPlan("input_x_gradient", {"multiply_by_inputs": opts["multiply_by_inputs"]}, attribute, 1, attributor=ixg, fuses_predicted=True)


NT_DEFAULTS = {"nt_type": "smoothgrad", "nt_samples": 5, "nt_samples_batch_size": None, "stdevs": 1.0, "base_method": "integrated_gradients", "seed": 0}
GS_DEFAULTS = {"references": None, "n_samples": 5, "stdevs": 0.0, "seed": 0}


def _sample_ids(b: Batch) -> torch.Tensor:
    return torch.arange(b.start, b.stop)


def _stdevs(value: Any) -> Any:
    """One stdev, or one per input (a list from JSON or the CLI becomes the tuple the methods take)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"seed must be an int (it is recorded in the run so the draws can be reproduced), got {seed!r}")
    return seed


def _noise_tunnel(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    from .noise_tunnel import NT_TYPES, NoiseTunnel

    base = ALIASES.get(opts["base_method"], opts["base_method"])
    if base not in ("integrated_gradients", "saliency", "input_x_gradient"):
        raise OptionError(f"base_method for noise_tunnel must be integrated_gradients, saliency or input_x_gradient, got {opts['base_method']!r}")
    if opts["nt_type"] not in NT_TYPES:
        raise OptionError(f"nt_type must be one of {', '.join(NT_TYPES)}, got {opts['nt_type']!r}")
    nt_samples = positive_int("nt_samples", opts["nt_samples"])
    seed = _check_seed(opts["seed"])
    inner_plan = PLANS[base](model, opts, engine_opts)  # validates the base method's own options
    nt = NoiseTunnel(inner_plan.attributor)
    stdevs = _stdevs(opts["stdevs"])
    base_kwargs: dict[str, Any] = {"n_steps": opts["n_steps"], "method": inner_plan.params["rule"]} if base == "integrated_gradients" else {}
    if base == "saliency":
        base_kwargs["abs"] = opts["abs"]
    rows_key = "internal_batch_size" if base == "integrated_gradients" else "max_rows"  # Captum's name for IG

    def attribute(b: Batch) -> BatchResult:
        path = {"baselines": b.baselines} if base == "integrated_gradients" else {}
        return nt.attribute_batch(
            b.model_inputs, opts["nt_type"], nt_samples, opts["nt_samples_batch_size"], stdevs, seed=seed, sample_ids=_sample_ids(b),
            target=b.target, additional_forward_args=b.forward_args or None, **{rows_key: b.max_rows}, **path, **base_kwargs, **engine_opts, **b.kw,
        )  # fmt: skip

    params = {"base_method": base, "base_params": inner_plan.params, "nt_type": opts["nt_type"], "nt_samples": nt_samples,
              "stdevs": list(stdevs) if isinstance(stdevs, tuple) else stdevs, "seed": seed}  # fmt: skip
    return MethodPlan("noise_tunnel", params, attribute, nt_samples * inner_plan.rows_per_sample)


def _gradient_shap(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    from .gradient_shap import GradientShap
    from .sources import Source, open_source

    refs = opts["references"]
    if refs is None:
        raise OptionError("gradient_shap needs references=: reference samples (an array or tensor with one row per reference) or a dataset")
    n_samples = positive_int("n_samples", opts["n_samples"])
    seed = _check_seed(opts["seed"])
    if isinstance(refs, (torch.Tensor, np.ndarray, tuple)):
        parts = refs if isinstance(refs, tuple) else (refs,)
        refs_t = tuple(torch.as_tensor(np.asarray(r)) if isinstance(r, np.ndarray) else r for r in parts)
        if any(r.dim() < 1 or r.shape[0] == 0 for r in refs_t):
            raise OptionError(f"references must have at least one row, got shapes {[tuple(r.shape) for r in refs_t]}")
        desc = describe(refs)
        source: Source | None = None
    else:  # a dataset, .npy path, 'file.h5:dataset': only the drawn rows are read
        source = open_source(refs)
        desc = {"dataset": source.fingerprint()}
    gs = GradientShap(model, multiply_by_inputs=opts["multiply_by_inputs"])
    stdevs = _stdevs(opts["stdevs"])
    on_device: dict[torch.device, Any] = {}

    def attribute(b: Batch) -> BatchResult:
        dev, dtype = b.inputs[0].device, b.inputs[0].dtype
        if source is not None:
            baselines: Any = source
        else:
            if dev not in on_device:  # moved once per run
                moved = tuple(r.to(dev, dtype) for r in refs_t)
                on_device[dev] = moved if len(moved) > 1 else moved[0]
            baselines = on_device[dev]
        return gs.attribute_batch(
            b.model_inputs, baselines, n_samples, stdevs, b.target, b.forward_args or None, True, seed=seed, sample_ids=_sample_ids(b), max_rows=b.max_rows, **engine_opts, **b.kw
        )

    params = {"multiply_by_inputs": opts["multiply_by_inputs"], "references": desc, "n_samples": n_samples,
              "stdevs": list(stdevs) if isinstance(stdevs, tuple) else stdevs, "seed": seed}  # fmt: skip
    return MethodPlan("gradient_shap", params, attribute, n_samples)


LAYER_DEFAULTS = {"layer": None, "attribute_to_layer_input": False, "layer_reduce": None, "lengths": None}
ACTIVATION_DEFAULTS = {"layer": None, "attribute_to_layer_input": False, "pool": None, "channel_dim": 1, "lengths": None}


def _layer_names(model: torch.nn.Module, layer: Any) -> list[str]:
    """Qualified layer names (recorded in the run) for a name, a module or a list of those."""
    from .layers import resolve_layers

    if layer is None:
        raise OptionError("this method needs layer=: a layer's qualified name (see `fastattr layers`), a module, or a list of those")
    return [name for name, _ in resolve_layers(model, layer)[0]]


def _lengths(option: Any, b: Batch) -> torch.Tensor | None:
    """lengths="mask": real tokens per padded row, counted from the first forward-arg input (an attention mask)."""
    if option is None:
        return None
    from .activations import lengths_from_mask

    return lengths_from_mask(b.forward_args[0])


def _check_lengths_option(option: Any) -> None:
    if option not in (None, "mask"):
        raise OptionError(f"lengths must be None or 'mask' (count the real tokens of the attention mask passed as the first forward-arg input), got {option!r}")


def _layer_ig(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    from .layer_methods import REDUCTIONS, LayerIntegratedGradients

    names = _layer_names(model, opts["layer"])
    if opts["layer_reduce"] is not None and opts["layer_reduce"] not in REDUCTIONS:
        raise OptionError(f"layer_reduce must be None (store the full tensor) or one of {', '.join(REDUCTIONS)}, got {opts['layer_reduce']!r}")
    _check_lengths_option(opts["lengths"])
    n_steps, rule, auto, ig_params = _ig_settings(opts)
    lig = LayerIntegratedGradients(model, names if isinstance(opts["layer"], (list, tuple)) else names[0], multiply_by_inputs=opts["multiply_by_inputs"])
    to_input = bool(opts["attribute_to_layer_input"])

    def attribute(b: Batch) -> BatchResult:
        return lig.attribute_batch(
            b.model_inputs, b.baselines, b.target, b.forward_args or None, n_steps, rule, b.max_rows, True, to_input,
            reduce=opts["layer_reduce"], lengths=_lengths(opts["lengths"], b), **auto, **engine_opts, **b.kw,
        )  # fmt: skip

    params = {**ig_params, "layer": names, "attribute_to_layer_input": to_input, "layer_reduce": opts["layer_reduce"], "lengths": opts["lengths"]}
    return MethodPlan("layer_integrated_gradients", params, attribute, (n_steps if isinstance(n_steps, int) else 50) + 2, attributor=lig, needs_float=False)


def _activations(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    from .activations import POOLS, LayerActivation

    names = _layer_names(model, opts["layer"])
    if opts["pool"] is not None and opts["pool"] not in POOLS:
        raise OptionError(f"pool must be None (store the full activation) or one of {', '.join(POOLS)}, got {opts['pool']!r}")
    _check_lengths_option(opts["lengths"])
    act = LayerActivation(model, names if isinstance(opts["layer"], (list, tuple)) else names[0])
    to_input = bool(opts["attribute_to_layer_input"])

    def attribute(b: Batch) -> BatchResult:
        return act.attribute_batch(
            b.model_inputs, b.forward_args or None, to_input, pool=opts["pool"], channel_dim=opts["channel_dim"], lengths=_lengths(opts["lengths"], b),
            max_rows=b.max_rows, precision=engine_opts["precision"], **b.kw,
        )  # fmt: skip

    params = {"layer": names, "attribute_to_layer_input": to_input, "pool": opts["pool"], "channel_dim": opts["channel_dim"], "lengths": opts["lengths"]}
    return MethodPlan("activations", params, attribute, 1, uses_target=False, needs_float=False)


def _llm_ig(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> MethodPlan:
    from .llm import runs

    return runs.plan(model, opts, engine_opts)


PLANS: dict[str, Callable[[torch.nn.Module, dict[str, Any], dict[str, Any]], MethodPlan]] = {
    "integrated_gradients": _ig,
    "saliency": _saliency,
    "input_x_gradient": _input_x_gradient,
    "noise_tunnel": _noise_tunnel,
    "gradient_shap": _gradient_shap,
    "layer_integrated_gradients": _layer_ig,
    "activations": _activations,
    "llm_integrated_gradients": _llm_ig,
}
# options a method takes beyond the common ones (n_steps, rule, baselines, multiply_by_inputs, abs, tolerance, ...)
EXTRA_OPTIONS: dict[str, dict[str, Any]] = {
    "noise_tunnel": NT_DEFAULTS,
    "gradient_shap": GS_DEFAULTS,
    "layer_integrated_gradients": LAYER_DEFAULTS,
    "activations": ACTIVATION_DEFAULTS,
    "llm_integrated_gradients": {"tokenizer": None, "gen_args": None, "seq_only": False, "padding_side": "right", "layer": None},
}
METHOD_NAMES = (*PLANS, *ALIASES)
NO_COMPILE = ("activations", "llm_integrated_gradients")  # forward-only capture and the LLM engine take no compile=


def plan_method(
    model: torch.nn.Module, method: str, options: dict[str, Any], *, precision: str, memory_budget: Any, extra: dict[str, Any] | None = None,
    allow_nonfinite: bool = False, output: Any = None, compile: bool = False,  # noqa: A002 - Options' name
) -> MethodPlan:
    """Validate ``method`` and its options; raises ValueError naming the problem before any work.
    ``extra``: the method's own options (EXTRA_OPTIONS), e.g. nt_samples for noise_tunnel;
    ``allow_nonfinite``: accept NaN/inf inputs and baselines (activations always do); ``output``:
    which tensor of the model's output to attribute (fastattr/options.py; activations ignore it);
    ``compile``: torch.compile the model's forward for the engine's chunks (fastattr/engine.py)."""
    name = ALIASES.get(method, method)
    if name not in PLANS:
        raise OptionError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    accepted = EXTRA_OPTIONS.get(name, {})
    unknown = sorted(set(extra or {}) - set(accepted))
    if unknown:
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise OptionError(f"method {name!r} does not take option(s) {', '.join(unknown)}; {takes}")
    opts = {**accepted, **dict(options), **(extra or {})}
    opts["baselines_desc"] = describe(opts.get("baselines")) if opts.get("baselines") is not None else "zeros"
    engine_opts = {"precision": precision, "memory_budget": memory_budget, "allow_nonfinite": allow_nonfinite, "output": output}
    if compile is not False:
        if not isinstance(compile, bool):
            raise OptionError(f"compile must be True or False, got {compile!r}")
        if name in NO_COMPILE:
            raise OptionError(f"compile=True applies to the gradient engine's methods; {name!r} runs its own passes: leave compile unset")
        engine_opts["compile"] = True
    return PLANS[name](model, opts, engine_opts)


def _baselines_from_desc(desc: Any) -> Any:
    """A run's recorded baseline description back to a baseline, where that is possible."""
    if desc in ("zeros", None):
        return None
    if isinstance(desc, (int, float)) and not isinstance(desc, bool):
        return float(desc)
    raise ValueError(f"the run used baselines {desc!r} (an array, recorded by its hash), which cannot be rebuilt from the manifest")


def plan_from_manifest(model: torch.nn.Module, metadata: dict[str, Any]) -> tuple[MethodPlan, Any]:
    """The MethodPlan a stored run was made with and its baselines, rebuilt from its manifest
    (method, params, precision), e.g. to re-attribute samples in an audit. Raises ValueError
    where the manifest only holds a description (array baselines, reference sets)."""
    method, params = metadata.get("method"), dict(metadata.get("params") or {})
    ig_keys = ("n_steps", "rule", "multiply_by_inputs", "tolerance", "max_steps", "abs_tolerance")
    if method == "noise_tunnel":
        base = dict(params.get("base_params") or {})
        options = {k: base[k] for k in (*ig_keys, "abs") if k in base}
        options["baselines"] = _baselines_from_desc(base.get("baselines"))
        extra = {k: params[k] for k in ("nt_type", "nt_samples", "stdevs", "seed", "base_method") if k in params}
    elif method in ("integrated_gradients", "saliency", "input_x_gradient", "layer_integrated_gradients"):
        options = {k: params[k] for k in (*ig_keys, "abs") if k in params}
        options["baselines"] = _baselines_from_desc(params.get("baselines"))
        layer_keys = ("layer", "attribute_to_layer_input", "layer_reduce", "lengths")
        extra = {k: params[k] for k in layer_keys if k in params} if method == "layer_integrated_gradients" else {}
    else:
        raise ValueError(f"the run's method {method!r} cannot be rebuilt from its manifest (its inputs are recorded as descriptions only)")
    defaults = {"n_steps": 50, "rule": "gausslegendre", "multiply_by_inputs": True, "abs": True}
    plan = plan_method(
        model, str(method), {**defaults, **options}, precision=metadata.get("precision", "fp32"), memory_budget=None, extra=extra,
        allow_nonfinite=bool(metadata.get("allow_nonfinite", False)),
    )  # fmt: skip
    return plan, options["baselines"]
