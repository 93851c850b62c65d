"""NoiseTunnel over an attribution object fastattr does not batch: Captum 0.9's algorithm.

For any Captum-style object (``.attribute``, ``.forward_func``, ``has_convergence_delta()``,
``multiplies_by_inputs``): Captum's DeepLift, GuidedBackprop, FeatureAblation, ..., or
fastattr's LayerActivation. The steps and their order follow captum/attr/_core/noise_tunnel.py,
so with the same global RNG state the draws and the results are Captum's:

- everything runs under ``torch.no_grad()`` (gradient methods enable grad themselves);
- ``nt_samples_batch_size`` (default nt_samples) copies per partition; per partition the noise
  is ``torch.normal(0, stdev)`` of shape (B * k, ...) per input, added to the input repeated
  example-major (``repeat_interleave``); noisy inputs require grad for gradient methods;
- ``additional_forward_args`` tensors, ``target`` (a list or a tensor with more than one
  element), ``feature_mask`` (tensors with more than one row) and per-example ``baselines``
  are expanded example-major; with ``draw_baseline_from_distrib`` baselines are rows drawn by
  ``np.random.choice(N, k * B)`` once for the full partitions, again for the remainder;
- the wrapped method's ``attribute`` runs once per partition; smoothgrad is the mean of the
  attributions, smoothgrad_sq the mean of their squares, vargrad E[a^2] - E[a]^2; the delta is
  the partitions' deltas concatenated.

The BatchResult carries the smoothed attributions with per-sample stats, the per-copy delta as
``copy_delta`` and its per-example mean as ``delta`` (where the wrapped method returns one delta
per copy); F(x) is not computed (``output`` None).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import kernels
from ._copies import check_stdevs
from .attribution import BatchResult, combine_stats
from .errors import AttributionInputError

if TYPE_CHECKING:
    from .noise_tunnel import NoiseTunnel

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def generic_noise_tunnel(
    nt: NoiseTunnel,
    inputs: Any,
    nt_type: str,
    nt_samples: int,
    nt_samples_batch_size: int | None,
    stdevs: Any,
    draw_baseline_from_distrib: bool,
    kwargs: dict[str, Any],
    want_delta: bool,
) -> BatchResult:
    """Captum's NoiseTunnel.attribute over ``nt.attribution_method`` (see the module docstring)."""
    is_inputs_tuple = isinstance(inputs, tuple)
    xs = inputs if is_inputs_tuple else (inputs,)
    if not xs or not all(isinstance(x, torch.Tensor) for x in xs):
        raise AttributionInputError(f"inputs must be a tensor or a non-empty tuple of tensors, got {type(inputs).__name__}")
    sds = check_stdevs(stdevs, len(xs))
    kwargs = dict(kwargs)
    if want_delta:
        kwargs["return_convergence_delta"] = True
    delta_on = want_delta and nt.is_delta_supported
    with torch.no_grad():
        k = nt_samples if nt_samples_batch_size is None else min(nt_samples, nt_samples_batch_size)
        partitions = nt_samples // k
        kwargs_copy = dict(kwargs)
        _expand_partial(k, kwargs_copy, xs, draw_baseline_from_distrib)
        sums: list[torch.Tensor] = []
        sqs: list[torch.Tensor] = []
        deltas: list[Any] = []
        shape = (is_inputs_tuple, False)
        for _ in range(partitions):
            noisy = _add_noise(xs, sds, k, nt.is_gradient_method)
            shape = _partial(nt, noisy, kwargs_copy, is_inputs_tuple, delta_on, k, sums, sqs, deltas)
        rest = nt_samples - partitions * k
        if rest > 0:
            noisy = _add_noise(xs, sds, rest, nt.is_gradient_method)
            _expand_partial(rest, kwargs, xs, draw_baseline_from_distrib)
            shape = _partial(nt, noisy, kwargs, is_inputs_tuple, delta_on, rest, sums, sqs, deltas)
        mean = [s / nt_samples for s in sums]
        mean_sq = [s / nt_samples for s in sqs]
        if nt_type == "smoothgrad":
            attrs = mean
        elif nt_type == "smoothgrad_sq":
            attrs = mean_sq
        else:
            attrs = [q - m * m for m, q in zip(mean, mean_sq)]
    return _result(attrs, shape, deltas if delta_on else None, nt_samples, xs[0].shape[0])


