"""List a model's named modules with their output shapes from one dry forward, so a user
can pick a layer for layer attribution or activation capture."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerInfo:
    name: str
    kind: str
    output_shape: str
    parameters: int


def describe_layers(model: torch.nn.Module, input_shapes: list[tuple[int, ...]], device: str = "cpu") -> list[LayerInfo]:
    """One forward of a batch of 2 random samples; every named module's output shape."""
    seen: dict[str, str] = {}
    hooks = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m, _inp, out, name=name) -> None:
            seen.setdefault(name, _shape(out))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(*(torch.randn(2, *s, device=device) for s in input_shapes))
    finally:
        for h in hooks:
            h.remove()
    rows = [LayerInfo("(model)", type(model).__name__, _shape(out), sum(p.numel() for p in model.parameters()))]
    for name, module in model.named_modules():
        if name:
            rows.append(LayerInfo(name, type(module).__name__, seen.get(name, "(not called)"), sum(p.numel() for p in module.parameters(recurse=False))))
    return rows


def _shape(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return "(B, " + ", ".join(str(d) for d in out.shape[1:]) + ")" if out.dim() > 0 else "()"
    if isinstance(out, (tuple, list)):
        return "[" + ", ".join(_shape(o) for o in out) + "]"
    return type(out).__name__
