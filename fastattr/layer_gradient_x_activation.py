"""Layer gradient x activation (Captum's LayerGradientXActivation): dF/da * a at a layer.

One forward and one backward per chunk of rows: each hooked layer's floating-point value
a (its output, or its input with ``attribute_to_layer_input=True``) is replaced by a leaf
that requires grad, and ``attr = a * dF/da`` (``dF/da`` alone with
``multiply_by_inputs=False``), F the model output selected by ``target`` as in Captum.

Results have Captum's form: the layer's shape, a tuple for a tuple-valued layer (every
floating-point part attributed, other parts passed through), a list for a list of layers.
fastattr's own keywords: ``internal_batch_size`` (rows per forward, default all) and
``precision`` (fp32 / tf32 / bf16 / fp16 autocast; attributions stay in the layer's dtype).
A layer that runs more than once per forward is an error (the gradient would be ambiguous).

It is also an ``attr_method`` for ``fastattr.LLMGradientAttribution`` (one step, no path).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .activations import check_layer_method
from .engine import frozen_parameters
from .errors import AttributionInputError, NoGradientError, OptionError
from .inputs import (
    TensorOrTuple,
    as_tuple,
    check_inputs,
    check_target,
    flat_target_index,
    normalize_forward_args,
    normalize_target,
)
from .layers import resolve_layers
from .options import check_selector, select_output
from .precision import get_precision

logger = logging.getLogger(__name__)

__all__ = ["LayerGradientXActivation"]


class LayerGradientXActivation:
    """Gradient times activation at a layer (Captum-compatible)."""

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: Any,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
    ) -> None:
        check_layer_method(forward_func, device_ids)
        self.forward_func = forward_func
        self.layers, self.is_list = resolve_layers(forward_func, layer)
        self.layer = layer
        self._multiply_by_inputs = multiply_by_inputs

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs

    def has_convergence_delta(self) -> bool:
        return False

    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        *,
        internal_batch_size: int | None = None,
        precision: str = "fp32",
        output: Any = None,
    ) -> Any:
        """``output``: which tensor of the model's output to attribute (fastattr.Options; default the
        output itself, its ``.logits`` or a ``"logits"`` key).
        ``grad_kwargs``: Captum's, passed to ``torch.autograd.grad`` (``{"materialize_grads": True}``
        gives zeros for a layer the output does not depend on, instead of NoGradientError)."""
        check_selector(output)
        if grad_kwargs is not None and not isinstance(grad_kwargs, dict):
            raise OptionError(f"grad_kwargs must be a dict, got {type(grad_kwargs).__name__}")
        xs, _ = as_tuple(inputs)
        batch = check_inputs(xs, need_float=False, allow_nonfinite=True)
        if internal_batch_size is not None and (not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise AttributionInputError(f"internal_batch_size must be a positive int, got {internal_batch_size!r}")
        policy = get_precision(precision)
        tgt = normalize_target(target, batch, xs[0].device)
        fargs = normalize_forward_args(additional_forward_args)
        rows = internal_batch_size or batch
        chunks: list[list[list[torch.Tensor]]] = []  # per chunk, per layer, the attributed parts
        structure: list[list[int] | None] = [None] * len(self.layers)  # per layer, positions of its attributed parts
        with frozen_parameters(self.forward_func):
            for r0 in range(0, batch, rows):
                r1 = min(batch, r0 + rows)
                ex = torch.arange(r0, r1, device=xs[0].device)
                args = tuple(a[r0:r1] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else a for a in fargs)
                chunks.append(self._chunk(tuple(x[r0:r1] for x in xs), args, tgt, ex, attribute_to_layer_input, policy, structure, grad_kwargs or {}, output))
        out = []
        for k in range(len(self.layers)):
            cat = [torch.cat([c[k][j] for c in chunks]) for j in range(len(chunks[0][k]))]
            out.append(cat[0] if len(cat) == 1 else tuple(cat))  # Captum: a tensor for one part, else a tuple
        return out if self.is_list else out[0]

    def _chunk(
        self,
        xs: tuple[torch.Tensor, ...],
        args: tuple,
        tgt: torch.Tensor | None,
        ex: torch.Tensor,
        to_input: bool,
        policy: Any,
        structure: list[list[int] | None],
        grad_kwargs: dict[str, Any] | None = None,
        output: Any = None,
    ) -> list[list[torch.Tensor]]:
        leaves: list[list[torch.Tensor]] = [[] for _ in self.layers]  # per layer, its attributed values
        calls = [0] * len(self.layers)

        def make_hook(k: int, name: str) -> Callable[..., Any]:
            def hook(_m: torch.nn.Module, hargs: Any, out: Any = None) -> Any:
                calls[k] += 1
                if calls[k] > 1:
                    raise AttributionInputError(f"layer {name!r} ran {calls[k]} times in one forward; it must run once")
                value = hargs if to_input else out
                bare = isinstance(value, torch.Tensor)
                items = [value] if bare else list(value)
                parts = [j for j, v in enumerate(items) if isinstance(v, torch.Tensor) and v.is_floating_point()]
                for j in parts:
                    if not items[j].requires_grad:  # no graph behind it to keep (frozen weights): a fresh leaf
                        items[j] = items[j].detach().requires_grad_(True)
                    leaves[k].append(items[j])  # else kept in the graph, so an upstream listed layer still gets gradient
                    # the model goes on with a copy, as in Captum: an in-place op after the layer (ReLU(inplace=True))
                    # must neither fail on the leaf nor change the activation that multiplies the gradient
                    items[j] = items[j].clone()
                if structure[k] is None:
                    structure[k] = parts
                if bare:
                    return items[0]
                return value._make(items) if hasattr(value, "_make") else type(value)(items)

            return hook

        handles = []
        try:
            for k, (name, module) in enumerate(self.layers):
                hook = make_hook(k, name)
                handles.append(module.register_forward_pre_hook(hook) if to_input else module.register_forward_hook(hook))
            with torch.enable_grad(), policy.flags(), policy.autocast(xs[0].device):
                y = select_output(self.forward_func(*xs, *args), output)
                if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != ex.shape[0]:
                    raise AttributionInputError(f"the model must return a (rows, ...) tensor, got {getattr(y, 'shape', type(y))}")
                t = check_target(None if tgt is None else tgt[ex], y.shape)
                sel = y.reshape(y.shape[0]) if t is None else y.reshape(y.shape[0], -1).gather(1, flat_target_index(t, y.shape)[:, None])
        finally:
            for h in handles:
                h.remove()
        missing = [self.layers[k][0] for k, c in enumerate(calls) if c == 0]
        if missing:
            raise AttributionInputError(f"layer(s) {missing} did not run during the model's forward")
        flat = [leaf for per in leaves for leaf in per]
        if not flat:
            raise AttributionInputError("no floating-point layer value to attribute (integer values such as token ids cannot be)")
        with torch.enable_grad():  # also when called under torch.no_grad(), as Captum allows
            grads = torch.autograd.grad(sel.sum(), flat, **{"allow_unused": True, **(grad_kwargs or {})})
        if any(g is None for g in grads):
            raise NoGradientError("the selected output does not depend on (one of) the layer values: no gradient to attribute")
        res: list[list[torch.Tensor]] = []
        i = 0
        for per in leaves:
            res.append([])
            for leaf in per:
                g = grads[i].to(leaf.dtype)
                res[-1].append((g * leaf.detach() if self._multiply_by_inputs else g).detach())
                i += 1
        return res