def _add_noise(xs: tuple[torch.Tensor, ...], sds: tuple[float, ...], k: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    out = []
    for x, sd in zip(xs, sds):
        size = (x.shape[0] * k, *x.shape[1:])
        noise = torch.normal(0, torch.tensor(sd, device=x.device).repeat(size))  # Captum's call, for its RNG stream
        noisy = x.repeat_interleave(k, dim=0) + noise
        out.append(noisy.requires_grad_() if requires_grad else noisy)
    return tuple(out)


def _partial(
    nt: NoiseTunnel,
    noisy: tuple[torch.Tensor, ...],
    kwargs: dict[str, Any],
    is_inputs_tuple: bool,
    delta_on: bool,
    k: int,
    sums: list[torch.Tensor],
    sqs: list[torch.Tensor],
    deltas: list[Any],
) -> tuple[bool, bool]:
    """One partition: attribute the noisy copies, fold them into the sums; (tuple?, list?) of the result."""
    got = nt.attribution_method.attribute(noisy if is_inputs_tuple else noisy[0], **kwargs)
    if delta_on:
        got, delta = got
        deltas.append(delta)
    is_list = isinstance(got, list)
    is_tuple = isinstance(got, (tuple, list))
    parts = tuple(got) if is_tuple else (got,)
    for i, a in enumerate(parts):
        bsz = a.shape[0] // k
        a = a.view(bsz, k, *a.shape[1:])
        s, q = a.sum(dim=1), a.pow(2).sum(dim=1)
        if len(sums) <= i:
            sums.append(s)
            sqs.append(q)
        else:
            sums[i] = sums[i] + s
            sqs[i] = sqs[i] + q
    return is_tuple, is_list


def _expand_partial(k: int, kwargs: dict[str, Any], xs: tuple[torch.Tensor, ...], draw_baseline_from_distrib: bool) -> None:
    """Captum's _expand_partial: the per-example kwargs repeated example-major for k copies."""
    args = kwargs.get("additional_forward_args")
    if args is not None:
        args = args if isinstance(args, tuple) else (args,)
        kwargs["additional_forward_args"] = tuple(a.repeat_interleave(k, dim=0) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)
    target = kwargs.get("target")
    if isinstance(target, list):
        kwargs["target"] = [t for t in target for _ in range(k)]
    elif isinstance(target, torch.Tensor) and target.numel() > 1:
        kwargs["target"] = target.repeat_interleave(k, dim=0)
    if "baselines" in kwargs:
        kwargs["baselines"] = _expand_baselines(kwargs["baselines"], xs, k, draw_baseline_from_distrib)
    mask = kwargs.get("feature_mask")
    if mask is not None:
        masks = mask if isinstance(mask, tuple) else (mask,)
        masks = tuple(m.repeat_interleave(k, dim=0) if m.size(0) > 1 else m for m in masks)
        kwargs["feature_mask"] = masks if isinstance(mask, tuple) else masks[0]


def _expand_baselines(baselines: Any, xs: tuple[torch.Tensor, ...], k: int, draw: bool) -> tuple[Any, ...]:
    if baselines is None:
        bs: tuple[Any, ...] = tuple(torch.zeros_like(x) for x in xs)
    else:
        bs = baselines if isinstance(baselines, tuple) else (baselines,)
    if len(bs) != len(xs):
        raise AttributionInputError(f"got {len(bs)} baselines for {len(xs)} inputs")
    for i, b in enumerate(bs):
        if not isinstance(b, (torch.Tensor, int, float)):
            raise AttributionInputError(f"baseline {i} must be a tensor or a number, got {type(b).__name__}")
    if draw:
        bsz = xs[0].shape[0]
        return tuple(b[np.random.choice(b.shape[0], k * bsz).tolist()] if isinstance(b, torch.Tensor) else b for b in bs)
    return tuple(
        b.repeat_interleave(k, dim=0) if isinstance(b, torch.Tensor) and b.shape[0] == x.shape[0] and b.shape[0] > 1 else b
        for x, b in zip(xs, bs)
    )


def _result(attrs: list[torch.Tensor], shape: tuple[bool, bool], deltas: list[Any] | None, nt_samples: int, batch: int) -> BatchResult:
    stats = []
    for a in attrs:
        flat = a.detach().reshape(a.shape[0], -1)
        acc = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        stats.append(kernels.finalize(acc, None, None, out_dtype=acc.dtype)[1])
    copy_delta = None
    mean_delta = None
    if deltas:
        copy_delta = torch.cat([torch.as_tensor(d).reshape(-1) for d in deltas])
        if copy_delta.numel() == batch * nt_samples:  # one delta per copy, example-major per partition
            mean_delta = sum(torch.as_tensor(d).reshape(batch, -1).sum(1) for d in deltas) / nt_samples
    is_tuple, is_list = shape
    return BatchResult(
        attributions=list(attrs),
        is_tuple=is_tuple,
        stats=combine_stats(stats),
        output=None,
        baseline_output=None,
        delta=mean_delta,
        n_steps=nt_samples,
        target=None,
        structure=list if is_list else None,
        copy_delta=copy_delta,
    )
