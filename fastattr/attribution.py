"""The shared surface of fastattr's Captum-compatible classes.

Each class implements ``attribute_batch(...) -> BatchResult`` with Captum's positional
parameters (and ``with_delta`` where Captum has ``return_convergence_delta``) followed by
``**options`` (fastattr/options.py). ``Attribution`` gives every class the same
``attribute()``: it calls ``attribute_batch`` and formats the result as Captum returns it.
Its signature, for help() and IDEs that read runtime signatures, is the class's
``attribute_batch`` signature with ``return_convergence_delta=False`` for ``with_delta`` and
without ``with_output``.

Class attributes say what a class is, so no module needs isinstance checks of another's classes:
``multiplies_by_inputs`` (Captum's values), ``has_convergence_delta()``, ``option_names`` (the
keywords ``**options`` takes), ``noise_batched`` (NoiseTunnel may hand it copy-major virtual
batches through ``attribute_batch``; otherwise it goes the generic Captum path) and
``draws_own_noise`` (GradientShap: its random draws must see a whole noise partition).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .engine import Problem, frozen_parameters
from .errors import AttributionInputError
from .inputs import (
    TargetFromOutput,
    TensorOrTuple,
    as_tuple,
    check_inputs,
    expand_baselines,
    normalize_forward_args,
    normalize_target,
    promote_integers,
)
from .kernels import Stats
from .layers import module_of
from .options import FIELDS, GRADIENT, Options
from .precision import AUTO
from .probe import ProbeResult, measure, take_samples


@dataclass
class BatchResult:
    """Everything one batch produces; a dataset run stores all of it."""

    attributions: list[torch.Tensor]  # per input (or layer part), the input's shape and dtype
    is_tuple: bool
    stats: Stats  # per sample, over all inputs' attributions
    output: torch.Tensor | None  # F(x) at the target
    baseline_output: torch.Tensor | None  # F(x0) at the target (path methods)
    delta: torch.Tensor | None  # sum(attr) - (F(x) - F(x0))
    n_steps: int | torch.Tensor  # steps used: one int for the batch, or (B,) int per sample (adaptive)
    target: torch.Tensor | None  # (B, k) validated target indices
    names: list[str] | None = None  # stored name per attribution (layer names); None: x / input_i
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # further per-sample (B, ...) fields to store
    # not stored: how attribute() returns the result
    structure: Callable[[list[torch.Tensor]], Any] | None = None  # Captum's nesting (layers); None: tensor or tuple
    copy_delta: torch.Tensor | None = None  # attribute()'s delta where Captum's differs from ``delta`` (one per noise copy)

    def formatted(self) -> Any:
        """The attributions as Captum's attribute() returns them."""
        if self.structure is not None:
            return self.structure(self.attributions)
        return tuple(self.attributions) if self.is_tuple else self.attributions[0]


def combine_stats(stats: list[Stats]) -> Stats:
    """Per-sample stats over several inputs' attributions."""
    if len(stats) == 1:
        return stats[0]
    return Stats(
        sum=sum(s.sum for s in stats),
        l1=sum(s.l1 for s in stats),
        l2=torch.stack([s.l2 for s in stats]).square().sum(0).sqrt(),
        absmax=torch.stack([s.absmax for s in stats]).amax(0),
        nonfinite=sum(s.nonfinite for s in stats),
    )


def completeness_delta(attrs: list[torch.Tensor], combined: Stats, f_x: torch.Tensor, f_x0: torch.Tensor) -> torch.Tensor:
    """sum(attr) - (F(x) - F(x0)) per sample; NaN where an attribution is non-finite. Sums come
    from the kernels' float32 stats, or exactly from the attributions when those are float64."""
    if attrs[0].dtype == torch.float64:
        sums = sum(a.reshape(a.shape[0], -1).sum(1) for a in attrs)
    else:
        sums = combined.sum
    delta = sums.to(f_x.dtype) - (f_x - f_x0)
    return torch.where(combined.nonfinite > 0, torch.full_like(delta, float("nan")), delta)


