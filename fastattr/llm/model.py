"""How fastattr calls a causal language model: ids (or embeddings) in, next-token logits out.

Three kinds of model, found from the forward's signature:

- Hugging Face causal LMs as they come: ``model(input_ids=, attention_mask=, position_ids=,
  logits_to_keep=)`` returning a ``ModelOutput`` with ``.logits``; the attributed layer's
  output (the input embeddings) is replaced through a forward hook, as Captum does;
- models that take ``inputs_embeds`` but no ``input_ids``: called with the embeddings
  directly, ``a(x)`` computed by calling the layer on the ids;
- plain callables ``f(ids) -> logits`` (a tensor, a tuple whose first item is the logits, or
  an object with ``.logits``): hooked like the first kind; only the keywords the callable
  accepts are passed, so without both ``attention_mask`` and ``position_ids`` only right padding (which a causal
  model never sees) is possible.

``logits_to_keep`` (when accepted) asks for the logits of the last K positions only: the
prompt's positions need none, and the LM head over the vocabulary is a large part of a
small model's forward.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import AttributionInputError
from .head import head_linear, recorded_head, skipped_head

logger = logging.getLogger(__name__)

KEYWORDS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "logits_to_keep", "use_cache")
# names of learned absolute position tables (GPT-2's wpe, BERT/GPT-Neo-style, OPT/BART-style): a
# sequence longer than the table is an IndexError deep in the forward, so it is refused up front
POSITION_TABLES = ("wpe", "position_embeddings", "embed_positions")


def context_limit(model: Any, layer: torch.nn.Module) -> int | None:
    """The most positions a model with a learned absolute position table takes (the config's
    n_positions / max_position_embeddings, capped by the table); None without such a table
    (rotary models such as Llama run past their nominal length, as Hugging Face allows)."""
    from ..layers import module_of

    root = module_of(model)
    if root is None:
        return None
    tables = [m for n, m in root.named_modules() if isinstance(m, torch.nn.Embedding) and m is not layer and n.rsplit(".", 1)[-1] in POSITION_TABLES]
    if not tables:
        return None
    size = tables[0].num_embeddings
    cfg = getattr(root, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return min(v, size)
    return size


def _accepted(fn: Callable[..., Any]) -> set[str]:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return set()
    return {k for k in KEYWORDS if k in params}


def logits_of(out: Any) -> torch.Tensor:
    """The logits tensor of a model's output (``.logits``, first item of a tuple, or the tensor)."""
    if isinstance(out, torch.Tensor):
        logits = out
    elif hasattr(out, "logits"):
        logits = out.logits
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    else:
        raise AttributionInputError(f"cannot find logits in the model's output ({type(out).__name__}); return a tensor or an object with .logits")
    if logits.dim() != 3:
        raise AttributionInputError(f"the model's logits must be (rows, positions, vocab), got shape {tuple(logits.shape)}")
    return logits


