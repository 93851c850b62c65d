"""Layer integrated gradients (Captum's LayerIntegratedGradients) on fastattr's engine.

IG over a layer's activations: attr = (a(x) - a(x0)) * sum_s w_s dF/da at
a(x0) + alpha_s (a(x) - a(x0)), where a is the layer's output (or its input with
``attribute_to_layer_input=True``) and the baselines x0 are *model inputs*, as in Captum
(None: zeros, e.g. token id 0). How it runs:

1. one forward-only pass (fp32, chunks of at most the row cap) over x and x0 stacked
   captures a(x), a(x0) with hooks, and F(x), F(x0) from the same forwards;
2. the engine integrates over a problem whose "inputs" are a(x), whose baselines are
   a(x0), and whose forward is the model run on the original inputs (gathered per row
   like any forward arg) with a hook that swaps the layer's value for the interpolated
   rows. Chunking, the row budget, precision policies, the kernels and finalize are the
   engine's, so no forward sees more rows than the cap in either pass.

The delta is sum over all layers' attributions - (F(x) - F(x0)) with F(x0) the model at
the baseline *inputs* (Captum's definition), so it also shows dependence on x that
bypasses the layer. Tuple-valued layers: every floating-point tensor part is attributed
(Captum's behaviour when all parts are float tensors); other parts (int/bool tensors,
None) pass through unchanged instead of failing. A layer that runs twice per forward is
an error. ``device_ids`` (DataParallel) is not supported.

Dataset-run entry point (the lead's runner stores everything in the BatchResult)::

    LayerIntegratedGradients(model, layer, multiply_by_inputs=True).attribute_batch(
        inputs, baselines=None, target=None, additional_forward_args=None, n_steps=50,
        method=None, internal_batch_size=None, with_delta=True, attribute_to_layer_input=False,
        grad_kwargs=None, *, reduce=None, lengths=None, trim_padding=None, **options,
    ) -> BatchResult

``options``: fastattr's keyword options (fastattr/options.py: precision, max_rows, output,
forward_kwargs, tolerance, ...). ``attribute()`` is Captum's, formatting this result (per
layer, a list for a list of layers; trim_padding=False by default there).

- ``attributions``: one tensor per attributed part, ``names`` the layer's qualified name
  (``name[j]`` for part j of a tuple-valued layer); full shape, e.g. (B, T, D) for an
  embedding, or with ``reduce`` = "sum" | "l2" | "abs" the last dim reduced by
  ``fastattr.kernels.channel_reduce``: (B, T) per-token attributions.
- ``stats`` and ``delta`` are always over the *full* attributions (so delta =
  stats.sum - (F(x) - F(x0)) holds whatever ``reduce`` stores).
- ``lengths``: (B,) ints (real tokens per padded row; ``lengths_from_mask(mask)``
  derives them from an attention mask); returned as ``extras["lengths"]`` so a store
  can keep padded rows plus their lengths. With ``trim_padding`` (below) off, values are not
  changed by it.

Padding-aware pass (``trim_padding``; ``attribute(..., lengths=, trim_padding=True)``, and
``attribute_batch`` by default whenever ``lengths`` are given): step 2 enumerates the
(example, step) pairs example-major over the examples sorted by length, and runs each chunk
(``Engine.integrate_pairs(seq_lengths=)``, still at most the row cap) with dim 1 of the
activation rows, of the model inputs and of the batch-dim forward args of length T cut to the
chunk's longest real length; gradients are zero past it, and positions past each row's own
length get attribution exactly 0. Exact for models whose output ignores trailing padding
(key-masked attention, masked pooling). Before trusting it, F at the trimmed x and x0 (2B
forward-only fp32 rows, sorted by length, in at most 16 forwards, so rows are cut near their
own lengths) must match the capture pass's full-length F within ``TRIM_RTOL`` of the batch's
largest |F|. On a mismatch ``trim_padding=True`` raises ``PaddingNotIgnoredError``; the
default (None) warns and runs the full-length pass. Not combined with ``n_steps="auto"``
(full-length pass); every attributed value must be (B, T, ...) with lengths <= T.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import adaptive, kernels
from .activations import (
    LayerSlot,
    capture,
    check_lengths,
    fresh_slots,
    layer_slots,
    lengths_from_mask,
    per_layer_structure,
)
from .attribution import BatchResult, GradientAttribution, combine_stats, completeness_delta
from .engine import Engine, Problem, frozen_parameters
from .errors import OptionError, PaddingNotIgnoredError
from .inputs import (
    AttributionInputError,
    NoGradientError,
    TensorOrTuple,
    as_tuple,
    check_inputs,
    expand_baselines,
    normalize_forward_args,
    normalize_target,
)
from .options import PATH, Options, OptionsDict, Unpack
from .precision import get_precision
from .quadrature import points_and_weights

logger = logging.getLogger(__name__)

__all__ = ["LayerIntegratedGradients", "PaddingNotIgnoredError", "lengths_from_mask", "REDUCTIONS"]

REDUCTIONS = ("sum", "l2", "abs")


class _PatchedForward:
    """forward(*activation_rows, *model_inputs, *forward_args): the model on its own inputs,
    with each hooked layer's float parts replaced by the given activation rows.

    One object per (layer structure, input/output), kept on the attribution object, so the
    row planner's per-forward cache (keyed by the forward's id) settles once across batches.
    """

    def __init__(self, forward_func: Callable[..., Any], slots: Sequence[LayerSlot], to_input: bool) -> None:
        self.forward_func = forward_func
        self.slots = list(slots)
        self.to_input = to_input
        self.n_acts = sum(len(s.parts) for s in slots)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        acts, rest = args[: self.n_acts], args[self.n_acts :]
        calls = [0] * len(self.slots)
        handles = []
        i = 0
        try:
            for k, s in enumerate(self.slots):
                hook = self._hook(k, s, acts[i : i + len(s.parts)], calls)
                i += len(s.parts)
                handles.append(
                    s.module.register_forward_pre_hook(hook) if self.to_input else s.module.register_forward_hook(hook)
                )
            y = self.forward_func(*rest, **kwargs)
        finally:
            for h in handles:
                h.remove()
        missing = [s.name for s, c in zip(self.slots, calls) if c == 0]
        if missing:
            raise AttributionInputError(f"layer(s) {missing} did not run during the model's forward")
        return y

    def _hook(self, k: int, slot: LayerSlot, mine: Sequence[torch.Tensor], calls: list[int]) -> Callable[..., Any]:
        def hook(_module: torch.nn.Module, args: Any, out: Any = None) -> Any:
            calls[k] += 1
            if calls[k] > 1:
                raise AttributionInputError(
                    f"layer {slot.name!r} ran {calls[k]} times in one forward; layer attribution needs a layer that runs once per forward"
                )
            value = args if self.to_input else out
            items = [value] if slot.bare else list(value)
            for j, new in zip(slot.parts, mine):
                if items[j].shape != new.shape:
                    raise AttributionInputError(
                        f"layer {slot.name!r} produced shape {tuple(items[j].shape)} but {tuple(new.shape)} was captured for these rows"
                    )
                items[j] = new
            if slot.bare:
                return items[0]
            if isinstance(value, list):
                return items
            return value._make(items) if hasattr(value, "_make") else tuple(items)  # namedtuples keep their type

        return hook


class LayerIntegratedGradients(GradientAttribution):
    """Integrated gradients with respect to a layer's output or input (Captum-compatible)."""

    option_names = PATH
    has_delta = True
    half_attributions_as_float = True  # as Captum's (its float32 step sizes)
    captum_defaults = {"trim_padding": False}  # attribute() trims only when asked

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: Any,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        self.slots, self.is_list = layer_slots(forward_func, layer, device_ids)
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs
        self._patched: dict[tuple, _PatchedForward] = {}
        self._lock = threading.Lock()
        if len(self.slots) > 1:
            logger.info("several layers: none may feed another, or the upstream one gets no gradient (as in Captum)")

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
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        *,
        reduce: str | None = None,
        lengths: Any = None,
        trim_padding: bool | None = None,
        **options: Unpack[OptionsDict],
    ) -> BatchResult:
        """attribute() with everything a dataset run stores; see the module docstring.
        attribute() returns Captum's result: per layer a tensor of the layer's shape (a tuple for a
        tuple-valued layer), a list of those when a list of layers was given; plus the (B,) delta.
        n_steps="auto" (with tolerance, max_steps, abs_tolerance, min_steps) refines each sample
        to the completeness tolerance as IntegratedGradients does (fastattr/adaptive.py).
        ``grad_kwargs``: Captum's; ``{"materialize_grads": True}`` gives zeros for a layer the
        output does not depend on (instead of NoGradientError).
        ``trim_padding``: None (attribute_batch's default) trims when ``lengths`` are given and
        falls back to the full-length pass with a warning where trimming would not be exact; True
        requires it (errors instead); False (attribute()'s default) never trims."""
        opts = self._options(options).with_rows("internal_batch_size", internal_batch_size)
        return self._attribute(
            opts, inputs, baselines, target, additional_forward_args, n_steps, method, with_delta,
            attribute_to_layer_input, grad_kwargs, reduce, lengths, trim_padding,
        )  # fmt: skip

    # ------------------------------------------------------------------ internals
    def _forward_for(self, slots: Sequence[LayerSlot], to_input: bool) -> _PatchedForward:
        key = (to_input, tuple((s.name, s.bare, tuple(s.parts), s.length) for s in slots))
        with self._lock:
            if key not in self._patched:
                self._patched[key] = _PatchedForward(self.forward_func, slots, to_input)
            return self._patched[key]

    def _structure(self, slots: Sequence[LayerSlot]) -> Callable[[list[torch.Tensor]], Any]:
        """Captum's nesting: per layer a tensor (or a tuple of its parts), a list for a list of layers."""
        return per_layer_structure([len(s.parts) for s in slots], self.is_list)

    def _attribute(
        self,
        opts: Options,
        inputs: TensorOrTuple,
        baselines: Any,
        target: Any,
        additional_forward_args: Any,
        n_steps: int | str,
        method: str | None,
        with_delta: bool,
        to_input: bool,
        grad_kwargs: dict[str, Any] | None,
        reduce: str | None,
        lengths: Any,
        trim_padding: bool | None,
    ) -> BatchResult:
        # ---- validation, before any model work
        settings = adaptive.resolve(n_steps, method, opts.adaptive())  # n_steps="auto": per-sample adaptive steps
        if settings is None:
            alphas, weights = points_and_weights(method or "gausslegendre", n_steps)
        cap = opts.max_rows
        if reduce is not None and reduce not in REDUCTIONS:
            raise OptionError(f"reduce must be None (full tensor) or one of {REDUCTIONS}, got {reduce!r}")
        if grad_kwargs is not None and not isinstance(grad_kwargs, dict):
            raise OptionError(f"grad_kwargs must be a dict, got {type(grad_kwargs).__name__}")
        xs, _ = as_tuple(inputs)
        xs = tuple(x.detach() for x in xs)
        batch = check_inputs(xs, need_float=False, allow_nonfinite=opts.allow_nonfinite)
        x0s = expand_baselines(baselines, xs, allow_nonfinite=opts.allow_nonfinite)
        device = xs[0].device
        tgt = normalize_target(target, batch, device)
        fargs = normalize_forward_args(additional_forward_args)
        lens = check_lengths(lengths, batch, device)
        if trim_padding not in (None, True, False):
            raise OptionError(f"trim_padding must be True, False or None (trim when lengths are given), got {trim_padding!r}")
        if trim_padding and lens is None:
            raise OptionError("trim_padding=True needs lengths= (B,): the real tokens per padded row")
        if trim_padding and settings is not None:
            raise OptionError("trim_padding=True is not supported with n_steps='auto'; use a fixed n_steps")
        # None: trim when it can apply (lengths given, fixed steps); True: required, errors instead of falling back
        want_trim = lens is not None and settings is None and trim_padding is not False
        selector = opts.engine(self.forward_func, "fp32")
        select_problem = Problem(xs, None, tgt, fargs, forward_kwargs=opts.kwargs)  # validates the target on the first output
        slots = fresh_slots(self.slots)
        f_both: list[torch.Tensor] = []

        def on_output(y: Any, ex: torch.Tensor, r0: int, r1: int) -> None:
            selected = selector._select(y, ex, select_problem)
            if not f_both:
                dtype = torch.float64 if selected.dtype == torch.float64 else torch.float32
                f_both.append(torch.empty(2 * batch, dtype=dtype, device=device))
            f_both[0][r0:r1] = selected.to(f_both[0].dtype)

        with frozen_parameters(self.forward_func):
            # ---- 1. a(x), a(x0) and F(x), F(x0): forward only, fp32, x and x0 stacked
            stacked = tuple(torch.cat([x, x0]) for x, x0 in zip(xs, x0s))
            parts = capture(
                self.forward_func, slots, stacked, fargs, batch, forward_kwargs=opts.kwargs,
                max_rows=cap, to_input=to_input, precision=get_precision("fp32"), on_output=on_output,
            )  # fmt: skip
            empty = [s.name for s in slots if not s.parts]
            if empty:
                kind = "input" if to_input else "output"
                raise AttributionInputError(
                    f"layer(s) {empty} have no floating-point tensor {kind} to attribute (integer inputs such as token ids cannot be interpolated; attribute to the layer's output)"
                )
            acts = [t for p in parts for t in p]
            if reduce is not None and any(a.dim() < 2 for a in acts):
                raise AttributionInputError(
                    f"reduce={reduce!r} reduces the last dim, but a layer value has shape {[tuple(a.shape) for a in acts]}"
                )
            f_x, f_x0 = f_both[0].split(batch)
            why_not = _trim_obstacle(acts, lens) if want_trim else None
            if why_not is not None:
                if trim_padding:
                    raise AttributionInputError(f"trim_padding=True cannot apply: {why_not}")
                logger.debug("padding not trimmed: %s", why_not)
            trim = want_trim and why_not is None
            # ---- 2. IG over the activations, the model patched at the layer
            problem = Problem(
                tuple(a[:batch] for a in acts), tuple(a[batch:] for a in acts), select_problem.target, (*xs, *fargs),
                target_checked=True, forward_kwargs=opts.kwargs,
            )  # fmt: skip
            forward = self._forward_for(slots, to_input)
            engine = opts.engine(forward, grad_kwargs=grad_kwargs)
            engine.settle_layout(problem, False if trim else opts.channels_last)
            if trim:
                trim = _padding_ignored(forward, problem, lens, f_x, f_x0, cap=cap, opts=opts, required=bool(trim_padding))
            try:
                if trim:
                    trim_engine = opts.engine(forward, max_rows=_trim_rows(cap, len(alphas), device), grad_kwargs=grad_kwargs)
                    accs = _integrate_trimmed(trim_engine, problem, lens, alphas, weights)
                elif settings is None:
                    accs = engine.integrate(problem, alphas, weights)
                else:  # the caller's F(x), F(x0) are the fp32 values from step 1
                    node_engine = None if engine.precision.name == "fp32" else opts.engine(forward, "fp32")
                    adapted = adaptive.integrate_adaptive(engine, problem, settings, f_x=f_x, f_x0=f_x0, node_engine=node_engine)
                    accs = adapted.accs
            except NoGradientError as e:
                names = [n for s in slots for n in s.part_names()]
                raise NoGradientError(
                    f"{e}; the attributed parts are, in order, {names}. A layer off the path to the output, or one that only "
                    "feeds another listed layer, gets no gradient (listed layers must not depend on each other); "
                    'grad_kwargs={"materialize_grads": True} gives zeros for it instead, as in Captum'
                ) from None
        attrs, stats = engine.finalize(problem, accs, multiply_by_inputs=self._multiply_by_inputs)
        combined = combine_stats(stats)
        delta = completeness_delta(attrs, combined, f_x, f_x0) if with_delta else None
        if reduce is not None:
            # per-token (per-position) attributions: the last (embedding / channel) dim reduced
            attrs = [
                kernels.channel_reduce(a.contiguous(), a.dim() - 1, reduce, out_dtype=a.dtype, backend=opts.kernel_backend)
                for a in attrs
            ]
        extras = {} if lens is None else {"lengths": lens}
        if settings is not None:
            n_steps, extras["converged"] = adapted.n_steps, adapted.converged
        names = [n for s in slots for n in s.part_names()]
        return BatchResult(
            attrs, len(attrs) > 1, combined, f_x, f_x0, delta, n_steps, problem.target, names=names, extras=extras,
            structure=self._structure(slots),
        )  # fmt: skip


