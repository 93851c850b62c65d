"""Random copies of a batch, shared by NoiseTunnel and GradientShap.

Both methods attribute several random copies of every example (noisy inputs, drawn
baselines). The copies of a batch form one virtual batch, copy-major (row j * B + b), so a
copy group is a contiguous row slice; tensors that follow the examples (targets, forward
args) are tiled the same way. Seeded draws use one generator per (seed, global sample index,
copy), seeded by a counter hash, so a sample's draws do not depend on batching.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import AttributionInputError, OptionError

GROUP_ELEMENTS = 2**23  # input elements per group of copies (32 MiB in fp32 per copy held)
_MASK64 = (1 << 64) - 1


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
            raise OptionError(f"stdev {i} must be a finite number >= 0, got {s!r}")
    return tuple(float(s) for s in values)


def check_seed(seed: Any, sample_ids: Any, batch: int) -> list[int] | None:
    """Validated global sample indices for the seeded stream (None without a seed)."""
    if seed is None:
        if sample_ids is not None:
            raise OptionError("sample_ids only apply with seed=; pass a seed to draw noise per sample")
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise OptionError(f"seed must be an int, got {type(seed).__name__}")
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


def tile_kwargs(kwargs: dict[str, Any] | None, copies: int, batch: int) -> dict[str, Any] | None:
    if not kwargs:
        return kwargs
    return {k: tile(v, copies, batch) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def tile_target(target: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    return None if target is None else target.repeat(copies, 1)


def copy_major(t: torch.Tensor, batch: int, copies: int) -> torch.Tensor:
    """Rows in Captum's example-major order (b * k + j) -> copy-major (j * B + b)."""
    return t.reshape(batch, copies, *t.shape[1:]).transpose(0, 1).reshape(batch * copies, *t.shape[1:])


def captum_delta_order(per_copy: torch.Tensor, partition: int) -> torch.Tensor:
    """(copies, B[, n]) deltas -> Captum NoiseTunnel's layout: partitions of ``partition`` copies
    concatenated, each example-major (b * k + j; then a wrapped GradientShap's n draws per copy)."""
    parts = per_copy.split(partition, dim=0)
    return torch.cat([p.transpose(0, 1).reshape(-1) for p in parts])


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
