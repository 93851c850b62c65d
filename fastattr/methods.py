"""Captum-compatible attribution classes: Saliency, InputXGradient, IntegratedGradients.

Signatures and meanings follow Captum 0.9, so a Captum user changes one import.
Keyword-only extras are fastattr's own: ``precision`` ("fp32", "tf32", "bf16",
"fp16"), ``memory_budget`` (bytes or "8GiB"; CUDA), ``max_rows`` (rows per forward),
``allow_nonfinite``, ``kernel_backend`` and ``channels_last`` (None: by device and precision).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .engine import Engine, Problem, frozen_parameters, use_channels_last
from .inputs import TensorOrTuple, as_tuple, check_inputs, expand_baselines, normalize_forward_args, normalize_target
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
        policy = get_precision(precision)
        problem, is_tuple = self._problem(
            inputs, None, target, additional_forward_args, need_float=True, allow_nonfinite=allow_nonfinite, with_path=False, precision=policy, channels_last=channels_last
        )
        engine = self._engine(policy, max_rows, memory_budget, kernel_backend)
        with frozen_parameters(self.forward_func):
            accs = engine.integrate(problem, [1.0], [1.0])
        attrs, _ = engine.finalize(problem, [a.abs_() if abs else a for a in accs], multiply_by_inputs=False)
        return self._format(attrs, is_tuple)


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
        policy = get_precision(precision)
        problem, is_tuple = self._problem(
            inputs, None, target, additional_forward_args, need_float=True, allow_nonfinite=allow_nonfinite, with_path=False, precision=policy, channels_last=channels_last
        )
        engine = self._engine(policy, max_rows, memory_budget, kernel_backend)
        with frozen_parameters(self.forward_func):
            accs = engine.integrate(problem, [1.0], [1.0])
        attrs, _ = engine.finalize(problem, accs, multiply_by_inputs=self._multiply_by_inputs)
        return self._format(attrs, is_tuple)


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
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        *,
        precision: str = "fp32",
        memory_budget: Any = None,
        allow_nonfinite: bool = False,
        kernel_backend: str | None = None,
        channels_last: bool | None = None,
    ) -> TensorOrTuple | tuple[TensorOrTuple, torch.Tensor]:
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
            if return_convergence_delta:
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
        result = self._format(attrs, is_tuple)
        if not return_convergence_delta:
            return result
        if acc_dtype == torch.float32:
            sums = sum(st.sum for st in stats)
        else:  # the kernels' stats are float32; keep float64 deltas exact
            sums = sum(a.reshape(batch, -1).sum(1) for a in attrs)
        nonfinite = sum(st.nonfinite for st in stats)
        delta = sums - (f_x - f_x0)
        delta = torch.where(nonfinite > 0, torch.full_like(delta, float("nan")), delta)
        return result, delta
