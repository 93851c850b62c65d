"""List a model's named modules with their output shapes from one dry forward, so a user
can pick a layer for layer attribution or activation capture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import OptionError


@dataclass
class LayerInfo:
    name: str
    kind: str
    output_shape: str
    parameters: int


def example_inputs(
    input_shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str] = (), vocab: int | None = None, batch: int = 2, device: str = "cpu"
) -> list[torch.Tensor]:
    """A batch of random inputs: floats from N(0, 1); integer inputs (token ids) uniform in [0, vocab).

    ``dtypes`` gives one torch dtype name per input, or one for all (default float32)."""
    if dtypes and len(dtypes) not in (1, len(input_shapes)):
        raise OptionError(f"--input-dtype: give one for all inputs or one per input ({len(input_shapes)}), got {len(dtypes)}")
    names = list(dtypes) * len(input_shapes) if len(dtypes) == 1 else list(dtypes) or ["float32"] * len(input_shapes)
    out = []
    for shape, name in zip(input_shapes, names):
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise OptionError(f"--input-dtype: unknown dtype {name!r} (e.g. float32, long, int32, bool)")
        if dtype.is_floating_point:
            out.append(torch.randn(batch, *shape, device=device, dtype=dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(batch, *shape, device=device, dtype=dtype))
        else:
            if vocab is None or vocab < 1:
                raise OptionError(f"--input-dtype {name} needs --vocab N (token ids are drawn from [0, N)), or describe with --data")
            out.append(torch.randint(0, vocab, (batch, *shape), device=device, dtype=dtype))
    return out


def describe_layers(
    model: torch.nn.Module, input_shapes: Sequence[tuple[int, ...]] = (), device: str = "cpu", *, inputs: Sequence[torch.Tensor] | None = None
) -> list[LayerInfo]:
    """One forward of ``inputs`` (default: a batch of 2 random float samples of ``input_shapes``);
    every named module's output shape."""
    if inputs is None:
        inputs = example_inputs(input_shapes, device=device)
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
            out = model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    rows = [LayerInfo("(model)", type(model).__name__, _shape(out), sum(p.numel() for p in model.parameters()))]
    for name, module in model.named_modules():
        if name:
            rows.append(LayerInfo(name, type(module).__name__, seen.get(name, "(not called)"), sum(p.numel() for p in module.parameters(recurse=False))))
    return rows


def module_of(forward: object) -> torch.nn.Module | None:
    """The module behind a forward function: the function itself when it is a module, the owner of
    a bound method of one (``model.forward``), else None (a plain function)."""
    module = forward if isinstance(forward, torch.nn.Module) else getattr(forward, "__self__", None)
    return module if isinstance(module, torch.nn.Module) else None


def resolve_layers(model: object, layers: object) -> tuple[list[tuple[str, torch.nn.Module]], bool]:
    """Layers given as a module, a qualified name, or a list of those -> ([(name, module)], was a list).

    Names come from ``model.named_modules()`` when ``model`` is a module (or a bound method
    of one); a module outside the model is an error, since its hooks would never fire.
    Raises before any model work: ValueError/TypeError naming the bad entry.
    """
    root = module_of(model)
    is_list = isinstance(layers, (list, tuple))
    items = list(layers) if is_list else [layers]
    if not items:
        raise OptionError("layer: got an empty list of layers")
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
                raise OptionError(f"layer {item!r} is not a submodule of {type(root).__name__} (some names: {known}...)") from None
            out.append((item or "(model)", module))
        elif isinstance(item, torch.nn.Module):
            if root is not None and id(item) not in names:
                raise OptionError(f"layer {i} ({type(item).__name__}) is not a submodule of the model {type(root).__name__}")
            out.append((names.get(id(item), f"layer{i}"), item))
        else:
            raise TypeError(f"layer {i} must be an nn.Module or a qualified name, got {type(item).__name__}")
    seen = [m for _, m in out]
    if len({id(m) for m in seen}) != len(seen):
        raise OptionError(f"layer list names the same module twice: {[n for n, _ in out]}")
    return out, is_list


def _shape(out: object) -> str:
    if isinstance(out, torch.Tensor):
        return "(B, " + ", ".join(str(d) for d in out.shape[1:]) + ")" if out.dim() > 0 else "()"
    if isinstance(out, Mapping):  # e.g. a Hugging Face ModelOutput: its fields
        return "{" + ", ".join(f"{k}: {_shape(v)}" for k, v in out.items()) + "}"
    if isinstance(out, (tuple, list)):
        return "[" + ", ".join(_shape(o) for o in out) + "]"
    return type(out).__name__
