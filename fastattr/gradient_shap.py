"""GradientShap (expected gradients): gradients at random points between inputs and
baselines drawn from a reference distribution, Captum 0.9's signature and meaning::

    GradientShap(forward_func, multiply_by_inputs=True).attribute(
        inputs, baselines, n_samples=5, stdevs=0.0, target=None, additional_forward_args=None,
        return_convergence_delta=False, *, seed=None, n_samples_batch_size=None, **options)
        -> attributions, or (attributions, delta) with return_convergence_delta=True

    GradientShap(...).attribute_batch(
        inputs, baselines, n_samples=5, stdevs=0.0, target=None, additional_forward_args=None,
        with_delta=True, *, seed=None, sample_ids=None, with_output=True, n_samples_batch_size=None,
        internal_batch_size=None, **options) -> BatchResult

``options``: fastattr's keyword options (fastattr/options.py: precision, max_rows, ...);
``internal_batch_size`` is another name for ``max_rows``.

Meaning (as Captum): for each example, ``n_samples`` copies; copy j draws a baseline row
x0_j uniformly from the reference set (independently per input, as Captum does), adds
N(0, stdev^2) noise to the input (x_j = x + noise), draws alpha_j ~ U(0, 1), and takes the
gradient g_j at alpha_j x_j + (1 - alpha_j) x0_j. The attribution is mean_j (x_j - x0_j) g_j
(mean_j g_j with multiply_by_inputs=False); a copy's delta is sum(attr_j) - (F(x_j) - F(x0_j)).
``attribute``'s delta is Captum's: one per copy, example-major ((B * n_samples,)).

``baselines``: a (N, *features) tensor of reference samples per input (a tuple for several
inputs; a number is a constant baseline), a callable returning them (called with the
inputs when it takes an argument, as Captum), or, for dataset runs, a
``fastattr.sources.Source`` (or any object with ``__len__`` and ``read(start, stop)``
returning (inputs tuple, labels)), of which only the drawn rows are read.

Batching: the copies are a virtual batch of (copies x examples) rows, copy-major, grouped
(``n_samples_batch_size`` copies, or as many as fit ``noise_tunnel.GROUP_ELEMENTS``), and
each group's gradient pass goes through the engine, so no forward exceeds the row cap
(``max_rows`` / ``internal_batch_size``, or the tuned budget) whatever n_samples and B
are (Captum expands all copies at once and runs out of memory, its issue #1350). Means
are accumulated with ``fastattr.kernels.moments``; the second moment gives
``extras["sem"]``, the per-sample Monte Carlo standard error of the attribution (L2 over
features of the per-feature standard error of the mean).

Random draws as in ``fastattr.noise_tunnel``: with ``seed=None`` numpy's and torch's
global RNGs in Captum's order (baseline indices, noise per input, alphas), so seeding
both before each call gives fastattr and Captum the same draws; with ``seed=int`` one
generator per (seed, global sample index, copy) on the CPU (alpha, then indices, then
noise), independent of batching and device. ``sample_ids`` gives the global indices.

BatchResult: ``output`` F(x) at the clean input; ``baseline_output``, ``delta`` and
``extras["noisy_output"]`` are means over the copies of F(x0_j), delta_j and F(x_j);
``n_steps`` is n_samples (gradient evaluations per sample).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import kernels
from ._copies import (
    check_seed,
    check_stdevs,
    copy_major,
    group_sizes,
    reference_rows,
    stream_seed,
    tile_args,
    tile_kwargs,
    tile_target,
)
from .attribution import BatchResult, GradientAttribution, combine_stats
from .engine import Layout, Problem, frozen_parameters
from .inputs import (
    AttributionInputError,
    TensorOrTuple,
    as_tuple,
    check_inputs,
    normalize_forward_args,
    normalize_target,
    promote_integers,
)
from .options import OptionsDict, Unpack, optional_positive_int, positive_int

logger = logging.getLogger(__name__)


class _SourceReference:
    """A reference set read lazily from a data source: only drawn rows are read."""

    def __init__(self, source: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        self.source = source
        self.n = len(source)
        if self.n == 0:
            raise AttributionInputError("the reference data source is empty: GradientShap needs at least one baseline sample")
        first, _ = source.read(0, 1)
        if len(first) != len(inputs):
            raise AttributionInputError(f"the reference source yields {len(first)} inputs per sample; the model takes {len(inputs)}")
        for i, (r, x) in enumerate(zip(first, inputs)):
            if tuple(r.shape[1:]) != tuple(x.shape[1:]):
                raise AttributionInputError(f"reference input {i} has shape {tuple(r.shape[1:])}; input {i} has {tuple(x.shape[1:])}")

    def rows(self, i: int, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        uniq, inverse = torch.unique(idx, return_inverse=True)
        got = torch.cat([self.source.read(int(u), int(u) + 1)[0][i] for u in uniq])
        return got.index_select(0, inverse).to(device)


class GradientShap(GradientAttribution):
    """Expected gradients / GradientSHAP (see the module docstring)."""

    has_delta = True
    draws_own_noise = True  # NoiseTunnel hands it whole noise partitions (its draws follow Captum's order)
    baselines_per_sample = False  # baselines are a reference distribution: a precision probe keeps them whole

    def __init__(self, forward_func: Callable[..., Any], multiply_by_inputs: bool = True) -> None:
        super().__init__(forward_func)
        self._multiply_by_inputs = multiply_by_inputs

    def attribute_batch(
        self,
        inputs: TensorOrTuple,
        baselines: Any,
        n_samples: int = 5,
        stdevs: float | tuple[float, ...] = 0.0,
        target: Any = None,
        additional_forward_args: Any = None,
        with_delta: bool = True,
        *,
        seed: int | None = None,
        sample_ids: torch.Tensor | None = None,
        with_output: bool = True,
        n_samples_batch_size: int | None = None,
        internal_batch_size: int | None = None,
        **options: Unpack[OptionsDict],
    ) -> BatchResult:
        """attribute() with what a dataset run stores (see the module docstring); ``copy_delta``
        holds Captum's delta, one per copy, example-major ((B * n_samples,))."""
        # ---- validation, before any model work
        opts = self._options(options).with_rows("internal_batch_size", internal_batch_size)
        n = positive_int("n_samples", n_samples)
        group = optional_positive_int("n_samples_batch_size", n_samples_batch_size)
        xs, is_tuple = as_tuple(inputs)
        xs = promote_integers(xs)  # noise and interpolation make integer inputs floats, as in Captum
        batch = check_inputs(xs, need_float=True, allow_nonfinite=opts.allow_nonfinite)
        xs = tuple(x.detach() for x in xs)
        sds = check_stdevs(stdevs, len(xs))
        ids = check_seed(seed, sample_ids, batch)
        refs = self._references(baselines, inputs, xs)
        engine = opts.engine(self.forward_func)
        fp32 = opts.engine(self.forward_func, "fp32")
        device = xs[0].device
        tgt = normalize_target(target, batch, device)
        fargs = normalize_forward_args(additional_forward_args)
        layout: bool | None = None  # settled on the first group
        features = sum(x[0].numel() for x in xs)
        kernel_backend = opts.kernel_backend

        if ids is None:  # Captum's draws, all copies at once and in its order (see module docstring)
            idx_all = [None if _count(r) is None else torch.as_tensor(np.random.choice(_count(r), n * batch), dtype=torch.long) for r in refs]
            noise_all = [torch.randn((batch * n, *x.shape[1:]), device=device) * sd for x, sd in zip(xs, sds)]
            alpha_all = torch.tensor(np.random.uniform(0.0, 1.0, batch * n), device=device, dtype=xs[0].dtype)
            idx_all = [None if t is None else copy_major(t, batch, n) for t in idx_all]
            noise_all = [copy_major(t, batch, n) for t in noise_all]
            alpha_all = copy_major(alpha_all, batch, n)

        sum_g: list[torch.Tensor] = []
        sum_sq: list[torch.Tensor] = []
        deltas, f_x, f_x0 = [], [], []
        j0 = 0
        with frozen_parameters(self.forward_func):
            for g in group_sizes(n, batch, features, group):
                rows = slice(j0 * batch, (j0 + g) * batch)
                if ids is None:
                    idx = [None if t is None else t[rows] for t in idx_all]
                    noise = [t[rows] for t in noise_all]
                    alpha = alpha_all[rows]
                else:
                    idx, noise, alpha = self._draw_seeded(xs, sds, refs, g, ids, int(seed), j0)  # type: ignore[arg-type]
                    noise = [t.to(device) for t in noise]
                    alpha = alpha.to(device=device, dtype=xs[0].dtype)
                xn = tuple(x.unsqueeze(0).expand(g, *x.shape).reshape(g * batch, *x.shape[1:]) + nz for x, nz in zip(xs, noise))
                x0 = tuple(self._baseline_rows(r, ix, x, device) for r, ix, x in zip(refs, idx, xn))
                # Captum's point: alpha * input + (1 - alpha) * baseline, in the input's dtype
                points = tuple(
                    alpha.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * x + (1.0 - alpha.to(x.dtype)).view(-1, *([1] * (x.dim() - 1))) * b
                    for x, b in zip(xn, x0)
                )
                problem = Problem(points, None, tile_target(tgt, g), tile_args(fargs, g, batch), forward_kwargs=tile_kwargs(opts.kwargs, g, batch))
                problem = engine.settle_layout(problem, opts.channels_last if layout is None else layout)
                accs = engine.integrate(problem, [1.0], [1.0])
                layout = problem.channels_last  # as the first pass settled it
                tgt = problem.target[:batch] if problem.target is not None else None  # validated (negatives wrapped)
                attrs, stats = [], []
                for acc, x, b, lay in zip(accs, xn, x0, problem.layouts):
                    if self._multiply_by_inputs:
                        a, st = kernels.finalize(acc, lay.flat(x).contiguous(), lay.flat(b).contiguous(), out_dtype=x.dtype, backend=kernel_backend)
                    else:
                        a, st = kernels.finalize(acc, out_dtype=x.dtype, backend=kernel_backend)
                    attrs.append(a)
                    stats.append(st)
                if not sum_g:
                    sum_g = [torch.zeros(batch, a.shape[1], dtype=torch.float64 if a.dtype == torch.float64 else torch.float32, device=device) for a in attrs]
                    sum_sq = [torch.zeros_like(s) for s in sum_g]
                for a, s1, s2 in zip(attrs, sum_g, sum_sq):
                    kernels.moments(s1, s2, a.view(g, batch, -1), backend=kernel_backend)
                if with_delta:
                    out_x, out_x0 = fp32.outputs(problem, [xn, x0])
                    problem.target_checked = True
                    if attrs[0].dtype == torch.float64:
                        sums = sum(a.sum(1) for a in attrs)
                    else:
                        sums = combine_stats(stats).sum
                    deltas.append((sums - (out_x - out_x0)).view(g, batch))
                    f_x.append(out_x.view(g, batch))
                    f_x0.append(out_x0.view(g, batch))
                j0 += g
            clean = None
            if with_output:
                clean_problem = Problem(xs, None, tgt, fargs, forward_kwargs=opts.kwargs)
                (clean,) = fp32.outputs(clean_problem, [xs])
                tgt = clean_problem.target

        attrs_out, stats_out, var_total = [], [], 0.0
        for s1, s2, x in zip(sum_g, sum_sq, xs):
            lay = Layout(x.shape, bool(layout))
            mean = s1 / n
            var_total = var_total + (s2 / n - mean * mean).clamp_min(0).sum(1)
            a, st = kernels.finalize(mean, out_dtype=x.dtype, backend=kernel_backend)
            attrs_out.append(lay.user(a))
            stats_out.append(st)
        per_copy = torch.cat(deltas) if deltas else None
        result = BatchResult(
            attributions=attrs_out,
            is_tuple=is_tuple,
            stats=combine_stats(stats_out),
            output=clean,
            baseline_output=torch.cat(f_x0).mean(0) if f_x0 else None,
            delta=None if per_copy is None else per_copy.mean(0),
            n_steps=n,
            target=tgt,
            copy_delta=None if per_copy is None else per_copy.t().reshape(-1),  # Captum: example-major
        )
        if f_x:
            result.extras["noisy_output"] = torch.cat(f_x).mean(0)
        if n > 1:
            # sample variance (n - 1) of the copies, over n: the standard error of the mean
            result.extras["sem"] = (var_total * (n / (n - 1)) / n).sqrt().float()  # type: ignore[union-attr]
        return result

    def _references(self, baselines: Any, inputs: TensorOrTuple, xs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """The reference set per input: a (N, *f) tensor, a number, or a lazy source reader."""
        if baselines is None:
            raise AttributionInputError("GradientShap needs baselines: a tensor of reference samples (N, *features) per input")
        if hasattr(baselines, "read") and hasattr(baselines, "__len__") and not isinstance(baselines, torch.Tensor):
            src = _SourceReference(baselines, xs)
            return tuple((src, i) for i in range(len(xs)))
        if callable(baselines) and not isinstance(baselines, torch.Tensor):
            baselines = baselines() if len(inspect.signature(baselines).parameters) == 0 else baselines(inputs)
        per_input = tuple(baselines) if isinstance(baselines, (tuple, list)) else (baselines,)
        return reference_rows(per_input, xs)

    @staticmethod
    def _baseline_rows(ref: Any, idx: torch.Tensor | None, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        if isinstance(ref, tuple):  # (source reader, input index)
            return ref[0].rows(ref[1], idx, device).to(x.dtype)
        if isinstance(ref, torch.Tensor):
            return ref.index_select(0, idx.to(ref.device)).to(device=device, dtype=x.dtype)  # type: ignore[union-attr]
        return torch.full((), float(ref), dtype=x.dtype, device=device).expand_as(x)

    @staticmethod
    def _draw_seeded(
        xs: tuple[torch.Tensor, ...], sds: tuple[float, ...], refs: tuple[Any, ...], g: int, ids: list[int], seed: int, j0: int
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor], torch.Tensor]:
        """Copies j0 .. j0+g-1 (copy-major rows): one generator per (seed, sample id, copy)."""
        batch = len(ids)
        gen = torch.Generator()
        alpha = torch.empty(g * batch, dtype=torch.float64)
        cols: list[list[int]] = [[] for _ in refs]
        noise = [torch.zeros((g * batch, *x.shape[1:])) for x in xs]
        for j in range(g):
            for b, sid in enumerate(ids):
                r = j * batch + b
                gen.manual_seed(stream_seed(seed, sid, j0 + j))
                alpha[r] = float(torch.rand((), generator=gen, dtype=torch.float64))
                for i, ref in enumerate(refs):
                    if _count(ref) is not None:
                        cols[i].append(int(torch.randint(_count(ref), (1,), generator=gen)))  # type: ignore[arg-type]
                for i, sd in enumerate(sds):
                    if sd > 0:
                        torch.randn(noise[i].shape[1:], generator=gen, out=noise[i][r]).mul_(sd)
        idx = [torch.tensor(c, dtype=torch.long) if _count(ref) is not None else None for c, ref in zip(cols, refs)]
        return idx, noise, alpha


def _count(ref: Any) -> int | None:
    """Rows in a reference (None for a constant baseline)."""
    if isinstance(ref, torch.Tensor):
        return ref.shape[0]
    if isinstance(ref, tuple):
        return ref[0].n
    return None
