"""Deletion and insertion curves (Petsiuk et al. 2018): forward passes only, batched."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import AuditError

__all__ = ["feature_view", "perturbation_curves"]


def _score(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """(rows,) model score at the target: softmax probability or raw output."""
    out = model(x)
    flat = out.reshape(out.shape[0], -1).float()
    if flat.shape[1] == 1:
        return flat[:, 0]
    if score == "softmax":
        flat = flat.softmax(1)
    return flat.gather(1, target.reshape(-1, 1)).squeeze(1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the last two dimensions (replicate padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    h, w = x.shape[-2:]
    y = x.reshape(-1, 1, h, w)
    y = torch.nn.functional.pad(y, (radius, radius, 0, 0), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, 1, -1))
    y = torch.nn.functional.pad(y, (0, 0, radius, radius), mode="replicate")
    y = torch.nn.functional.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(x.shape)


def _replacement(x: torch.Tensor, replacement: str, value: float, blur_sigma: float) -> torch.Tensor:
    if replacement == "blur":
        return _blur(x, blur_sigma)
    return torch.full_like(x, value)


def feature_view(shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    """Features per sample and the broadcast shape of a feature mask: pixels for (C, H, W)."""
    if len(shape) == 3:
        return shape[1] * shape[2], (1, shape[1], shape[2])
    return math.prod(shape), shape


def perturbation_curves(
    model: torch.nn.Module,
    x: torch.Tensor,
    attr: torch.Tensor | None,
    target: torch.Tensor,
    *,
    steps: int = 20,
    replacement: str = "baseline",
    value: float = 0.0,
    blur_sigma: float = 2.0,
    score: str = "softmax",
    max_rows: int = 2048,
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves, each (B, steps + 1), for inputs x (B, *shape).

    Features are ordered by descending attribution (``attr`` of x's shape; for (C, H, W) inputs
    the channel sum per pixel, or an (H, W) map as a run with channel_reduce stores it: every
    channel of a pixel is replaced together), or uniformly at random with ``generator`` when ``attr`` is None.
    After step t the first round(t * P / steps) of the P features are replaced (deletion) or
    restored onto the replacement (insertion). Forward passes only, at most ``max_rows`` rows each.
    """
    if steps < 1:
        raise AuditError(f"steps must be >= 1, got {steps}")
    b, shape = x.shape[0], tuple(x.shape[1:])
    p, mask_shape = feature_view(shape)
    if attr is not None:
        imp = attr.detach().to(torch.float64).cpu()
        if len(shape) == 3 and tuple(imp.shape[1:]) == shape[1:]:  # a channel-reduced run's (H, W) map: one value per pixel
            imp = imp.reshape(b, p)
        else:
            imp = imp.reshape(b, *shape)
            imp = imp.sum(1) if len(shape) == 3 else imp
        keys = -imp.reshape(b, p).numpy()
    else:
        if generator is None:
            raise AuditError("perturbation_curves needs attr or a random generator for the control")
        keys = generator.random((b, p))
    order = np.argsort(keys, axis=1, kind="stable")
    ranks = np.empty((b, p), dtype=np.int64)
    np.put_along_axis(ranks, order, np.arange(p), axis=1)
    ranks_t = torch.from_numpy(ranks).to(x.device).reshape(b, *mask_shape)
    base = _replacement(x, replacement, value, blur_sigma)
    counts = [round(t * p / steps) for t in range(steps + 1)]
    per_chunk = max(1, max_rows // b)
    curves = {"deletion": np.empty((b, steps + 1)), "insertion": np.empty((b, steps + 1))}
    tgt = target.to(x.device)
    with torch.no_grad():
        for lo in range(0, steps + 1, per_chunk):
            ts = range(lo, min(lo + per_chunk, steps + 1))
            masks = torch.stack([ranks_t < counts[t] for t in ts])  # (T, B, *mask_shape): True = changed
            deleted = torch.where(masks, base.unsqueeze(0), x.unsqueeze(0)).reshape(-1, *shape)
            inserted = torch.where(masks, x.unsqueeze(0), base.unsqueeze(0)).reshape(-1, *shape)
            tt = tgt.repeat(len(ts))
            curves["deletion"][:, lo : lo + len(ts)] = _score(model, deleted, tt, score).reshape(len(ts), b).T.cpu().numpy()
            curves["insertion"][:, lo : lo + len(ts)] = _score(model, inserted, tt, score).reshape(len(ts), b).T.cpu().numpy()
    return curves["deletion"], curves["insertion"]