class Attribution:
    """Base of every fastattr attribution class (see the module docstring)."""

    option_names: ClassVar[frozenset[str]] = GRADIENT
    has_delta: ClassVar[bool] = False
    noise_batched: ClassVar[bool] = True
    draws_own_noise: ClassVar[bool] = False
    captum_defaults: ClassVar[dict[str, Any]] = {}  # attribute()'s keyword defaults where they differ from attribute_batch's
    baselines_per_sample: ClassVar[bool] = True  # False: baselines are a distribution (a probe keeps them whole)
    rows_like_captum: ClassVar[bool] = False  # True: one forward of the call's rows, as Captum (no train-mode BatchNorm warning)
    half_attributions_as_float: ClassVar[bool] = False  # attribute() returns fp16/bf16 attributions as float32, as Captum's (IG, LayerIG)
    _multiply_by_inputs: bool = False
    last_probe: ProbeResult | None = None  # the latest precision probe of this object (probe=True or precision="auto")

    def __init__(self, forward_func: Callable[..., Any]) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be a model or callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    @property
    def multiplies_by_inputs(self) -> bool:
        """Captum's flag: whether attributions are multiplied by (inputs - baselines)."""
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return self.has_delta

    def attribute_batch(self, inputs: TensorOrTuple, *args: Any, **kwargs: Any) -> BatchResult:
        raise NotImplementedError

    def attribute_future(self, *args: Any, **kwargs: Any) -> Any:
        """Captum's asynchronous variant: not implemented, as for these classes in Captum."""
        raise NotImplementedError(f"attribute_future is not implemented for {type(self).__name__}")

    def attribute(self, inputs: TensorOrTuple, *args: Any, **kwargs: Any) -> Any:
        """Captum's attribute(): ``attribute_batch`` formatted as Captum returns it (a tensor, a
        tuple like the inputs, per layer for layer methods), with the delta when asked for."""
        params = _batch_params(type(self))
        want = kwargs.pop("return_convergence_delta", None)
        if "with_delta" in params:
            pos = params.index("with_delta")
            if pos < len(args) and _positional(type(self), "with_delta"):
                want = args[pos]  # passed positionally where Captum has return_convergence_delta
            else:
                kwargs["with_delta"] = bool(want)
        elif want is not None:
            raise TypeError(f"{type(self).__name__}.attribute() got an unexpected keyword argument 'return_convergence_delta'")
        if "with_output" in params:
            kwargs["with_output"] = False  # F(x) is not part of Captum's result
        for name, value in self.captum_defaults.items():
            kwargs.setdefault(name, value)
        _warn_rows_mix(self)
        res = self.attribute_batch(inputs, *args, **kwargs)
        out = res.formatted()
        if self.half_attributions_as_float:
            out = _half_as_float(out)
        if want and self.has_convergence_delta():
            return out, res.copy_delta if res.copy_delta is not None else res.delta
        return out

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "attribute_batch" in cls.__dict__:
            cls.attribute_batch = _with_probe(cls.__dict__["attribute_batch"])  # type: ignore[method-assign]
        if "attribute_batch" in cls.__dict__ and "attribute" not in cls.__dict__:
            cls.attribute = _captum_attribute(cls)  # type: ignore[method-assign]

    # ------------------------------------------------------------------ helpers for subclasses
    def _options(self, kwargs: dict[str, Any]) -> Options:
        return Options.parse(kwargs, self.option_names, f"{type(self).__name__}.attribute")


def _half_as_float(value: Any) -> Any:
    """fp16/bf16 tensors of a (nested) tensor / tuple / list as float32: Captum's IntegratedGradients and
    LayerIntegratedGradients weight the gradients by float32 step sizes, so half-precision inputs or
    layers give float32 attributions there (and .numpy() works on them)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (tuple, list)):
        return type(value)(_half_as_float(v) for v in value)
    return value


def _warn_rows_mix(method: Attribution) -> None:
    """Warn when the model normalises over the rows of a forward (BatchNorm in train mode, or without
    running statistics): each sample's attribution then depends on which rows share a forward. Captum
    puts all of a call's rows in one forward (or whole steps per internal_batch_size); fastattr's
    chunks differ, so its numbers differ from Captum's, and every forward updates the running stats."""
    module = module_of(method.forward_func)
    if module is None or method.rows_like_captum:
        return
    mixing = [
        f"{name or '(model)'} ({type(m).__name__})"
        for name, m in module.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
    ]
    if mixing:
        warnings.warn(
            f"{type(method).__name__}: {', '.join(mixing[:3])}{' ...' if len(mixing) > 3 else ''} normalise over the rows of each "
            "forward (BatchNorm in train mode or without running statistics), so attributions depend on how rows are grouped "
            "into forwards (fastattr may group them differently from Captum) and each forward updates the running statistics; "
            "call model.eval() for per-sample attributions",
            RuntimeWarning,
            stacklevel=5,  # the caller of attribute() (through its Captum-signature wrapper)
        )


_PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("fastattr_probing", default=False)


def _probe_options(kwargs: dict[str, Any]) -> Options | None:
    """The call's Options when it asks for a probe (probe=True with a policy other than fp32, or
    precision="auto"); None otherwise, or when the options are malformed (the method reports that)."""
    given = {k: v for k, v in kwargs.items() if k in FIELDS}
    base = kwargs.get("options")
    if base is not None and not isinstance(base, Options):
        return None
    opts = dataclasses.replace(base, **given) if base is not None else Options(**given)
    return opts if opts.precision == AUTO or (opts.probe and opts.precision != "fp32") else None


def _with_probe(fn: Callable[..., BatchResult]) -> Callable[..., BatchResult]:
    """``attribute_batch`` that first probes the precision when asked (fastattr/probe.py): the first
    ``probe_samples`` samples attributed in fp32 and in the policy (every candidate for "auto"), the
    result kept in ``self.last_probe``; then the call runs under the probed (or chosen) policy.
    Nested calls (NoiseTunnel's base method, the probe's own calls) do not probe again."""
    sig = inspect.signature(fn)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(fn)
    def attribute_batch(self: Attribution, *args: Any, **kwargs: Any) -> BatchResult:
        opts = None if _PROBING.get() or var_kw is None else _probe_options(kwargs)
        if opts is None:
            return fn(self, *args, **kwargs)
        token = _PROBING.set(True)
        try:
            bound = sig.bind(self, *args, **kwargs)
            named = {k: v for k, v in bound.arguments.items() if k not in ("self", var_kw)}
            extra = dict(bound.arguments.get(var_kw, {}))
            xs, _ = as_tuple(named["inputs"])
            batch, k = xs[0].shape[0], opts.probe_samples
            cut = functools.partial(take_samples, batch=batch, k=k, per_sample_baselines=self.baselines_per_sample)
            named = {n: cut(v, name=n) for n, v in named.items()}
            named.update({n: False for n in ("with_delta", "with_output") if n in sig.parameters})
            extra = {n: cut(v, name=n) for n, v in extra.items() if n != "options"}
            if isinstance(kwargs.get("options"), Options) and kwargs["options"].forward_kwargs:
                extra["options"] = dataclasses.replace(kwargs["options"], forward_kwargs=cut(dict(kwargs["options"].forward_kwargs)))
            elif "options" in kwargs:
                extra["options"] = kwargs["options"]

            def call(policy: str) -> list[torch.Tensor]:
                return fn(self, **named, **{**extra, "precision": policy}).attributions

            device = xs[0].device
            self.last_probe = measure(call, opts.precision, device, tolerance=opts.precision_tolerance, warn=opts.precision_warn)
            return fn(self, *args, **{**kwargs, "precision": self.last_probe.policy})
        finally:
            _PROBING.reset(token)

    return attribute_batch


@functools.cache
def _batch_params(cls: type) -> list[str]:
    """attribute_batch's parameter names after ``inputs`` (the order Captum's positionals take)."""
    names = list(inspect.signature(cls.attribute_batch).parameters)
    return names[2:]  # self, inputs


@functools.cache
def _positional(cls: type, name: str) -> bool:
    p = inspect.signature(cls.attribute_batch).parameters[name]
    return p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)