# ---------------------------------------------------------------------- padding-aware pass
# Tolerance of the exactness check, relative to the batch's largest |F|. Measured max deviation
# of trimmed vs full-length F (tests/token_models.py's TokenClassifier at B=4/40, T=12 and the
# benchmarks/bench_layer.py model at B=32, T=64, 3 seeds each): fp32 2.8e-7, fp64 4.2e-16 when the
# padding is ignored; mean pooling over all positions: 0.33 to 1.6.
TRIM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
TRIM_CHECK_FORWARDS = 16  # forwards of the check: more cut rows closer to their own length, each costs overhead


# CPU rows per forward of the trimmed pass when the caller sets no cap: a chunk should span
# only ~2 examples' steps, or it runs at the longest of many lengths. The row planner cannot
# judge this (its rate rises as sorted rows get shorter, so it kept doubling to 512-576 rows);
# measured on benchmarks/bench_layer.py's case (1 thread, GL-50, min of 5): 64-100 rows 0.63 s,
# 32 rows 0.67 s, 256 rows 0.70 s, unbounded planner 0.70 s. CUDA keeps the memory probe.
TRIM_CPU_MIN_ROWS = 64
TRIM_CPU_STEPS = 2


def _trim_rows(cap: int | None, n_steps: int, device: torch.device) -> int | None:
    """Row cap of the trimmed pass: the caller's cap, on CPU also at most ~2 examples' steps."""
    if device.type == "cuda":
        return cap
    bound = max(TRIM_CPU_MIN_ROWS, TRIM_CPU_STEPS * n_steps)
    return bound if cap is None else min(cap, bound)


