"""NoiseTunnel: SmoothGrad, SmoothGrad-squared and VarGrad over fastattr's methods.

Captum 0.9's signature and meaning; wraps ``Saliency``, ``InputXGradient``,
``IntegratedGradients`` and ``GradientShap``::

    NoiseTunnel(method).attribute(
        inputs, nt_type="smoothgrad", nt_samples=5, nt_samples_batch_size=None, stdevs=1.0,
        draw_baseline_from_distrib=False, *, seed=None, **kwargs)
        -> attributions, or (attributions, delta) with return_convergence_delta=True

    NoiseTunnel(method).attribute_batch(
        inputs, nt_type="smoothgrad", nt_samples=5, nt_samples_batch_size=None, stdevs=1.0,
        draw_baseline_from_distrib=False, *, seed=None, sample_ids=None, with_output=True,
        **kwargs) -> BatchResult

``kwargs`` go to the wrapped method: baselines, target, additional_forward_args, n_steps,
method, internal_batch_size, return_convergence_delta, abs, and fastattr's keyword
extras (precision, memory_budget, max_rows, allow_nonfinite, kernel_backend, channels_last).

Meaning (as Captum): each example gets ``nt_samples`` noisy copies x + N(0, stdev^2) (one
stdev per input); the wrapped method attributes each copy as if it were the input (so
multiply_by_inputs multiplies by the *noisy* input minus the baseline); smoothgrad is the
mean of the copies' attributions, smoothgrad_sq the mean of their squares, vargrad
E[a^2] - E[a]^2. With ``draw_baseline_from_distrib`` each copy gets a baseline drawn
uniformly from the rows of ``baselines`` (a reference set).

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
delta is Captum's: one entry per copy, partition by partition, example-major.)
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch

from . import kernels
from .engine import Engine, Problem, frozen_parameters
from .inputs import (
    AttributionInputError,
    TensorOrTuple,
    as_tuple,
    check_inputs,
    normalize_forward_args,
    normalize_target,
)
from .methods import BatchResult, InputXGradient, IntegratedGradients, Saliency, combine_stats
from .precision import get_precision

logger = logging.getLogger(__name__)

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")
GROUP_ELEMENTS = 2**23  # input elements per group of noisy copies (32 MiB in fp32 per copy held)
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------- shared helpers


def check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise AttributionInputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_stdevs(stdevs: Any, n_inputs: int) -> tuple[float, ...]:
    """One finite, non-negative stdev per input (a number is shared by all inputs)."""
    if isinstance(stdevs, (tuple, list)):
        if len(stdevs) != n_inputs:
            raise AttributionInputError(f"got {len(stdevs)} stdevs for {n_inputs} inputs; pass one number or one per input")
        values = tuple(stdevs)
    else:
        values = (stdevs,) * n_inputs
    for i, s in enumerate(values):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s) or s < 0:
            raise AttributionInputError(f"stdev {i} must be a finite number >= 0, got {s!r}")
    return tuple(float(s) for s in values)


def check_seed(seed: Any, sample_ids: Any, batch: int) -> list[int] | None:
    """Validated global sample indices for the seeded stream (None without a seed)."""
    if seed is None:
        if sample_ids is not None:
            raise AttributionInputError("sample_ids only apply with seed=; pass a seed to draw noise per sample")
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise AttributionInputError(f"seed must be an int, got {type(seed).__name__}")
    if sample_ids is None:
        return list(range(batch))
    ids = torch.as_tensor(sample_ids)
    if ids.is_floating_point() or ids.dim() != 1 or ids.shape[0] != batch:
        raise AttributionInputError(f"sample_ids must be a 1-D integer tensor of {batch} global indices, got shape {tuple(ids.shape)} dtype {ids.dtype}")
    return [int(v) for v in ids.tolist()]


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit generator seed from integer keys (seed, sample, copy, ...): a counter hash,
    so each (sample, copy) stream is independent of how samples are batched."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def group_sizes(total: int, batch: int, features: int, fixed: int | None) -> list[int]:
    """Copies per group: ``fixed`` when given, else as many as fit GROUP_ELEMENTS (>= 1)."""
    size = fixed if fixed is not None else max(1, GROUP_ELEMENTS // max(1, batch * features))
    size = min(size, total)
    return [size] * (total // size) + ([total % size] if total % size else [])


def tile(t: torch.Tensor, copies: int, batch: int) -> torch.Tensor:
    """(B, ...) -> (copies * B, ...) copy-major; other shapes pass through (broadcast / distributions)."""
    if t.dim() == 0 or t.shape[0] != batch or copies == 1:
        return t
    return t.unsqueeze(0).expand(copies, *t.shape).reshape(copies * batch, *t.shape[1:])


def tile_args(args: tuple, copies: int, batch: int) -> tuple:
    return tuple(tile(a, copies, batch) if isinstance(a, torch.Tensor) else a for a in args)


def tile_target(target: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    return None if target is None else target.repeat(copies, 1)


def copy_major(t: torch.Tensor, batch: int, copies: int) -> torch.Tensor:
    """Rows in Captum's example-major order (b * k + j) -> copy-major (j * B + b)."""
    return t.reshape(batch, copies, *t.shape[1:]).transpose(0, 1).reshape(batch * copies, *t.shape[1:])


