"""Captum-compatible attribution classes: Saliency, InputXGradient, IntegratedGradients.

Signatures and meanings follow Captum 0.9, so a Captum user changes one import. Each class
implements ``attribute_batch`` (everything a dataset run stores); ``attribute`` (Captum's
result) comes from fastattr/attribution.py. Keyword-only extras are fastattr's own options
(fastattr/options.py): ``precision``, ``max_rows``, ``memory_budget``, ``allow_nonfinite``,
``kernel_backend``, ``channels_last``, ``output``, ``forward_kwargs``; IntegratedGradients also
``n_steps="auto"`` with ``tolerance``, ``max_steps``, ``abs_tolerance``, ``min_steps``
(per-sample adaptive steps, fastattr/adaptive.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import adaptive
from .attribution import BatchResult, GradientAttribution, combine_stats, completeness_delta
from .engine import frozen_parameters
from .inputs import TensorOrTuple
from .options import PATH, Options, OptionsDict, Unpack
from .quadrature import points_and_weights

__all__ = ["BatchResult", "InputXGradient", "IntegratedGradients", "Saliency", "combine_stats", "completeness_delta"]


class _PlainGradient(GradientAttribution):
    """Gradients at the inputs themselves (Saliency, InputXGradient)."""

    def _gradient_batch(self, opts: Options, inputs: TensorOrTuple, target: Any, additional_forward_args: Any, with_output: bool, *, absolute: bool) -> BatchResult:
        engine = opts.engine(self.forward_func)
        # the gradient pass's own forward (fp32: the plain forward) gives target="predicted" in a run
        fuse = engine.precision.name == "fp32"
        problem, is_tuple = self._problem(engine, opts, inputs, None, target, additional_forward_args, with_path=False, fuse_predict=fuse)
        out = torch.empty(problem.batch, dtype=torch.float32, device=problem.device) if with_output else None
        with frozen_parameters(self.forward_func):
            accs = engine.integrate(problem, [1.0], [1.0], endpoint_steps={0: out} if with_output else None)
        if absolute:
            accs = [a.abs_() for a in accs]
        attrs, stats = engine.finalize(problem, accs, multiply_by_inputs=self._multiply_by_inputs)
        return BatchResult(attrs, is_tuple, combine_stats(stats), out, None, None, 1, problem.target)


class Saliency(_PlainGradient):
    """Gradients of the target output with respect to the inputs (absolute by default)."""

    _multiply_by_inputs = False

    def attribute_batch(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        abs: bool = True,  # noqa: A002 - Captum's name
        additional_forward_args: Any = None,
        with_output: bool = True,
        **options: Unpack[OptionsDict],
    ) -> BatchResult:
        """attribute() plus F(x) (taken from the gradient pass) and per-sample stats."""
        return self._gradient_batch(self._options(options), inputs, target, additional_forward_args, with_output, absolute=abs)


class InputXGradient(_PlainGradient):
    """Input times the gradient of the target output with respect to the input."""

    def __init__(self, forward_func: Callable[..., Any], multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    def attribute_batch(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        with_output: bool = True,
        **options: Unpack[OptionsDict],
    ) -> BatchResult:
        """attribute() plus F(x) (taken from the gradient pass) and per-sample stats."""
        return self._gradient_batch(self._options(options), inputs, target, additional_forward_args, with_output, absolute=False)


class IntegratedGradients(GradientAttribution):
    """Integrated gradients (Sundararajan et al. 2017) along the straight path x0 -> x.

    attr = (x - x0) * sum_s w_s dF/dx(x0 + alpha_s (x - x0)), with the rule's
    (alpha_s, w_s); multiply_by_inputs=False returns the integrated gradient alone.
    """

    option_names = PATH
    has_delta = True
    half_attributions_as_float = True  # as Captum's (its float32 step sizes)

    def __init__(self, forward_func: Callable[..., Any], multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

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
        **options: Unpack[OptionsDict],
    ) -> BatchResult:
        """attribute() with everything a dataset run stores: F(x), F(x0), delta, stats.

        n_steps="auto": per-sample adaptive steps until |delta| <= max(tolerance |F(x) - F(x0)|,
        abs_tolerance) (and the rule's vector check holds), at most max_steps (fastattr/adaptive.py);
        ``method`` then names the adaptive rule ("simpson", the default, and "trapezoid": nested
        dyadic grids; "gausslegendre": Gauss-Legendre doubling). method=None (the default) means
        Captum's "gausslegendre" for a fixed n_steps. n_steps comes back as a (B,) tensor and
        ``extras["converged"]`` says which samples met the tolerance before the cap.
        """
        opts = self._options(options).with_rows("internal_batch_size", internal_batch_size)
        settings = adaptive.resolve(n_steps, method, opts.adaptive())
        if settings is None:
            alphas, weights = points_and_weights(method or "gausslegendre", n_steps)  # Captum's default rule
        engine = opts.engine(self.forward_func)
        # target="predicted" of a run comes from the fp32 F(x) pass below, where that pass runs (not
        # when the gradient pass's endpoint gives F(x): its rows are x0 + 1 (x - x0), not x)
        fuse = settings is None and with_delta and not (engine.precision.name == "fp32" and alphas[-1] == 1.0)
        problem, is_tuple = self._problem(engine, opts, inputs, baselines, target, additional_forward_args, with_path=True, fuse_predict=fuse)
        if settings is not None:
            return self._adaptive_batch(opts, engine, problem, is_tuple, settings, with_delta)
        batch, device = problem.batch, problem.device
        acc_dtype = torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32
        with frozen_parameters(self.forward_func):
            endpoints: dict[int, torch.Tensor] = {}
            f_x = f_x0 = None
            if with_delta:
                # F(x) and F(x0) come from the gradient pass when the rule samples an endpoint
                # and the pass runs in plain fp32; the rest are evaluated together, in fp32.
                reuse = engine.precision.name == "fp32"
                if reuse and alphas[-1] == 1.0:
                    f_x = endpoints[len(alphas) - 1] = torch.empty(batch, dtype=acc_dtype, device=device)
                if reuse and alphas[0] == 0.0:
                    f_x0 = endpoints[0] = torch.empty(batch, dtype=acc_dtype, device=device)
                todo = [(name, rows) for name, rows, have in (("x", problem.inputs, f_x), ("x0", problem.baselines, f_x0)) if have is None]
                if todo:
                    outs = opts.engine(self.forward_func, "fp32").outputs(problem, [rows for _, rows in todo])
                    problem.target_checked = True
                    for (name, _), out in zip(todo, outs):
                        f_x, f_x0 = (out, f_x0) if name == "x" else (f_x, out)
            accs = engine.integrate(problem, alphas, weights, endpoint_steps=endpoints)
        attrs, stats = engine.finalize(problem, accs, multiply_by_inputs=self._multiply_by_inputs)
        combined = combine_stats(stats)
        delta = completeness_delta(attrs, combined, f_x, f_x0) if with_delta else None
        return BatchResult(attrs, is_tuple, combined, f_x, f_x0, delta, n_steps, problem.target)

    def _adaptive_batch(self, opts: Options, engine: Any, problem: Any, is_tuple: bool, settings: adaptive.AdaptiveSettings, with_delta: bool) -> BatchResult:
        """n_steps='auto' (see attribute_batch and fastattr/adaptive.py)."""
        with frozen_parameters(self.forward_func):
            # under fp32 the grid's endpoints give F(x), F(x0); otherwise an fp32 engine evaluates F
            # along the path forward-only, so residuals are measured against the real model
            node_engine = None if engine.precision.name == "fp32" else opts.engine(self.forward_func, "fp32")
            res = adaptive.integrate_adaptive(engine, problem, settings, node_engine=node_engine)
        attrs, stats = engine.finalize(problem, res.accs, multiply_by_inputs=self._multiply_by_inputs)
        combined = combine_stats(stats)
        delta = completeness_delta(attrs, combined, res.output, res.baseline_output) if with_delta else None
        return BatchResult(attrs, is_tuple, combined, res.output, res.baseline_output, delta, res.n_steps, problem.target, extras={"converged": res.converged})
