"""Normalisation and validation of what users pass to ``attribute``.

Everything here runs before any model work, so bad input fails fast with a
message naming the problem. Targets become one (B, k) int64 tensor on the
device, so selection during the passes is a single gather with no host sync.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from .errors import AttributionInputError, NoGradientError  # noqa: F401 - re-exported

TensorOrTuple = torch.Tensor | tuple[torch.Tensor, ...]


def as_tuple(inputs: TensorOrTuple, name: str = "inputs") -> tuple[tuple[torch.Tensor, ...], bool]:
    """(tuple of tensors, whether the user passed a tuple)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), False
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs), True
    raise AttributionInputError(f"{name} must be a tensor or a non-empty tuple of tensors, got {type(inputs).__name__}")


def promote_integers(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Integer inputs (ids, uint8 pixels) as torch's default float dtype, for the methods that
    interpolate or add noise: Captum's ``x0 + alpha * (x - x0)`` and ``x + noise`` make them floats
    the same way, so IntegratedGradients, GradientShap and NoiseTunnel take them there. Bool inputs
    stay as they are (Captum's interpolation fails on them too)."""
    return tuple(x.to(torch.get_default_dtype()) if not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool else x for x in inputs)


def check_inputs(inputs: tuple[torch.Tensor, ...], *, need_float: bool, allow_nonfinite: bool) -> int:
    """Validate inputs; return the batch size B shared by all of them."""
    sizes = set()
    for i, x in enumerate(inputs):
        if x.dim() == 0:
            raise AttributionInputError(f"input {i} is a scalar; inputs need a leading batch dimension")
        if need_float and not x.is_floating_point():
            raise TypeError(
                f"input {i} has dtype {x.dtype}; gradients with respect to it need floating point "
                "(for token ids use LayerIntegratedGradients or LayerGradientXActivation on the embedding layer)"
            )
        # a finite sum proves every value finite in one pass without a mask (an overflowing sum falls back)
        if x.is_floating_point() and not allow_nonfinite and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            raise AttributionInputError(f"input {i} contains NaN or inf values (pass allow_nonfinite=True to proceed)")
        sizes.add(x.shape[0])
    if len(sizes) != 1:
        raise AttributionInputError(f"all inputs must share the batch size; got {[tuple(x.shape) for x in inputs]}")
    batch = sizes.pop()
    if batch == 0:
        raise AttributionInputError("inputs are empty (batch size 0)")
    devices = {x.device for x in inputs}
    if len(devices) != 1:
        raise AttributionInputError(f"all inputs must be on one device; got {sorted(map(str, devices))}")
    return batch


def expand_baselines(
    baselines: Any, inputs: tuple[torch.Tensor, ...], *, allow_nonfinite: bool
) -> tuple[torch.Tensor, ...]:
    """Baselines as tensors broadcast to each input's (B, *features) shape (views, no copies).

    Accepted per input: None (zeros), a Python number, a tensor of one sample's shape,
    of shape (1, *features), of shape (B, *features), or anything broadcastable to it.
    """
    if baselines is None or isinstance(baselines, (int, float, torch.Tensor)):
        per_input = (baselines,) * len(inputs) if len(inputs) > 1 and not isinstance(baselines, torch.Tensor) else (baselines,)
    elif isinstance(baselines, (tuple, list)):
        per_input = tuple(baselines)
    else:
        raise AttributionInputError(f"baselines must be None, a number, a tensor or a tuple of those; got {type(baselines).__name__}")
    if len(per_input) != len(inputs):
        raise AttributionInputError(f"got {len(per_input)} baselines for {len(inputs)} inputs")
    out = []
    for i, (b, x) in enumerate(zip(per_input, inputs)):
        if b is None:
            out.append(torch.zeros((), dtype=x.dtype, device=x.device).expand_as(x))
            continue
        if isinstance(b, bool) or not isinstance(b, (int, float, torch.Tensor)):
            raise AttributionInputError(f"baseline {i} must be None, a number or a tensor; got {type(b).__name__}")
        if not isinstance(b, torch.Tensor):
            if not math.isfinite(b) and not allow_nonfinite:
                raise AttributionInputError(f"baseline {i} is {b}; baselines must be finite")
            out.append(torch.full((), float(b), dtype=x.dtype, device=x.device).expand_as(x))
            continue
        if not b.is_floating_point() and x.is_floating_point():
            b = b.to(x.dtype)
        if b.shape == x.shape[1:]:
            b = b.unsqueeze(0)
        try:
            shape = torch.broadcast_shapes(b.shape, x.shape)
        except RuntimeError:
            shape = None
        if shape != x.shape:
            raise AttributionInputError(
                f"baseline {i} has shape {tuple(b.shape)}, which does not fit input {i} of shape {tuple(x.shape)}: "
                f"expected {tuple(x.shape[1:])}, (1, ...), ({x.shape[0]}, ...) or broadcastable to the input"
            )
        if b.is_floating_point() and not allow_nonfinite and not bool(torch.isfinite(b).all()):
            raise AttributionInputError(f"baseline {i} contains NaN or inf values")
        # values only: no gradient flows to baselines (as in Captum), and one that requires grad
        # (embeddings of baseline ids) must not carry autograd into the kernels' out= ops
        out.append(b.detach().to(device=x.device, dtype=x.dtype).expand_as(x))
    return tuple(out)


def _is_int(v: Any) -> bool:
    """A Python or NumPy integer (``numbers.Integral``: what iterating over a label array gives), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class TargetFromOutput:
    """A target taken from the model's own output on the inputs (a dataset run's target="predicted").

    A method that runs the model on the inputs themselves in fp32 anyway (Saliency and InputXGradient
    in their gradient pass, IntegratedGradients in the F(x) pass of its delta) hands it to the engine
    (``Problem.predict``), which asks ``resolve`` for each chunk's rows: one forward fewer per
    sample. Every other caller gets ``full()`` (its own forward over the batch) through
    ``normalize_target``."""

    def resolve(self, output: torch.Tensor, example_idx: torch.Tensor) -> torch.Tensor | None:
        """(N, k) target indices for the rows ``example_idx`` of the batch from their selected
        output (N, *out), or None when there is one output per example."""
        raise NotImplementedError

    def full(self) -> torch.Tensor | None:
        """The batch's targets from a forward of its own (no gradient)."""
        raise NotImplementedError


def normalize_target(target: Any, batch: int, device: torch.device) -> torch.Tensor | None:
    """Target as a (B, k) int64 tensor on ``device`` (k output dims indexed), or None."""
    if isinstance(target, TargetFromOutput):
        target = target.full()
    if target is None:
        return None
    if _is_int(target):
        rows = [[int(target)]] * batch
    elif isinstance(target, tuple) and target and all(_is_int(t) for t in target):
        rows = [[int(t) for t in target]] * batch
    elif isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise AttributionInputError(f"target tensor must hold integers, got dtype {target.dtype}")
        if target.numel() == 1:
            return target.reshape(1, 1).to(device=device, dtype=torch.long).expand(batch, 1)
        if target.dim() == 2 and target.shape[0] == batch:  # (B, k): one index tuple per example
            return target.to(device=device, dtype=torch.long)
        if target.dim() != 1 or target.shape[0] != batch:
            raise AttributionInputError(
                f"target tensor must be 1-D with one entry per example ({batch}), or (B, k) index tuples; got shape {tuple(target.shape)}"
            )
        return target.to(device=device, dtype=torch.long).reshape(batch, 1)
    elif isinstance(target, Sequence) and not isinstance(target, str):
        if len(target) != batch:
            raise AttributionInputError(f"target list has {len(target)} entries for {batch} examples")
        if all(_is_int(t) for t in target):
            rows = [[int(t)] for t in target]
        elif all(isinstance(t, tuple) and t and all(_is_int(v) for v in t) for t in target):
            if len({len(t) for t in target}) != 1:
                raise AttributionInputError("target tuples in a list must all have the same length")
            rows = [[int(v) for v in t] for t in target]
        else:
            raise AttributionInputError("a target list must hold ints, or tuples of ints, one per example")
    else:
        raise AttributionInputError(
            f"target must be None, an int, a tuple of ints, a list of those, or a 1-D integer tensor; got {type(target).__name__}"
        )
    return torch.tensor(rows, dtype=torch.long, device=device)


def check_target(target: torch.Tensor | None, output_shape: torch.Size) -> torch.Tensor | None:
    """Validate target against a model output of shape (N, *out); return it with negative indices wrapped."""
    out_dims = tuple(output_shape[1:])
    if target is None:
        if math.prod(out_dims) != 1:
            raise AttributionInputError(
                f"the model output has shape {tuple(output_shape)}: pass target= to select one output per example"
            )
        return None
    if target.shape[1] != len(out_dims):
        raise AttributionInputError(
            f"target indexes {target.shape[1]} output dimension(s) but the model output per example has shape {out_dims}"
        )
    sizes = torch.tensor(out_dims, dtype=torch.long, device=target.device)
    bad = (target < -sizes) | (target >= sizes)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise AttributionInputError(
            f"target {target[row].tolist()} (example {row}) is out of range for model output shape {out_dims}"
        )
    return torch.where(target < 0, target + sizes, target)


def flat_target_index(target: torch.Tensor, output_shape: torch.Size) -> torch.Tensor:
    """(B,) flat index into output.reshape(N, -1) for a validated (B, k) target."""
    strides = torch.ones(target.shape[1], dtype=torch.long)
    for d in range(target.shape[1] - 2, -1, -1):
        strides[d] = strides[d + 1] * output_shape[d + 2]
    return (target * strides.to(target.device)).sum(1)


def normalize_forward_args(args: Any) -> tuple:
    if args is None:
        return ()
    return tuple(args) if isinstance(args, tuple) else (args,)