def _trim_obstacle(acts: Sequence[torch.Tensor], lens: torch.Tensor) -> str | None:
    """Why the attributed values cannot be cut along dim 1 to the lengths, or None if they can."""
    t = acts[0].shape[1] if acts[0].dim() > 1 else None
    if t is None or any(a.dim() < 2 or a.shape[1] != t for a in acts):
        return (
            "every attributed layer value must be (B, T, ...) with the sequence in dim 1 and one T for all; "
            f"got {[tuple(a.shape[1:]) for a in acts]} per row"
        )
    if bool((lens > t).any()):
        return f"lengths go up to {int(lens.max())} but the layer's sequence dim has {t} positions"
    return None


def _padding_ignored(
    forward: _PatchedForward,
    problem: Problem,
    lens: torch.Tensor,
    f_x: torch.Tensor,
    f_x0: torch.Tensor,
    *,
    cap: int | None,
    opts: Options,
    required: bool,
) -> bool:
    """Whether F at trimmed x and x0 matches F at full length from the capture pass.

    Trimming is exact only for a model whose output ignores positions past each row's
    length (key-masked attention, masked pooling). The check is one fp32 forward-only pass
    over the 2B rows sorted by length, x and x0 of an example side by side, in at most
    TRIM_CHECK_FORWARDS chunks, each cut to its longest row: every row loses its padding
    past that length (all of it for B <= TRIM_CHECK_FORWARDS). A mismatch raises
    PaddingNotIgnoredError when trimming was required, else warns and returns False (the
    caller then runs the full-length pass)."""
    batch = problem.batch
    order = torch.argsort(lens, descending=True, stable=True)
    ex = order.repeat_interleave(2)
    ends = torch.tensor([1.0, 0.0], dtype=problem.inputs[0].dtype, device=problem.device).repeat(batch)
    rows = 2 * -(-batch // TRIM_CHECK_FORWARDS)  # x and x0 of ceil(B / forwards) examples
    check = opts.engine(forward, "fp32", max_rows=rows if cap is None else min(cap, rows))
    try:
        got = check.outputs_pairs(problem, ex, ends, seq_lengths=lens)
    except torch.OutOfMemoryError:  # a RuntimeError too, but not the model's verdict on trimming
        raise
    except (AttributionInputError, RuntimeError) as e:  # e.g. a model that cannot run on cut inputs
        got, failure = None, f"the model failed on trimmed inputs ({type(e).__name__}: {e})"
    want = torch.stack([f_x[order], f_x0[order]], 1).reshape(-1).to(torch.float64)
    if got is not None:
        err = (got.to(torch.float64) - want).abs()
        tol = TRIM_RTOL.get(f_x.dtype, 1e-5) * float(want.abs().max().clamp(min=1e-30))
        if bool((err <= tol).all()):
            return True
        worst = int(err.argmax())
        failure = (
            f"the model's output changes when trailing padding is cut off (example {int(ex[worst])}, length "
            f"{int(lens[ex[worst]])}, {'F(x0)' if worst % 2 else 'F(x)'}: {float(want[worst]):.6g} at full length vs "
            f"{float(got[worst]):.6g} trimmed; tolerance {tol:.3g}); trimming is exact only for a model that ignores "
            "positions past each row's length (masked attention keys and pooling)"
        )
    if required:
        raise PaddingNotIgnoredError(f"trim_padding=True: {failure}")
    warnings.warn(f"padding not trimmed, full-length pass instead: {failure}", RuntimeWarning, stacklevel=4)
    return False


def _integrate_trimmed(
    engine: Engine, problem: Problem, lens: torch.Tensor, alphas: Sequence[float], weights: Sequence[float]
) -> tuple[torch.Tensor, ...]:
    """The IG pass with chunks cut to their longest real length.

    Pairs are enumerated example-major over the examples sorted by length (longest first),
    so a chunk holds consecutive steps of a few rows of similar length; step-major chunks of
    B or more rows would span every length and could not be cut. The engine's
    ``integrate_pairs`` keeps the row budget and precision policy. Accumulators are (B, F)
    in the original example order; positions past a row's own length are set to 0, which is
    their exact gradient for a model that ignores them (and makes the result independent of
    which rows share a chunk)."""
    batch, n_steps, device = problem.batch, len(alphas), problem.device
    acc_dtype = torch.float64 if problem.inputs[0].dtype == torch.float64 else torch.float32
    order = torch.argsort(lens, descending=True, stable=True)
    ex = order.repeat_interleave(n_steps)
    al = torch.tensor(alphas, dtype=torch.float64, device=device).repeat(batch)
    w = torch.tensor(weights, dtype=acc_dtype, device=device).repeat(batch)
    accs = tuple(torch.zeros((batch, x[0].numel()), dtype=acc_dtype, device=device) for x in problem.inputs)
    engine.integrate_pairs(problem, ex, al, w, accs, seq_lengths=lens)
    t = problem.inputs[0].shape[1]
    past = torch.arange(t, device=device)[None, :] >= lens[:, None]  # (B, T)
    for acc in accs:
        acc.view(batch, t, -1).masked_fill_(past[:, :, None], 0)
    return accs
