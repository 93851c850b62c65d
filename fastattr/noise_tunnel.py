"""NoiseTunnel: SmoothGrad, SmoothGrad-squared and VarGrad over an attribution method.

Captum 0.9's signature and meaning::

    NoiseTunnel(method).attribute(
        inputs, nt_type="smoothgrad", nt_samples=5, nt_samples_batch_size=None, stdevs=1.0,
        draw_baseline_from_distrib=False, *, seed=None, **kwargs)
        -> attributions, or (attributions, delta) with return_convergence_delta=True

    NoiseTunnel(method).attribute_batch(
        inputs, nt_type="smoothgrad", nt_samples=5, nt_samples_batch_size=None, stdevs=1.0,
        draw_baseline_from_distrib=False, *, seed=None, sample_ids=None, with_output=True,
        with_delta=None, **kwargs) -> BatchResult

``kwargs`` go to the wrapped method: baselines, target, additional_forward_args, n_steps,
method, internal_batch_size, abs, attribute_to_layer_input, ..., and fastattr's options
(fastattr/options.py: precision, max_rows, output, forward_kwargs, ...).

Two paths:

- fastattr's own methods (``noise_batched``: Saliency, InputXGradient, IntegratedGradients,
  GradientShap, LayerIntegratedGradients): the batched path below.
- any other Captum-style attribution object (Captum's DeepLift, GuidedBackprop,
  FeatureAblation, ...; fastattr's LayerActivation): Captum's own algorithm, call for call
  (fastattr/noise_generic.py).

Meaning (as Captum): each example gets ``nt_samples`` noisy copies x + N(0, stdev^2) (one
stdev per input); the wrapped method attributes each copy as if it were the input (so
multiply_by_inputs multiplies by the *noisy* input minus the baseline); smoothgrad is the
mean of the copies' attributions, smoothgrad_sq the mean of their squares, vargrad
E[a^2] - E[a]^2. With ``draw_baseline_from_distrib`` each copy gets a baseline drawn
uniformly from the rows of ``baselines`` (a reference set). Over LayerIntegratedGradients the
noise is added to the model inputs and the layer's attributions are smoothed.

Batching: the noisy copies of a batch form a virtual batch of (copies x examples) rows,
laid out copy-major (row j * B + b), handed to the wrapped method's engine, whose
chunking keeps every forward at or under the row cap (internal_batch_size / max_rows,
or the tuned/probed budget) whatever nt_samples, n_steps and B are. Copies are grouped
so one group holds at most ``GROUP_ELEMENTS`` input elements (or nt_samples_batch_size
copies when given); per group the copies' attributions are folded into first and second
moments by ``fastattr.kernels.moments`` (Triton on CUDA).

Random draws:

- ``seed=None`` (in-memory parity path): noise comes from torch's global RNG and baseline
  draws from numpy's, in Captum's order and shapes (per partition of
  nt_samples_batch_size copies: baseline indices, then noise per input, as
  ``torch.randn(B * k, ...) * stdev``; example-major rows). So ``torch.manual_seed(s)``
  (and ``np.random.seed``) before each call gives fastattr and Captum the same noise.
  A partition's noise is drawn at once, as Captum does (k x the input's size); the
  engine work on it is still grouped and chunked. Pass nt_samples_batch_size or a seed
  to bound that draw too.
  NoiseTunnel over GradientShap draws as Captum does but orders the copies copy-major,
  so its unseeded draws land on other (example, copy) pairs than Captum's: same
  distribution, not the same numbers.
- ``seed=int``: copy j of the example with global index i draws from its own
  generator, seeded by a hash of (seed, i, j); noise is drawn in float32 on the CPU and
  moved to the inputs' device, so a sample's noise does not depend on batch boundaries,
  resume points, ranks, grouping or device. ``sample_ids`` ((B,) int) gives the global
  indices (default 0..B-1). A dataset run must record the seed in its config.

BatchResult of ``attribute_batch``: attributions and stats of the smoothed result;
``output`` F(x) at the clean input (fp32 forward, when with_output); for methods with
a convergence delta, ``delta`` and ``baseline_output`` are the means over the copies of
each copy's delta and F(x0), and ``extras["noisy_output"]`` the mean of F(x + noise), so
delta = sum(attr) - (noisy_output - baseline_output) for smoothgrad. (``attribute``'s
delta, ``copy_delta``, is Captum's: one entry per copy, partition by partition, example-major.)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import numpy as np
import torch

from . import kernels
from ._copies import (
    captum_delta_order,
    check_seed,
    check_stdevs,
    copy_major,
    draw_rows,
    group_sizes,
    reference_rows,
    stream_seed,
    tile,
    tile_args,
    tile_kwargs,
    tile_target,
)
from .attribution import Attribution, BatchResult, combine_stats
from .engine import Problem, frozen_parameters
from .errors import OptionError
from .inputs import (
    AttributionInputError,
    TensorOrTuple,
    as_tuple,
    check_inputs,
    normalize_forward_args,
    normalize_target,
    promote_integers,
)
from .noise_generic import NT_TYPES, generic_noise_tunnel
from .options import FIELDS, Options, optional_positive_int, positive_int

logger = logging.getLogger(__name__)

__all__ = ["NT_TYPES", "NoiseTunnel"]

# arguments NoiseTunnel fills per copy group (the rest of kwargs go to the wrapped method as given)
_MANAGED = frozenset({"inputs", "baselines", "target", "additional_forward_args", "with_output", "with_delta", "seed", "sample_ids", "options"})


class NoiseTunnel(Attribution):
    """SmoothGrad / SmoothGrad^2 / VarGrad over an attribution method (see module docstring)."""

    noise_batched = False  # a NoiseTunnel inside a NoiseTunnel goes the generic path

    def __init__(self, attribution_method: Any) -> None:
        if not callable(getattr(attribution_method, "attribute", None)) or not hasattr(attribution_method, "forward_func"):
            raise TypeError(f"NoiseTunnel wraps an attribution object (with .attribute and .forward_func); got {type(attribution_method).__name__}")
        self.attribution_method = attribution_method
        self.forward_func = attribution_method.forward_func
        self.is_delta_supported = bool(attribution_method.has_convergence_delta())
        self._multiply_by_inputs = bool(getattr(attribution_method, "multiplies_by_inputs", False))
        # Captum's NoiseTunnel makes noisy inputs require grad for gradient methods (GradientAttribution)
        self.is_gradient_method = hasattr(attribution_method, "gradient_func") or hasattr(attribution_method, "compute_convergence_delta")
        self.batched = bool(getattr(attribution_method, "noise_batched", False)) and callable(getattr(attribution_method, "attribute_batch", None))

    def has_convergence_delta(self) -> bool:
        return self.is_delta_supported

    def attribute_batch(
        self,
        inputs: TensorOrTuple,
        nt_type: str = "smoothgrad",
        nt_samples: int = 5,
        nt_samples_batch_size: int | None = None,
        stdevs: float | tuple[float, ...] = 1.0,
        draw_baseline_from_distrib: bool = False,
        *,
        seed: int | None = None,
        sample_ids: torch.Tensor | None = None,
        with_output: bool = True,
        with_delta: bool | None = None,
        **kwargs: Any,
    ) -> BatchResult:
        """attribute() with what a dataset run stores (see the module docstring). ``with_delta``:
        None means the wrapped method's default (a delta where it has one)."""
        if nt_type not in NT_TYPES:
            raise OptionError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}")
        nt = positive_int("nt_samples", nt_samples)
        nsbs = optional_positive_int("nt_samples_batch_size", nt_samples_batch_size)
        want_delta = self.is_delta_supported if with_delta is None else bool(with_delta)
        if not self.batched:
            if seed is not None or sample_ids is not None:
                raise OptionError(f"seed= and sample_ids= need one of fastattr's own methods; NoiseTunnel over {type(self.attribution_method).__name__} draws from the global RNG, as Captum")
            return generic_noise_tunnel(self, inputs, nt_type, nt, nsbs, stdevs, draw_baseline_from_distrib, kwargs, want_delta and bool(with_delta))
        return self._batched(inputs, nt_type, nt, nsbs, stdevs, draw_baseline_from_distrib, kwargs, seed=seed, sample_ids=sample_ids, with_output=with_output, with_delta=want_delta)

    # ------------------------------------------------------------------ internals
    def _inner_options(self, kwargs: dict[str, Any], with_delta: bool) -> tuple[dict[str, Any], Options]:
        """kwargs for the wrapped method's attribute_batch, checked against its signature and
        options; the options parsed (so forward_kwargs can be tiled per copy group)."""
        method = self.attribution_method
        names = {n for n, p in inspect.signature(method.attribute_batch).parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        option_kw = {k: v for k, v in kwargs.items() if k in method.option_names or k == "options"}
        rest = {k: v for k, v in kwargs.items() if k not in option_kw}
        unknown = sorted(set(rest) - (names - _MANAGED) - {"baselines", "target", "additional_forward_args"})
        if unknown:
            extra = "" if not set(unknown) & FIELDS else " (not an option it takes)"
            raise TypeError(f"{type(method).__name__} does not take {', '.join(map(repr, unknown))}{extra} (passed through NoiseTunnel)")
        if "baselines" in kwargs and "baselines" not in names:
            raise TypeError(f"{type(method).__name__} takes no baselines")
        if with_delta and not self.is_delta_supported:
            raise AttributionInputError(f"{type(method).__name__} has no convergence delta; drop return_convergence_delta")
        opts = Options.parse(option_kw, method.option_names, f"{type(method).__name__}.attribute")
        options = {k: v for k, v in rest.items() if k not in ("baselines", "target", "additional_forward_args")}
        if "with_delta" in names:
            options["with_delta"] = with_delta
        if "with_output" in names:
            options["with_output"] = False  # F at the noisy copies is not needed; F(x) is taken once at the clean input
        return options, opts

    def _batched(
        self,
        inputs: TensorOrTuple,
        nt_type: str,
        nt: int,
        nsbs: int | None,
        stdevs: Any,
        draw_baseline_from_distrib: bool,
        kwargs: dict[str, Any],
        *,
        seed: int | None,
        sample_ids: Any,
        with_output: bool,
        with_delta: bool,
    ) -> BatchResult:
        # ---- validation, before any model work
        nsbs = None if nsbs is None else min(nt, nsbs)
        options, opts = self._inner_options(kwargs, with_delta)
        xs, is_tuple = as_tuple(inputs)
        xs = promote_integers(xs)  # x + noise makes integer inputs floats, as in Captum
        batch = check_inputs(xs, need_float=True, allow_nonfinite=opts.allow_nonfinite)
        sds = check_stdevs(stdevs, len(xs))
        ids = check_seed(seed, sample_ids, batch)
        device = xs[0].device
        xs = tuple(x.detach() for x in xs)
        target = normalize_target(kwargs.get("target"), batch, device)
        fargs = normalize_forward_args(kwargs.get("additional_forward_args"))
        has_baselines = "baselines" in kwargs
        baselines = kwargs.get("baselines")
        refs: tuple[Any, ...] | None = None
        if draw_baseline_from_distrib and has_baselines:
            if baselines is None:
                raise AttributionInputError("draw_baseline_from_distrib=True needs baselines= (a reference set to draw from)")
            refs = reference_rows(tuple(baselines) if isinstance(baselines, (tuple, list)) else (baselines,), xs)
        features = sum(x[0].numel() for x in xs)

        # ---- the copies, grouped; each group is one virtual batch for the wrapped method
        partition = nsbs or nt
        if ids is None:
            # Captum's partitions and draw order; a partition's engine work may be split into
            # groups, unless the wrapped method draws randomness of its own (GradientShap),
            # which must then see the whole partition to draw as Captum does.
            sizes = [partition] * (nt // partition) + ([nt % partition] if nt % partition else [])
            plan = [(k, [k] if self.attribution_method.draws_own_noise else group_sizes(k, batch, features, None)) for k in sizes]
        else:
            plan = [(g, [g]) for g in group_sizes(nt, batch, features, nsbs)]

        backend = opts.kernel_backend
        sum_g: list[torch.Tensor] = []
        sum_sq: list[torch.Tensor] = []
        first: BatchResult | None = None  # the first group's result: shapes, dtypes, names, structure
        deltas: list[torch.Tensor] = []
        draw_deltas: list[torch.Tensor] = []  # GradientShap's own per-draw deltas, (g, B, n_samples) per group
        f_noisy: list[torch.Tensor] = []
        f_base: list[torch.Tensor] = []
        steps: list[Any] = []
        shared_idx: list[torch.Tensor | None] | None = None  # Captum reuses one draw for all full partitions
        j0 = 0  # copies done
        for k, groups in plan:
            if ids is None:
                noisy, raw = self._draw_global(xs, sds, refs, k, batch, partition, shared_idx)
                if refs is not None and k == partition:
                    shared_idx = raw
                idx = None if raw is None else [None if t is None else copy_major(t, batch, k) for t in raw]
            else:
                noisy, idx = self._draw_seeded(xs, sds, refs, k, batch, ids, int(seed), j0)  # type: ignore[arg-type]
            drawn = None if refs is None or idx is None else draw_rows(refs, idx, device)
            r = 0
            for g in groups:
                rows = slice(r * batch, (r + g) * batch)  # copy-major: a group is a row slice
                vin = tuple(t[rows] for t in noisy)
                vbase = None if drawn is None else tuple(b[rows] if isinstance(b, torch.Tensor) else b for b in drawn)
                res = self._inner(vin, is_tuple, vbase, has_baselines, baselines, target, fargs, g, batch, options, opts, seed, ids, j0 + r)
                if first is None:
                    first = res
                    acc_dt = [torch.float64 if a.dtype == torch.float64 else torch.float32 for a in res.attributions]
                    sum_g = [torch.zeros(batch, a[0].numel(), dtype=dt, device=device) for a, dt in zip(res.attributions, acc_dt)]
                    sum_sq = [torch.zeros_like(s) for s in sum_g]
                for a, s1, s2 in zip(res.attributions, sum_g, sum_sq):
                    kernels.moments(s1, s2, a.reshape(g, batch, -1), backend=backend)
                if res.delta is not None:
                    deltas.append(res.delta.reshape(g, batch))
                    if res.copy_delta is not None and res.copy_delta.numel() != res.delta.numel():
                        draw_deltas.append(res.copy_delta.reshape(g, batch, -1))  # Captum returns every draw's delta
                if res.baseline_output is not None:
                    f_base.append(res.baseline_output.reshape(g, batch))
                if res.output is not None:
                    f_noisy.append(res.output.reshape(g, batch))
                steps.append(res.n_steps)
                r += g
            j0 += k
        assert first is not None

        # ---- smoothing, stats
        attrs_out, stats = [], []
        for s1, s2, a in zip(sum_g, sum_sq, first.attributions):
            mean = s1 / nt
            if nt_type == "smoothgrad":
                val = mean
            elif nt_type == "smoothgrad_sq":
                val = s2 / nt
            else:  # Captum's vargrad: E[a^2] - E[a]^2
                val = s2 / nt - mean * mean
            attr, st = kernels.finalize(val, out_dtype=a.dtype, backend=backend)
            attrs_out.append(attr.view(batch, *a.shape[1:]))
            stats.append(st)
        per_copy = torch.cat(deltas) if deltas else None
        out = self._clean_output(xs, target, fargs, opts.with_rows("internal_batch_size", kwargs.get("internal_batch_size"))) if with_output else None
        if out is not None:
            target = out[1]
        result = BatchResult(
            attributions=attrs_out,
            is_tuple=first.is_tuple,
            stats=combine_stats(stats),
            output=None if out is None else out[0],
            baseline_output=torch.cat(f_base).mean(0) if f_base else None,
            delta=None if per_copy is None else per_copy.mean(0),
            n_steps=_combine_steps(steps, batch),
            target=target,
            names=first.names,
            structure=first.structure,
            copy_delta=None if per_copy is None else captum_delta_order(torch.cat(draw_deltas) if draw_deltas else per_copy, partition),
        )
        if f_noisy and per_copy is not None:
            result.extras["noisy_output"] = torch.cat(f_noisy).mean(0)
        return result

    @staticmethod
    def _draw_global(
        xs: tuple[torch.Tensor, ...],
        sds: tuple[float, ...],
        refs: tuple[Any, ...] | None,
        k: int,
        batch: int,
        partition: int,
        shared_idx: list[torch.Tensor | None] | None,
    ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor | None] | None]:
        """Captum's draws for a partition of k copies from the global RNGs: noisy rows
        (copy-major) and, with a reference set, the drawn row indices (example-major, as drawn)."""
        idx = None
        if refs is not None and k == partition:  # full partitions: one draw, before any noise
            idx = shared_idx if shared_idx is not None else _np_indices(refs, k, batch)
        noise = [torch.randn((batch * k, *x.shape[1:]), device=x.device) * sd for x, sd in zip(xs, sds)]
        if refs is not None and k != partition:  # the remainder partition: noise first, then indices
            idx = _np_indices(refs, k, batch)
        noisy = tuple((x.unsqueeze(0) + n.view(batch, k, *x.shape[1:]).transpose(0, 1)).reshape(k * batch, *x.shape[1:]) for x, n in zip(xs, noise))
        return noisy, idx

    @staticmethod
    def _draw_seeded(
        xs: tuple[torch.Tensor, ...],
        sds: tuple[float, ...],
        refs: tuple[Any, ...] | None,
        k: int,
        batch: int,
        ids: list[int],
        seed: int,
        j0: int,
    ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor | None] | None]:
        """Copies j0 .. j0+k-1 from one generator per (sample id, copy), float32 on the CPU."""
        gen = torch.Generator()
        noise = [torch.zeros((k, batch, *x.shape[1:])) for x in xs]
        cols: list[list[int]] = [[] for _ in xs]
        for j in range(k):
            for b, sid in enumerate(ids):
                gen.manual_seed(stream_seed(seed, sid, j0 + j))
                if refs is not None:  # indices first, so they do not depend on the stdevs
                    for i, r in enumerate(refs):
                        if isinstance(r, torch.Tensor):
                            cols[i].append(int(torch.randint(r.shape[0], (1,), generator=gen)))
                for i, sd in enumerate(sds):
                    if sd > 0:
                        torch.randn(noise[i].shape[2:], generator=gen, out=noise[i][j, b]).mul_(sd)
        noisy = tuple((x.unsqueeze(0) + n.to(x.device)).reshape(k * batch, *x.shape[1:]) for x, n in zip(xs, noise))
        if refs is None:
            return noisy, None
        return noisy, [torch.tensor(c, dtype=torch.long) if isinstance(r, torch.Tensor) else None for c, r in zip(cols, refs)]

    def _inner(
        self,
        vin: tuple[torch.Tensor, ...],
        is_tuple: bool,
        vbase: tuple[Any, ...] | None,
        has_baselines: bool,
        baselines: Any,
        target: torch.Tensor | None,
        fargs: tuple,
        g: int,
        batch: int,
        options: dict[str, Any],
        opts: Options,
        seed: int | None,
        ids: list[int] | None,
        j0: int,
    ) -> BatchResult:
        method = self.attribution_method
        call: dict[str, Any] = dict(options)
        call["target"] = tile_target(target, g)
        call["additional_forward_args"] = tile_args(fargs, g, batch) if fargs else None
        call["options"] = dataclasses.replace(opts, forward_kwargs=tile_kwargs(opts.forward_kwargs, g, batch))
        if has_baselines:
            if vbase is not None:
                call["baselines"] = vbase
            elif isinstance(baselines, (tuple, list)):
                call["baselines"] = tuple(_tile_baseline(b, x, g, batch) for b, x in zip(baselines, vin))
            else:
                call["baselines"] = _tile_baseline(baselines, vin[0], g, batch)
        if self.attribution_method.draws_own_noise and ids is not None:
            # GradientShap's own draws per (sample, copy), from a stream derived from the seed
            call["seed"] = stream_seed(int(seed), 0x5348)  # type: ignore[arg-type]
            call["sample_ids"] = torch.tensor([stream_seed(i, j0 + j) >> 2 for j in range(g) for i in ids], dtype=torch.long)
        return method.attribute_batch(vin if is_tuple else vin[0], **call)

    def _clean_output(self, xs: tuple[torch.Tensor, ...], target: torch.Tensor | None, fargs: tuple, opts: Options) -> tuple[torch.Tensor, torch.Tensor | None]:
        """F(x) at the clean input, fp32, in forwards of at most the row cap."""
        problem = Problem(xs, None, target, fargs, forward_kwargs=opts.kwargs)
        with frozen_parameters(self.forward_func):
            (out,) = opts.engine(self.forward_func, "fp32").outputs(problem, [xs])
        return out, problem.target


def _tile_baseline(b: Any, x: torch.Tensor, copies: int, batch: int) -> Any:
    """Captum's rule: a per-example baseline (B, ...) follows its example's copies; others pass as given."""
    if isinstance(b, torch.Tensor) and b.dim() == x.dim() and b.shape[0] == batch and batch > 1:
        return tile(b, copies, batch)
    return b


def _np_indices(refs: tuple[Any, ...], k: int, batch: int) -> list[torch.Tensor | None]:
    """Captum's baseline draws: np.random.choice(N, k * B) per reference tensor, example-major rows."""
    return [torch.as_tensor(np.random.choice(r.shape[0], k * batch), dtype=torch.long) if isinstance(r, torch.Tensor) else None for r in refs]


def _combine_steps(steps: list[Any], batch: int) -> int | torch.Tensor:
    """Steps per sample: an int when every group used one count, else (B,) max over the copies."""
    if all(isinstance(s, int) for s in steps) and len(set(steps)) == 1:
        return steps[0]
    per = [torch.as_tensor(s).reshape(-1) for s in steps]
    return torch.stack([p.reshape(-1, batch).amax(0) if p.numel() > 1 else p.expand(batch) for p in per]).amax(0)

