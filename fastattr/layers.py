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


def resolve_layers(model: object, layers: object) -> tuple[list[tuple[str, torch.nn.Module]], bool]:
    """Layers given as a module, a qualified name, or a list of those -> ([(name, module)], was a list).

    Names come from ``model.named_modules()`` when ``model`` is a module (or a bound method
    of one); a module outside the model is an error, since its hooks would never fire.
    Raises before any model work: ValueError/TypeError naming the bad entry.
    """
    root = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    root = root if isinstance(root, torch.nn.Module) else None
    is_list = isinstance(layers, (list, tuple))
    items = list(layers) if is_list else [layers]
    if not items:
        raise ValueError("layer: got an empty list of layers")
    names = {id(m): (n or "(model)") for n, m in root.named_modules()} if root is not None else {}
    out: list[tuple[str, torch.nn.Module]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if root is None:
                raise TypeError(f"layer {item!r} is a name, but the forward function is not an nn.Module to look it up in; pass the module")
            try:
                module = root.get_submodule(item)
            except AttributeError:
                known = ", ".join(n for n, _ in list(root.named_modules())[1:12])
                raise ValueError(f"layer {item!r} is not a submodule of {type(root).__name__} (some names: {known}...)") from None
            out.append((item or "(model)", module))
        elif isinstance(item, torch.nn.Module):
            if root is not None and id(item) not in names:
                raise ValueError(f"layer {i} ({type(item).__name__}) is not a submodule of the model {type(root).__name__}")
            out.append((names.get(id(item), f"layer{i}"), item))
        else:
            raise TypeError(f"layer {i} must be an nn.Module or a qualified name, got {type(item).__name__}")
    seen = [m for _, m in out]
    if len({id(m) for m in seen}) != len(seen):
        raise ValueError(f"layer list names the same module twice: {[n for n, _ in out]}")
    return out, is_list


def _shape(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return "(B, " + ", ".join(str(d) for d in out.shape[1:]) + ")" if out.dim() > 0 else "()"
    if isinstance(out, (tuple, list)):
        return "[" + ", ".join(_shape(o) for o in out) + "]"
    return type(out).__name__
