"""Captum-compatible attribution classes: Saliency, InputXGradient, IntegratedGradients.

Signatures and meanings follow Captum 0.9, so a Captum user changes one import.
Keyword-only extras are fastattr's own: ``precision`` ("fp32", "tf32", "bf16",
"fp16"), ``memory_budget`` (bytes or "8GiB"; CUDA), ``max_rows`` (rows per forward),
``allow_nonfinite``, ``kernel_backend`` and ``channels_last`` (None: by device and precision).
IntegratedGradients also takes ``n_steps="auto"`` with ``tolerance``, ``max_steps``,
``abs_tolerance`` (and ``min_steps``): per-sample adaptive steps, see fastattr/adaptive.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import adaptive
from .engine import Engine, Problem, frozen_parameters, use_channels_last
from .inputs import TensorOrTuple, as_tuple, check_inputs, expand_baselines, normalize_forward_args, normalize_target
from .kernels import Stats
from .precision import Precision, get_precision
from .quadrature import points_and_weights


class _GradientAttribution:
    """Shared plumbing: input normalisation, the engine, and output formatting."""

    def __init__(self, forward_func: Callable[..., torch.Tensor]) -> None:
        if not callable(forward_func):
            raise TypeError(f"forward_func must be a model or callable, got {type(forward_func).__name__}")
        self.forward_func = forward_func

    def _problem(
        self,
        inputs: TensorOrTuple,
        baselines: Any,
        target: Any,
        additional_forward_args: Any,
        *,
        need_float: bool,
        allow_nonfinite: bool,
        with_path: bool,
        precision: Precision,
        channels_last: bool | None,
    ) -> tuple[Problem, bool]:
        xs, is_tuple = as_tuple(inputs)
        batch = check_inputs(xs, need_float=need_float, allow_nonfinite=allow_nonfinite)
        bs = expand_baselines(baselines, xs, allow_nonfinite=allow_nonfinite) if with_path else None
        tgt = normalize_target(target, batch, xs[0].device)
        layout = use_channels_last(channels_last, xs[0].device, precision)
        return Problem(tuple(x.detach() for x in xs), bs, tgt, normalize_forward_args(additional_forward_args), channels_last=layout), is_tuple

    def _engine(self, precision: str | Precision, max_rows: int | None, memory_budget: Any, kernel_backend: str | None) -> Engine:
        return Engine(self.forward_func, get_precision(precision), max_rows=max_rows, memory_budget=memory_budget, kernel_backend=kernel_backend)

    @staticmethod
    def _format(attrs: list[torch.Tensor], is_tuple: bool) -> TensorOrTuple:
        return tuple(attrs) if is_tuple else attrs[0]

    def has_convergence_delta(self) -> bool:
        return False

    def _gradient_batch(
        self,
        inputs: TensorOrTuple,
        target: Any,
        additional_forward_args: Any,
        with_output: bool,
        *,
        absolute: bool = False,
        multiply_by_inputs: bool = False,
        precision: str = "fp32",
        max_rows: int | None = None,
        memory_budget: Any = None,
        allow_nonfinite: bool = False,
        kernel_backend: str | None = None,
        channels_last: bool | None = None,
    ) -> BatchResult:
        """Gradients at the inputs themselves (Saliency, InputXGradient)."""
        policy = get_precision(precision)
        problem, is_tuple = self._problem(
            inputs, None, target, additional_forward_args, need_float=True, allow_nonfinite=allow_nonfinite, with_path=False, precision=policy, channels_last=channels_last
        )
        engine = self._engine(policy, max_rows, memory_budget, kernel_backend)
        out = torch.empty(problem.batch, dtype=torch.float32, device=problem.device) if with_output else None
        with frozen_parameters(self.forward_func):
            accs = engine.integrate(problem, [1.0], [1.0], endpoint_steps={0: out} if with_output else None)
        if absolute:
            accs = [a.abs_() for a in accs]
        attrs, stats = engine.finalize(problem, accs, multiply_by_inputs=multiply_by_inputs)
        return BatchResult(attrs, is_tuple, combine_stats(stats), out, None, None, 1, problem.target)


@dataclass
class BatchResult:
    """Everything one batch produces; a dataset run stores all of it."""

    attributions: list[torch.Tensor]  # per input, the input's shape and dtype
    is_tuple: bool
    stats: Stats  # per sample, over all inputs' attributions
    output: torch.Tensor | None  # F(x) at the target
    baseline_output: torch.Tensor | None  # F(x0) at the target (path methods)
    delta: torch.Tensor | None  # sum(attr) - (F(x) - F(x0))
    n_steps: int | torch.Tensor  # steps used: one int for the batch, or (B,) int per sample (adaptive)
    target: torch.Tensor | None  # (B, k) validated target indices
    names: list[str] | None = None  # stored name per attribution (layer names); None: x / input_i
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # further per-sample (B, ...) fields to store


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


class Saliency(_GradientAttribution):
    """Gradients of the target output with respect to the inputs (absolute by default)."""

    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        abs: bool = True,  # noqa: A002 - Captum's name
        additional_forward_args: Any = None,
        *,
        precision: str = "fp32",
        max_rows: int | None = None,
        memory_budget: Any = None,
        allow_nonfinite: bool = False,
        kernel_backend: str | None = None,
        channels_last: bool | None = None,
    ) -> TensorOrTuple:
        res = self.attribute_batch(
            inputs, target, abs, additional_forward_args, with_output=False, precision=precision, max_rows=max_rows,
            memory_budget=memory_budget, allow_nonfinite=allow_nonfinite, kernel_backend=kernel_backend, channels_last=channels_last,
        )  # fmt: skip
        return self._format(res.attributions, res.is_tuple)

    def attribute_batch(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        abs: bool = True,  # noqa: A002
        additional_forward_args: Any = None,
        with_output: bool = True,
        **options: Any,
    ) -> BatchResult:
        """attribute() plus F(x) (taken from the gradient pass) and per-sample stats."""
        return self._gradient_batch(inputs, target, additional_forward_args, with_output, absolute=abs, **options)


class InputXGradient(_GradientAttribution):
    """Input times the gradient of the target output with respect to the input."""

    def __init__(self, forward_func: Callable[..., torch.Tensor], multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        precision: str = "fp32",
        max_rows: int | None = None,
        memory_budget: Any = None,
        allow_nonfinite: bool = False,
        kernel_backend: str | None = None,
        channels_last: bool | None = None,
    ) -> TensorOrTuple:
        res = self.attribute_batch(
            inputs, target, additional_forward_args, with_output=False, precision=precision, max_rows=max_rows,
            memory_budget=memory_budget, allow_nonfinite=allow_nonfinite, kernel_backend=kernel_backend, channels_last=channels_last,
        )  # fmt: skip
        return self._format(res.attributions, res.is_tuple)

    def attribute_batch(self, inputs: TensorOrTuple, target: Any = None, additional_forward_args: Any = None, with_output: bool = True, **options: Any) -> BatchResult:
        """attribute() plus F(x) (taken from the gradient pass) and per-sample stats."""
        return self._gradient_batch(inputs, target, additional_forward_args, with_output, multiply_by_inputs=self._multiply_by_inputs, **options)


class IntegratedGradients(_GradientAttribution):
    """Integrated gradients (Sundararajan et al. 2017) along the straight path x0 -> x.

    attr = (x - x0) * sum_s w_s dF/dx(x0 + alpha_s (x - x0)), with the rule's
    (alpha_s, w_s); multiply_by_inputs=False returns the integrated gradient alone.
    """

    def __init__(self, forward_func: Callable[..., torch.Tensor], multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return True

    def attribute(
        self,
        inputs: TensorOrTuple,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: int | str = 50,
        method: str | None = None,
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        *,
        precision: str = "fp32",
        memory_budget: Any = None,
        allow_nonfinite: bool = False,
        kernel_backend: str | None = None,
        channels_last: bool | None = None,
        tolerance: float | None = None,
        max_steps: int | None = None,
        abs_tolerance: float | None = None,
        min_steps: int | None = None,
    ) -> TensorOrTuple | tuple[TensorOrTuple, torch.Tensor]:
        res = self.attribute_batch(
            inputs, baselines, target, additional_forward_args, n_steps, method, internal_batch_size, return_convergence_delta,
            precision=precision, memory_budget=memory_budget, allow_nonfinite=allow_nonfinite, kernel_backend=kernel_backend, channels_last=channels_last,
            tolerance=tolerance, max_steps=max_steps, abs_tolerance=abs_tolerance, min_steps=min_steps,
        )  # fmt: skip
        result = self._format(res.attributions, res.is_tuple)
        return (result, res.delta) if return_convergence_delta else result

    def attribute_batch(
        self,
        inputs: TensorOrTuple,
        baselines: Any = None,
        target: Any = None,
        additional_forward_args: Any = None,
        n_steps: int | str = 50,
        method: str | None = None,
        internal_batch_size: int | None = None,
        with_delta: bool = True,
        *,
        precision: str = "fp32",
        memory_budget: Any = None,
        allow_nonfinite: bool = False,
        kernel_backend: str | None = None,
        channels_last: bool | None = None,
        tolerance: float | None = None,
        max_steps: int | None = None,
        abs_tolerance: float | None = None,
        min_steps: int | None = None,
    ) -> BatchResult:
        """attribute() with everything a dataset run stores: F(x), F(x0), delta, stats.

        n_steps="auto": per-sample adaptive steps until |delta| <= max(tolerance |F(x) - F(x0)|,
        abs_tolerance) (and the rule's vector check holds), at most max_steps (fastattr/adaptive.py);
        ``method`` then names the adaptive rule ("simpson", the default, and "trapezoid": nested
        dyadic grids; "gausslegendre": Gauss-Legendre doubling). method=None (the default) means
        Captum's "gausslegendre" for a fixed n_steps. n_steps comes back as a (B,) tensor and
        ``extras["converged"]`` says which samples met the tolerance before the cap.
        """
        settings = adaptive.resolve(n_steps, method, adaptive.given(tolerance=tolerance, max_steps=max_steps, abs_tolerance=abs_tolerance, min_steps=min_steps))
        if settings is not None:
            return self._adaptive_batch(
                inputs, baselines, target, additional_forward_args, settings, internal_batch_size, with_delta, precision=precision,
                memory_budget=memory_budget, allow_nonfinite=allow_nonfinite, kernel_backend=kernel_backend, channels_last=channels_last,
            )  # fmt: skip
        method = method or "gausslegendre"  # Captum's default rule
        alphas, weights = points_and_weights(method, n_steps)
        policy = get_precision(precision)
        problem, is_tuple = self._problem(
            inputs, baselines, target, additional_forward_args, need_float=True, allow_nonfinite=allow_nonfinite, with_path=True, precision=policy, channels_last=channels_last
        )
        engine = self._engine(policy, internal_batch_size, memory_budget, kernel_backend)
        batch, device = problem.batch, problem.device
        acc_dtype = torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32
        with frozen_parameters(self.forward_func):
            endpoints: dict[int, torch.Tensor] = {}
            f_x = f_x0 = None
            if with_delta:
                # F(x) and F(x0) come from the gradient pass when the rule samples an endpoint
                # and the pass runs in plain fp32; the rest are evaluated together, in fp32.
                reuse = policy.name == "fp32"
                if reuse and alphas[-1] == 1.0:
                    f_x = endpoints[len(alphas) - 1] = torch.empty(batch, dtype=acc_dtype, device=device)
                if reuse and alphas[0] == 0.0:
                    f_x0 = endpoints[0] = torch.empty(batch, dtype=acc_dtype, device=device)
                todo = [(name, rows) for name, rows, have in (("x", problem.inputs, f_x), ("x0", problem.baselines, f_x0)) if have is None]
                if todo:
                    fp32 = self._engine("fp32", internal_batch_size, memory_budget, kernel_backend)
                    outs = fp32.outputs(problem, [rows for _, rows in todo])
                    problem.target_checked = True
                    for (name, _), out in zip(todo, outs):
                        f_x, f_x0 = (out, f_x0) if name == "x" else (f_x, out)
            accs = engine.integrate(problem, alphas, weights, endpoint_steps=endpoints)
        attrs, stats = engine.finalize(problem, accs, multiply_by_inputs=self._multiply_by_inputs)
        combined = combine_stats(stats)
        delta = completeness_delta(attrs, combined, f_x, f_x0) if with_delta else None
        return BatchResult(attrs, is_tuple, combined, f_x, f_x0, delta, n_steps, problem.target)

    def _adaptive_batch(
        self,
        inputs: TensorOrTuple,
        baselines: Any,
        target: Any,
        additional_forward_args: Any,
        config: adaptive.AdaptiveSettings,
        internal_batch_size: int | None,
        with_delta: bool,
        *,
        precision: str,
        memory_budget: Any,
        allow_nonfinite: bool,
        kernel_backend: str | None,
        channels_last: bool | None,
    ) -> BatchResult:
        """n_steps='auto' (see attribute_batch and fastattr/adaptive.py)."""
        policy = get_precision(precision)
        problem, is_tuple = self._problem(
            inputs, baselines, target, additional_forward_args, need_float=True, allow_nonfinite=allow_nonfinite, with_path=True, precision=policy, channels_last=channels_last
        )
        engine = self._engine(policy, internal_batch_size, memory_budget, kernel_backend)
        with frozen_parameters(self.forward_func):
            # under fp32 the grid's endpoints give F(x), F(x0); otherwise an fp32 engine evaluates F
            # along the path forward-only, so residuals are measured against the real model
            node_engine = None if policy.name == "fp32" else self._engine("fp32", internal_batch_size, memory_budget, kernel_backend)
            res = adaptive.integrate_adaptive(engine, problem, config, node_engine=node_engine)
        attrs, stats = engine.finalize(problem, res.accs, multiply_by_inputs=self._multiply_by_inputs)
        combined = combine_stats(stats)
        delta = completeness_delta(attrs, combined, res.output, res.baseline_output) if with_delta else None
        return BatchResult(attrs, is_tuple, combined, res.output, res.baseline_output, delta, res.n_steps, problem.target, extras={"converged": res.converged})