def captum_delta_order(per_copy: torch.Tensor, partition: int) -> torch.Tensor:
    """(copies, B) deltas -> Captum NoiseTunnel's layout: partitions of ``partition`` copies
    concatenated, each example-major (b * k + j)."""
    parts = per_copy.split(partition, dim=0)
    return torch.cat([p.t().reshape(-1) for p in parts])


def reference_rows(baselines: tuple[Any, ...], inputs: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
    """Validate a reference set (one (N, *features) tensor per input, or a number)."""
    if len(baselines) != len(inputs):
        raise AttributionInputError(f"got {len(baselines)} baseline distributions for {len(inputs)} inputs")
    out: list[Any] = []
    for i, (b, x) in enumerate(zip(baselines, inputs)):
        if isinstance(b, (int, float)) and not isinstance(b, bool):
            out.append(float(b))
            continue
        if not isinstance(b, torch.Tensor):
            raise AttributionInputError(f"baseline distribution {i} must be a tensor or a number, got {type(b).__name__}")
        if b.dim() == x.dim() - 1 and b.shape == x.shape[1:]:
            b = b.unsqueeze(0)
        if b.shape[1:] != x.shape[1:]:
            raise AttributionInputError(f"baseline distribution {i} has shape {tuple(b.shape)}; its rows must have input {i}'s shape {tuple(x.shape[1:])}")
        if b.shape[0] == 0:
            raise AttributionInputError(f"baseline distribution {i} is empty: the reference set needs at least one sample")
        out.append(b.detach())
    return tuple(out)


def draw_rows(refs: tuple[Any, ...], idx: list[torch.Tensor | None], device: torch.device) -> tuple[Any, ...]:
    """Gather drawn reference rows per input (numbers stay numbers)."""
    return tuple(r.index_select(0, ix.to(r.device)).to(device) if isinstance(r, torch.Tensor) and ix is not None else r for r, ix in zip(refs, idx))


# ----------------------------------------------------------------------------- NoiseTunnel


class NoiseTunnel:
    """SmoothGrad / SmoothGrad^2 / VarGrad over a fastattr attribution method (see module docstring)."""

    def __init__(self, attribution_method: Any) -> None:
        from .gradient_shap import GradientShap  # the two modules refer to each other

        if not isinstance(attribution_method, (Saliency, InputXGradient, IntegratedGradients, GradientShap)):
            raise TypeError(
                f"NoiseTunnel wraps fastattr's Saliency, InputXGradient, IntegratedGradients or GradientShap; got {type(attribution_method).__name__}"
            )
        self.attribution_method = attribution_method
        self.forward_func = attribution_method.forward_func
        self.is_delta_supported = attribution_method.has_convergence_delta()
        self._multiply_by_inputs = getattr(attribution_method, "multiplies_by_inputs", False)
        self._is_shap = isinstance(attribution_method, GradientShap)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return self.is_delta_supported

    def attribute(
        self,
        inputs: TensorOrTuple,
        nt_type: str = "smoothgrad",
        nt_samples: int = 5,
        nt_samples_batch_size: int | None = None,
        stdevs: float | tuple[float, ...] = 1.0,
        draw_baseline_from_distrib: bool = False,
        *,
        seed: int | None = None,
        **kwargs: Any,
    ) -> TensorOrTuple | tuple[TensorOrTuple, torch.Tensor]:
        want_delta = bool(kwargs.pop("return_convergence_delta", False))
        res, per_copy = self._run(
            inputs, nt_type, nt_samples, nt_samples_batch_size, stdevs, draw_baseline_from_distrib, kwargs,
            seed=seed, sample_ids=None, with_output=False, with_delta=want_delta,
        )  # fmt: skip
        attrs = tuple(res.attributions) if res.is_tuple else res.attributions[0]
        if want_delta and self.is_delta_supported:
            partition = min(nt_samples, nt_samples_batch_size or nt_samples)
            return attrs, captum_delta_order(per_copy, partition)
        return attrs

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
        **kwargs: Any,
    ) -> BatchResult:
        """attribute() with what a dataset run stores (see the module docstring)."""
        want_delta = bool(kwargs.pop("return_convergence_delta", self.is_delta_supported))
        res, _ = self._run(
            inputs, nt_type, nt_samples, nt_samples_batch_size, stdevs, draw_baseline_from_distrib, kwargs,
            seed=seed, sample_ids=sample_ids, with_output=with_output, with_delta=want_delta,
        )  # fmt: skip
        return res

    # ------------------------------------------------------------------ internals
    def _inner_options(self, kwargs: dict[str, Any], with_delta: bool) -> dict[str, Any]:
        """kwargs for the wrapped method's attribute_batch, checked against its signature."""
        method = self.attribution_method
        params = inspect.signature(method.attribute_batch).parameters
        names = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):  # Saliency / InputXGradient forward **options
            names |= set(inspect.signature(method._gradient_batch).parameters) - {"self", "absolute", "multiply_by_inputs"}
        managed = {"inputs", "baselines", "target", "additional_forward_args", "with_output", "with_delta", "seed", "sample_ids"}
        unknown = sorted(set(kwargs) - (names - managed) - {"baselines", "target", "additional_forward_args"})
        if unknown:
            raise TypeError(f"{type(method).__name__} does not take {', '.join(map(repr, unknown))} (passed through NoiseTunnel)")
        if "baselines" in kwargs and "baselines" not in names:
            raise TypeError(f"{type(method).__name__} takes no baselines")
        if with_delta and not self.is_delta_supported:
            raise AttributionInputError(f"{type(method).__name__} has no convergence delta; drop return_convergence_delta")
        options = {k: v for k, v in kwargs.items() if k not in ("baselines", "target", "additional_forward_args")}
        if "with_delta" in names:
            options["with_delta"] = with_delta
        if "with_output" in names:
            options["with_output"] = False  # F at the noisy copies is not needed; F(x) is taken once at the clean input
        return options

    def _run(
        self,
        inputs: TensorOrTuple,
        nt_type: str,
        nt_samples: int,
        nt_samples_batch_size: int | None,
        stdevs: Any,
        draw_baseline_from_distrib: bool,
        kwargs: dict[str, Any],
        *,
        seed: int | None,
        sample_ids: Any,
        with_output: bool,
        with_delta: bool,
    ) -> tuple[BatchResult, torch.Tensor | None]:
        # ---- validation, before any model work
        if nt_type not in NT_TYPES:
            raise AttributionInputError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}")
        nt = check_count("nt_samples", nt_samples)
        nsbs = None if nt_samples_batch_size is None else min(nt, check_count("nt_samples_batch_size", nt_samples_batch_size))
        xs, is_tuple = as_tuple(inputs)
        batch = check_inputs(xs, need_float=True, allow_nonfinite=bool(kwargs.get("allow_nonfinite", False)))
        sds = check_stdevs(stdevs, len(xs))
        ids = check_seed(seed, sample_ids, batch)
        options = self._inner_options(kwargs, with_delta)
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
            plan = [(k, [k] if self._is_shap else group_sizes(k, batch, features, None)) for k in sizes]
        else:
            plan = [(g, [g]) for g in group_sizes(nt, batch, features, nsbs)]

        backend = kwargs.get("kernel_backend")
        sum_g: list[torch.Tensor] = []
        sum_sq: list[torch.Tensor] = []
        out_dtypes: list[torch.dtype] = []
        deltas: list[torch.Tensor] = []
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
                res = self._inner(vin, vbase, has_baselines, baselines, target, fargs, g, batch, options, seed, ids, j0 + r)
                if not sum_g:
                    out_dtypes = [a.dtype for a in res.attributions]
                    acc_dt = [torch.float64 if dt == torch.float64 else torch.float32 for dt in out_dtypes]
                    sum_g = [torch.zeros(batch, a[0].numel(), dtype=dt, device=device) for a, dt in zip(res.attributions, acc_dt)]
                    sum_sq = [torch.zeros_like(s) for s in sum_g]
                for a, s1, s2 in zip(res.attributions, sum_g, sum_sq):
                    kernels.moments(s1, s2, a.reshape(g, batch, -1), backend=backend)
                if res.delta is not None:
                    deltas.append(res.delta.reshape(g, batch))
                if res.baseline_output is not None:
                    f_base.append(res.baseline_output.reshape(g, batch))
                if res.output is not None:
                    f_noisy.append(res.output.reshape(g, batch))
                steps.append(res.n_steps)
                r += g
            j0 += k

        # ---- smoothing, stats
        attrs_out, stats = [], []
        for s1, s2, x, dt in zip(sum_g, sum_sq, xs, out_dtypes):
            mean = s1 / nt
            if nt_type == "smoothgrad":
                val = mean
            elif nt_type == "smoothgrad_sq":
                val = s2 / nt
            else:  # Captum's vargrad: E[a^2] - E[a]^2
                val = s2 / nt - mean * mean
            attr, st = kernels.finalize(val, out_dtype=dt, backend=backend)
            attrs_out.append(attr.view(x.shape))
            stats.append(st)
        per_copy = torch.cat(deltas) if deltas else None
        out = self._clean_output(xs, target, fargs, kwargs) if with_output else None
        if out is not None:
            target = out[1]
        result = BatchResult(
            attributions=attrs_out,
            is_tuple=is_tuple,
            stats=combine_stats(stats),
            output=None if out is None else out[0],
            baseline_output=torch.cat(f_base).mean(0) if f_base else None,
            delta=None if per_copy is None else per_copy.mean(0),
            n_steps=_combine_steps(steps, batch),
            target=target,
        )
        if f_noisy and per_copy is not None:
            result.extras["noisy_output"] = torch.cat(f_noisy).mean(0)
        return result, per_copy

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
        vbase: tuple[Any, ...] | None,
        has_baselines: bool,
        baselines: Any,
        target: torch.Tensor | None,
        fargs: tuple,
        g: int,
        batch: int,
        options: dict[str, Any],
        seed: int | None,
        ids: list[int] | None,
        j0: int,
    ) -> BatchResult:
        method = self.attribution_method
        call: dict[str, Any] = dict(options)
        call["target"] = tile_target(target, g)
        call["additional_forward_args"] = tile_args(fargs, g, batch) if fargs else None
        if has_baselines:
            if vbase is not None:
                call["baselines"] = vbase
            elif isinstance(baselines, (tuple, list)):
                call["baselines"] = tuple(_tile_baseline(b, x, g, batch) for b, x in zip(baselines, vin))
            else:
                call["baselines"] = _tile_baseline(baselines, vin[0], g, batch)
        if self._is_shap and ids is not None:
            # GradientShap's own draws per (sample, copy), from a stream derived from the seed
            call["seed"] = stream_seed(int(seed), 0x5348)  # type: ignore[arg-type]
            call["sample_ids"] = torch.tensor([stream_seed(i, j0 + j) >> 2 for j in range(g) for i in ids], dtype=torch.long)
        return method.attribute_batch(vin, **call)

    def _clean_output(self, xs: tuple[torch.Tensor, ...], target: torch.Tensor | None, fargs: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """F(x) at the clean input, fp32, in forwards of at most the row cap."""
        cap = kwargs.get("internal_batch_size") or kwargs.get("max_rows")
        engine = Engine(self.forward_func, get_precision("fp32"), max_rows=cap)
        problem = Problem(xs, None, target, fargs, channels_last=False)
        with frozen_parameters(self.forward_func):
            (out,) = engine.outputs(problem, [xs])
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

