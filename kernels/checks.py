"""Argument checks shared by the Triton launchers: clear errors before any launch."""

from __future__ import annotations

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_step_grads(name: str, grads: torch.Tensor, weights: torch.Tensor | None, B: int, F: int, acc_name: str) -> int:
    """Validate grads (S, B, F) and optional weights (S,) / (S, B) against a (B, F) accumulator; return S."""
    if grads.dim() != 3 or tuple(grads.shape[1:]) != (B, F):
        raise ValueError(f"{name}: grads must have shape (S, B, F) matching {acc_name} (B, F)=({B}, {F}); got {tuple(grads.shape)}")
    S = grads.shape[0]
    if grads.dtype not in GRAD_DTYPES:
        raise TypeError(f"{name}: grads must be float32, bfloat16 or float16; got {grads.dtype}")
    if weights is not None:
        if weights.dim() not in (1, 2) or weights.shape[0] != S or (weights.dim() == 2 and weights.shape[1] != B):
            raise ValueError(f"{name}: weights must have shape (S,)=({S},) or (S, B)=({S}, {B}); got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"{name}: weights must be a floating-point tensor; got {weights.dtype}")
    return S


def check_same_device_and_dense(name: str, anchor: tuple[str, torch.Tensor], others: dict[str, torch.Tensor | None], dense: dict[str, torch.Tensor]) -> None:
    """All tensors on the anchor's device; the ``dense`` ones contiguous."""
    anchor_name, anchor_t = anchor
    for arg, t in others.items():
        if t is not None and t.device != anchor_t.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but {anchor_name} is on {anchor_t.device}")
    for arg, t in dense.items():
        if not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous")