class CausalLM:
    """A model and its attributed layer (the input embeddings), called the same way everywhere."""

    def __init__(self, model: Callable[..., Any], layer: torch.nn.Module) -> None:
        self.model = model
        self.layer = layer
        self.accepts = _accepted(model)
        # embeddings-only models are called with inputs_embeds; everything else through the hook
        self.embeds_style = "inputs_embeds" in self.accepts and "input_ids" not in self.accepts
        self.head = head_linear(model)  # nn.Linear output embedding, for the sparse-target head (head.py)
        self.vocab = layer.num_embeddings if isinstance(layer, torch.nn.Embedding) else None
        self.context = context_limit(model, layer)

    def check_ids(self, where: str, ids: torch.Tensor) -> None:
        """Token ids the embedding can look up (else an IndexError deep in the forward)."""
        if self.vocab is None or ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab:
            bad = lo if lo < 0 else hi
            raise AttributionInputError(f"{where} has token id {bad}, outside the model's vocabulary of {self.vocab} ids (0..{self.vocab - 1})")

    def check_positions(self, where: str, n: int, what: str) -> None:
        """A sequence of ``n`` positions fits the model's learned position table."""
        if self.context is not None and n > self.context:
            raise AttributionInputError(
                f"{where}: {what} = {n} positions, more than the model's context of {self.context} (its learned position table); "
                "shorten the prompt or the target (or max_new_tokens)"
            )

    def check_padding(self, side: str, padded: bool) -> None:
        # both: without position_ids a left-padded row's positions start at its pads (GPT-2 then gives other logits)
        missing = [k for k in ("attention_mask", "position_ids") if k not in self.accepts]
        if padded and side == "left" and missing:
            raise AttributionInputError(
                f"left padding needs a model that takes attention_mask and position_ids; this one does not take {' or '.join(missing)}: "
                "use padding_side='right' (a causal model never sees trailing padding)"
            )

    def _kwargs(self, mask: torch.Tensor | None, pos: torch.Tensor | None, keep: int | None) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if mask is not None and "attention_mask" in self.accepts:
            kw["attention_mask"] = mask
        if pos is not None and "position_ids" in self.accepts:
            kw["position_ids"] = pos
        if keep is not None and "logits_to_keep" in self.accepts:
            kw["logits_to_keep"] = keep
        if "use_cache" in self.accepts:
            kw["use_cache"] = False
        return kw

    def keeps_logits(self) -> bool:
        return "logits_to_keep" in self.accepts

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """a(ids): the layer's output for an embeddings-only model (its forward never calls the layer)."""
        return self.layer(ids)

    def capture(
        self, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None, keep: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(layer output a, logits of the last ``keep`` positions, the head's input or None) for
        ids, forward only."""
        heads: list[torch.Tensor] = []
        recording = recorded_head(self.head, heads) if self.head is not None else contextlib.nullcontext()
        if self.embeds_style:
            a = self.embed(ids)
            with recording:
                logits = self._run(a, ids, mask, pos, keep)
            return a, logits, heads[0] if len(heads) == 1 else None
        box: list[torch.Tensor] = []

        def hook(_m: torch.nn.Module, _args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise AttributionInputError(f"the attributed layer must output a floating-point tensor, got {type(out).__name__}")
            box.append(out.detach().clone())  # a copy: later in-place ops cannot change it

        handle = self.layer.register_forward_hook(hook)
        try:
            with recording:
                logits = logits_of(self.model(ids, **self._kwargs(mask, pos, keep)))
        finally:
            handle.remove()
        if len(box) != 1:
            raise AttributionInputError(
                f"the attributed layer ran {len(box)} times in one forward; it must run exactly once (pass the input embedding layer)"
            )
        return box[0], logits, heads[0] if len(heads) == 1 else None

    def logits(
        self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None, keep: int | None
    ) -> torch.Tensor:
        """Logits of the last ``keep`` positions (all without logits_to_keep) with the layer's
        output replaced by ``embeds`` (rows, positions, dim)."""
        return self._run(embeds, ids, mask, pos, keep)

    def hidden(
        self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None, keep: int | None
    ) -> torch.Tensor:
        """Like ``logits`` but returns the LM head's input (rows, positions, dim); the head is skipped."""
        box: list[torch.Tensor] = []
        with skipped_head(self.head, box):
            self._run(embeds, ids, mask, pos, keep, check_logits=False)
        if len(box) != 1:
            raise AttributionInputError(f"the output embedding ran {len(box)} times in one forward; expected once")
        return box[0]

    def _run(
        self, embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None, keep: int | None,
        check_logits: bool = True,
    ) -> torch.Tensor:  # fmt: skip
        kw = self._kwargs(mask, pos, keep)
        get = logits_of if check_logits else (lambda out: out)
        if self.embeds_style:
            return get(self.model(inputs_embeds=embeds, **kw))
        calls = [0]

        def hook(_m: torch.nn.Module, _args: Any, out: Any) -> torch.Tensor:
            calls[0] += 1
            if calls[0] > 1:
                raise AttributionInputError("the attributed layer ran twice in one forward; it must run exactly once")
            if out.shape != embeds.shape:
                raise AttributionInputError(f"the layer produced {tuple(out.shape)} but {tuple(embeds.shape)} was captured")
            return embeds

        handle = self.layer.register_forward_hook(hook)
        try:
            out = get(self.model(ids, **kw))
        finally:
            handle.remove()
        if calls[0] == 0:
            raise AttributionInputError("the attributed layer did not run during the model's forward")
        return out