def _captum_attribute(cls: type) -> Callable[..., Any]:
    """``Attribution.attribute`` for ``cls``, with a Captum-shaped signature for help() and IDEs.
    Like Captum's (decorated) methods it has ``__wrapped__``, which Captum's own NoiseTunnel calls."""

    def undecorated(self: Attribution, inputs: TensorOrTuple, *args: Any, **kwargs: Any) -> Any:
        return Attribution.attribute(self, inputs, *args, **kwargs)

    sig = inspect.signature(cls.attribute_batch)
    params = []
    for p in sig.parameters.values():
        if p.name == "with_output":
            continue
        if p.name == "with_delta":
            p = p.replace(name="return_convergence_delta", default=False)
        if p.name in cls.captum_defaults:
            p = p.replace(default=cls.captum_defaults[p.name])
        params.append(p)
    undecorated.__signature__ = sig.replace(parameters=params, return_annotation=Any)  # type: ignore[attr-defined]
    undecorated.__name__ = "attribute"
    undecorated.__qualname__ = f"{cls.__qualname__}.attribute"
    undecorated.__module__ = cls.__module__
    undecorated.__doc__ = (
        f"Captum's {cls.__name__}.attribute: the attributions (a tensor, or a tuple like the inputs; per layer for "
        "layer methods), and with return_convergence_delta=True also Captum's delta. Everything else as in "
        f"{cls.__name__}.attribute_batch, whose BatchResult this formats."
    )

    @functools.wraps(undecorated)
    def attribute(self: Attribution, inputs: TensorOrTuple, *args: Any, **kwargs: Any) -> Any:
        return undecorated(self, inputs, *args, **kwargs)

    return attribute


class GradientAttribution(Attribution):
    """Gradient methods: input checks shared by them and Captum's ``compute_convergence_delta``."""

    def _problem(
        self, engine: Any, opts: Options, inputs: TensorOrTuple, baselines: Any, target: Any, additional_forward_args: Any, *, with_path: bool,
        fuse_predict: bool = False,
    ) -> tuple[Problem, bool]:
        """The validated problem (inputs, baselines, target, forward args and kwargs) and whether
        the inputs were a tuple; its working layout settled by the engine (after all checks).
        fuse_predict: a TargetFromOutput target is resolved by the engine's passes (the caller runs
        the model on the inputs themselves in fp32), not by a forward of its own."""
        xs, is_tuple = as_tuple(inputs)
        if with_path:  # interpolated: integer inputs become floats, as in Captum
            xs = promote_integers(xs)
        batch = check_inputs(xs, need_float=True, allow_nonfinite=opts.allow_nonfinite)
        bs = expand_baselines(baselines, xs, allow_nonfinite=opts.allow_nonfinite) if with_path else None
        predict = target if fuse_predict and isinstance(target, TargetFromOutput) else None
        tgt = None if predict is not None else normalize_target(target, batch, xs[0].device)
        problem = Problem(tuple(x.detach() for x in xs), bs, tgt, normalize_forward_args(additional_forward_args), forward_kwargs=opts.kwargs, predict=predict)
        return engine.settle_layout(problem, opts.channels_last), is_tuple

    def compute_convergence_delta(
        self,
        attributions: Any,
        start_point: Any,
        end_point: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        **options: Any,
    ) -> torch.Tensor:
        """Captum's completeness residual per example: the sum of ``attributions`` (a tensor, a
        tuple, or a list of those for several layers) minus F(end_point) - F(start_point), F at the
        target in fp32 (forward only, in forwards of at most ``max_rows`` rows). start_point is a
        baseline in any form ``attribute`` takes (None: zeros); for layer methods both points
        are *model inputs*, as in Captum. ``options``: max_rows, output, forward_kwargs."""
        opts = Options.parse(options, frozenset({"max_rows", "output", "forward_kwargs", "options"}), f"{type(self).__name__}.compute_convergence_delta")
        ends, _ = as_tuple(end_point, "end_point")
        batch = check_inputs(ends, need_float=False, allow_nonfinite=True)
        starts = expand_baselines(start_point, ends, allow_nonfinite=True)
        attrs = _flat_tensors(attributions)
        for a in attrs:
            if a.dim() == 0 or a.shape[0] != batch:
                raise AttributionInputError(
                    f"attributions and end_point must match on the first dimension, got attribution shape {tuple(a.shape)} for {batch} end points"
                )
        tgt = normalize_target(target, batch, ends[0].device)
        problem = Problem(tuple(x.detach() for x in ends), None, tgt, normalize_forward_args(additional_forward_args), forward_kwargs=opts.kwargs)
        with frozen_parameters(self.forward_func):
            f_end, f_start = opts.engine(self.forward_func, "fp32").outputs(problem, [problem.inputs, starts])
        sums = sum(a.detach().reshape(batch, -1).sum(1) for a in attrs)
        return sums - (f_end - f_start).to(sums.device)


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) tensor / tuple / list, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and value:
        return [t for v in value for t in _flat_tensors(v)]
    raise AttributionInputError(f"attributions must be a tensor or a tuple/list of tensors, got {type(value).__name__}")
