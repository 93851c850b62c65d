"""Argument checks shared by the Triton launchers: clear errors before any launch."""

from __future__ import annotations

import torch

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # also the inputs' and outputs' dtypes
ACC_DTYPES = (torch.float32,)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_dtype(name: str, arg: str, dtype: torch.dtype, allowed: tuple[torch.dtype, ...] = GRAD_DTYPES) -> None:
    if dtype not in allowed:
        raise TypeError(f"{name}: {arg} must be {_names(allowed)}; got {dtype}")


def check_accumulator(name: str, arg: str, t: torch.Tensor) -> tuple[int, int]:
    """A (B, F) float32 accumulator; return (B, F)."""
    if t.dim() != 2:
        raise ValueError(f"{name}: {arg} must have shape (B, F); got {tuple(t.shape)}")
    check_dtype(name, arg, t.dtype, ACC_DTYPES)
    return t.shape[0], t.shape[1]


def check_rows(
    name: str, arg: str, t: torch.Tensor, B: int, F: int, like: str, allowed: tuple[torch.dtype, ...] = GRAD_DTYPES
) -> None:
    """A (B, F) tensor shaped like the accumulator ``like``, of an allowed dtype."""
    if tuple(t.shape) != (B, F):
        raise ValueError(f"{name}: {arg} must have shape (B, F)=({B}, {F}) like {like}; got {tuple(t.shape)}")
    check_dtype(name, arg, t.dtype, allowed)


def check_step_grads(name: str, grads: torch.Tensor, weights: torch.Tensor | None, B: int, F: int, acc_name: str) -> int:
    """Validate grads (S, B, F) and optional weights (S,) / (S, B) against a (B, F) accumulator; return S."""
    if grads.dim() != 3 or tuple(grads.shape[1:]) != (B, F):
        raise ValueError(f"{name}: grads must have shape (S, B, F) matching {acc_name} (B, F)=({B}, {F}); got {tuple(grads.shape)}")
    S = grads.shape[0]
    check_dtype(name, "grads", grads.dtype)
    if weights is not None:
        if weights.dim() not in (1, 2) or weights.shape[0] != S or (weights.dim() == 2 and weights.shape[1] != B):
            raise ValueError(f"{name}: weights must have shape (S,)=({S},) or (S, B)=({S}, {B}); got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"{name}: weights must be a floating-point tensor; got {weights.dtype}")
    return S


def check_same_device_and_dense(
    name: str, anchor: tuple[str, torch.Tensor], others: dict[str, torch.Tensor | None], dense: dict[str, torch.Tensor | None]
) -> None:
    """All tensors on the anchor's device; the ``dense`` ones (None skipped) contiguous."""
    anchor_name, anchor_t = anchor
    for arg, t in others.items():
        if t is not None and t.device != anchor_t.device:
            raise ValueError(f"{name}: {arg} is on {t.device} but {anchor_name} is on {anchor_t.device}")
    for arg, t in dense.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: {arg} must be contiguous")
