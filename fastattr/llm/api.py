"""``LLMGradientAttribution``: every generated token's log-probability to every prompt token.

Captum's meaning (``captum.attr.LLMGradientAttribution``), batched and sharing work::

    llm = LLMGradientAttribution(LayerIntegratedGradients(model, model.get_input_embeddings()), tokenizer)
    res = llm.attribute("prompt", target="answer", n_steps=32)        # or target=None: generate
    res.token_attr   # (T, L): attribution of log p(y_t | prompt, y_<t) to prompt token l, summed over the embedding
    res.seq_attr     # (L,): its sum over t (the attribution of log p(y | prompt))
    out = llm.attribute_batch(prompts, targets, n_steps=32)          # padded (B, T, L), out[i] per example

``attr_method``: fastattr's ``LayerIntegratedGradients`` or ``LayerGradientXActivation`` on the
model's input embedding layer. Keyword arguments are the method's: ``n_steps``, ``method``,
``baselines`` (a token id, a token string, or 1-D ids per prompt, replacing the attributed
prompt tokens; default 0 as Captum's TextTokenInput), ``internal_batch_size`` (rows per forward
and per backward), ``precision``, ``memory_budget``; and this class's: ``seq_only`` (seq_attr
alone, one backward per point), ``padding_side``, ``vjp`` (see fastattr/llm/shared.py).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine import frozen_parameters
from ..errors import AttributionInputError, OptionError
from ..layer_gradient_x_activation import LayerGradientXActivation
from ..layer_methods import LayerIntegratedGradients
from ..layers import module_of
from ..precision import get_precision
from ..quadrature import points_and_weights
from . import shared, text
from .batching import SIDES, build_layout
from .model import CausalLM

logger = logging.getLogger(__name__)

ZERO_EMBEDDING_RTOL = 1e-6  # a baseline row this small against the prompt's embeddings counts as zero


@dataclass
class LLMAttributionResult:
    """One example: Captum's fields plus fastattr's log-probabilities and completeness residuals."""

    seq_attr: torch.Tensor  # (L,)
    token_attr: torch.Tensor | None  # (T, L); None in seq_only mode
    input_tokens: list[str]
    output_tokens: list[str]
    target_log_probs: torch.Tensor  # (T,) log p(y_t | prompt, y_<t) at the input
    delta: torch.Tensor | None  # (T,) sum_l token_attr[t] - (log p_t(x) - log p_t(x0)); None without a path
    seq_delta: torch.Tensor | None  # () the same for seq_attr and the summed log-probability
    input_ids: torch.Tensor  # (L,) the reported prompt tokens' ids
    target_ids: torch.Tensor  # (T,)
    output_probs: torch.Tensor | None = None  # Captum's field; gradient methods leave it None

    @property
    def seq_attr_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in zip(self.input_tokens, self.seq_attr)}

    def plot_token_attr(self, show: bool = False) -> Any:
        """Captum's token-attribution heatmap (drawn by Captum's LLMAttributionResult: needs captum, matplotlib)."""
        return self._captum_result().plot_token_attr(show=show)

    def plot_seq_attr(self, show: bool = False) -> Any:
        """Captum's sequence-attribution bar plot (drawn by Captum's LLMAttributionResult: needs captum, matplotlib)."""
        return self._captum_result().plot_seq_attr(show=show)

    def _captum_result(self) -> Any:
        try:
            from captum.attr import LLMAttributionResult as CaptumResult
        except ImportError as e:  # captum is only a test dependency of fastattr
            raise ImportError(f"{type(self).__name__} plots through Captum's LLMAttributionResult: pip install captum matplotlib") from e
        token_attr = None if self.token_attr is None else self.token_attr.detach().cpu()
        return CaptumResult(seq_attr=self.seq_attr.detach().cpu(), token_attr=token_attr, input_tokens=self.input_tokens, output_tokens=self.output_tokens)


@dataclass
class LLMBatchResult:
    """B examples padded to (B, Tmax, Lmax) with zeros; ``result[i]`` is example i's own view."""

    seq_attr: torch.Tensor  # (B, Lmax)
    token_attr: torch.Tensor | None  # (B, Tmax, Lmax)
    input_lengths: torch.Tensor  # (B,) reported prompt tokens L_i
    target_lengths: torch.Tensor  # (B,) T_i
    target_log_probs: torch.Tensor  # (B, Tmax)
    delta: torch.Tensor | None  # (B, Tmax)
    seq_delta: torch.Tensor | None  # (B,)
    input_ids: torch.Tensor  # (B, Lmax), pad id past L_i
    target_ids: torch.Tensor  # (B, Tmax), pad id past T_i
    input_tokens: list[list[str]]
    output_tokens: list[list[str]]
    n_steps: int
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.seq_attr.shape[0]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> LLMAttributionResult:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i = i % len(self)
        n, t = int(self.input_lengths[i]), int(self.target_lengths[i])
        return LLMAttributionResult(
            seq_attr=self.seq_attr[i, :n],
            token_attr=None if self.token_attr is None else self.token_attr[i, :t, :n],
            input_tokens=self.input_tokens[i],
            output_tokens=self.output_tokens[i],
            target_log_probs=self.target_log_probs[i, :t],
            delta=None if self.delta is None else self.delta[i, :t],
            seq_delta=None if self.seq_delta is None else self.seq_delta[i],
            input_ids=self.input_ids[i, :n],
            target_ids=self.target_ids[i, :t],
        )


def _layer_of(attr_method: Any) -> torch.nn.Module:
    """The single layer an attribution object hooks (Captum's ``.layer``, or fastattr's slots)."""
    layer = getattr(attr_method, "layer", None)
    if isinstance(layer, torch.nn.Module):
        return layer
    slots = getattr(attr_method, "slots", None) or getattr(attr_method, "layers", None)
    if slots and len(slots) == 1:
        first = slots[0]
        module = getattr(first, "module", None) or (first[1] if isinstance(first, tuple) else None)
        if isinstance(module, torch.nn.Module):
            return module
    raise AttributionInputError("LLMGradientAttribution needs an attribution method on exactly one layer: the input embeddings")


class LLMGradientAttribution:
    """Attribution of generated tokens to prompt tokens (Captum's LLMGradientAttribution), batched."""

    SUPPORTED_METHODS = (LayerIntegratedGradients, LayerGradientXActivation)

    def __init__(self, attr_method: Any, tokenizer: Any = None) -> None:
        if not isinstance(attr_method, self.SUPPORTED_METHODS):
            raise AttributionInputError(
                f"LLMGradientAttribution supports fastattr's LayerIntegratedGradients and LayerGradientXActivation, got {type(attr_method).__name__}"
            )
        self.attr_method = attr_method
        self.model = attr_method.forward_func
        self.layer = _layer_of(attr_method)
        self.tokenizer = tokenizer
        self.lm = CausalLM(self.model, self.layer)
        self.is_path = isinstance(attr_method, LayerIntegratedGradients)
        device = getattr(self.model, "device", None)
        if not isinstance(device, torch.device):
            params = list(self.layer.parameters())
            device = params[0].device if params else torch.device("cpu")
        self.device = device

    def attribute(self, inp: Any, target: Any = None, gen_args: dict[str, Any] | None = None, **kwargs: Any) -> LLMAttributionResult:
        """One prompt (a string, 1-D token ids, or a TextTokenInput); ``target`` a string, token
        ids, or None (generate with ``gen_args``, Captum's defaults when None)."""
        if target is not None and gen_args is not None:
            raise AttributionInputError("gen_args must be None when target is given")
        if "baselines" in kwargs and kwargs["baselines"] is not None:
            kwargs["baselines"] = [kwargs["baselines"]]
        return self.attribute_batch([inp], [target], gen_args=gen_args, **kwargs)[0]

    def attribute_batch(
        self,
        inputs: list[Any],
        targets: list[Any] | None = None,
        gen_args: dict[str, Any] | None = None,
        *,
        baselines: Any = None,
        n_steps: int = 50,
        method: str | None = None,
        internal_batch_size: int | None = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        precision: str = "fp32",
        memory_budget: int | str | None = None,
        seq_only: bool = False,
        padding_side: str = "right",
        vjp: str = "loop",
    ) -> LLMBatchResult:
        """Several prompts in padded batches; ``targets`` one per prompt (None entries generate).
        ``baselines``: one for all (id, token string) or a list with one per prompt.
        ``return_convergence_delta`` is accepted for Captum's signature; deltas are always returned."""
        del return_convergence_delta
        if isinstance(inputs, (str, torch.Tensor)) or not isinstance(inputs, (list, tuple)) or not inputs:
            raise AttributionInputError("inputs must be a non-empty list of prompts (strings, 1-D id tensors or TextTokenInputs)")
        b = len(inputs)
        targets = [None] * b if targets is None else list(targets)
        if len(targets) != b:
            raise AttributionInputError(f"got {len(targets)} targets for {b} prompts")
        if attribute_to_layer_input:
            raise OptionError("attribute_to_layer_input=True is not supported: attribute to the embedding layer's output")
        if padding_side not in SIDES:
            raise OptionError(f"padding_side must be one of {SIDES}, got {padding_side!r}")
        if not self.is_path and (n_steps != 50 or method is not None or baselines is not None):
            raise OptionError("LayerGradientXActivation takes no n_steps, method or baselines (it has no path)")
        if not isinstance(n_steps, int) or isinstance(n_steps, bool):
            raise OptionError(f"n_steps must be a positive int for LLM attribution (no 'auto'), got {n_steps!r}")
        alphas, weights = points_and_weights(method or "gausslegendre", n_steps) if self.is_path else ((1.0,), (1.0,))
        policy = get_precision(precision)
        base_list = baselines if isinstance(baselines, (list, tuple)) else [baselines] * b
        if len(base_list) != b:
            raise AttributionInputError(f"got {len(base_list)} baselines for {b} prompts")
        prompts = [text.prompt_example(inp, bl, self.tokenizer, i) for i, (inp, bl) in enumerate(zip(inputs, base_list))]
        tgt = self._targets(prompts, targets, gen_args, internal_batch_size)
        examples = text.make_examples(prompts, tgt)
        pad_id = self._pad_id()
        lay = build_layout(examples, padding_side, pad_id, self.device)
        self.lm.check_padding(padding_side, bool((lay.mask == 0).any()))
        with frozen_parameters(self.model):
            a, a0, f_x, f_x0, fast_head = shared.capture(self.lm, lay, internal_batch_size, with_baseline=self.is_path)
            if self.is_path:
                self._check_baseline(a, a0, lay)
            else:
                a0 = torch.zeros_like(a)  # gradient x activation: the point a itself, multiplied by a
            mult = (a - a0) if self.attr_method.multiplies_by_inputs else None
            acc_tok, acc_seq = shared.integrate(
                self.lm, lay, a, a0, mult, alphas, weights, token=not seq_only, precision=policy,
                max_rows=internal_batch_size, memory_budget=memory_budget, vjp=vjp, fast_head=fast_head,
            )  # fmt: skip
        return self._result(examples, lay, acc_tok, acc_seq, f_x, f_x0, mult is not None and self.is_path, n_steps, pad_id)

    # ------------------------------------------------------------------ internals
    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self.model, "config", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _targets(self, prompts: list[tuple], targets: list[Any], gen_args: dict[str, Any] | None, max_rows: int | None) -> list[torch.Tensor]:
        todo = [i for i, t in enumerate(targets) if t is None]
        if gen_args is not None and not todo:
            raise AttributionInputError("gen_args must be None when every target is given")
        out: list[torch.Tensor | None] = [None if t is None else text.target_ids(t, self.tokenizer, i) for i, t in enumerate(targets)]
        if todo:
            gen = text.generate(self.model, [prompts[i][0] for i in todo], gen_args, self._pad_id(), self.device, max_rows)
            for i, g in zip(todo, gen):
                out[i] = g
        return out  # type: ignore[return-value]

    def _check_baseline(self, a: torch.Tensor, a0: torch.Tensor, lay: Any) -> None:
        """Warn when attributed positions start from an all-zero embedding in an RMSNorm model."""
        attributed = (lay.ids != lay.base_ids) & (lay.mask > 0)
        if not bool(attributed.any()):
            return
        norms0 = a0.float().norm(dim=-1)[attributed]
        typical = float(a.float().norm(dim=-1)[lay.mask > 0].median())
        zero = norms0 <= ZERO_EMBEDDING_RTOL * max(typical, 1e-30)
        if not bool(zero.any()):
            return
        norms = sorted({type(m).__name__ for m in self._modules() if "rmsnorm" in type(m).__name__.lower()})
        ids = sorted({int(t) for t in lay.base_ids[attributed][zero].tolist()})
        msg = (
            f"baseline token id(s) {ids} have an all-zero embedding (Hugging Face zeroes the padding token's row)"
        )
        if norms:
            warnings.warn(
                f"{msg} and the model normalises with {norms[0]}, which is singular at zero: the integration path "
                "starts at the singularity, the completeness delta is typically many times |F(x) - F(x0)| and more "
                "steps do not fix it. Use a baseline token with a non-zero embedding (e.g. the unk or eos token, or a "
                "neutral filler token); see the README's LLM section.",
                RuntimeWarning,
                stacklevel=4,
            )
        else:
            logger.info("%s; fine for models that add position embeddings before normalising (GPT-2)", msg)

    def _modules(self) -> list[torch.nn.Module]:
        root = module_of(self.model)
        return list(root.modules()) if root is not None else []

    def _result(self, examples, lay, acc_tok, acc_seq, f_x, f_x0, with_delta: bool, n_steps: int, pad_id: int) -> LLMBatchResult:
        cols, kvalid = lay.prompt_cols([e.keep for e in examples])
        b, tmax = lay.batch, lay.targets.shape[1]
        seq = acc_seq.gather(1, cols) * kvalid
        tok = None
        if acc_tok is not None:
            tok = acc_tok.gather(2, cols[:, None, :].expand(b, tmax, -1)) * (kvalid[:, None, :] & lay.t_valid[:, :, None])
        gap = f_x - f_x0
        delta = seq_delta = None
        if with_delta:  # every column counts: the continuation's are exactly 0 (same tokens in x and x0)
            if acc_tok is not None:
                delta = torch.where(lay.t_valid, acc_tok.sum(2) - gap, torch.zeros_like(gap))
            seq_delta = acc_seq.sum(1) - (gap * lay.t_valid).sum(1)
        klen = torch.tensor([len(e.keep) for e in examples])
        in_ids = torch.full((b, cols.shape[1]), pad_id, dtype=torch.long)
        t_ids = torch.full((b, tmax), pad_id, dtype=torch.long)
        for i, e in enumerate(examples):
            in_ids[i, : len(e.keep)] = e.prompt[e.keep]
            t_ids[i, : len(e.target)] = e.target
        return LLMBatchResult(
            seq_attr=seq, token_attr=tok, input_lengths=klen, target_lengths=lay.target_len.cpu(),
            target_log_probs=torch.where(lay.t_valid, f_x, torch.zeros_like(f_x)), delta=delta, seq_delta=seq_delta,
            input_ids=in_ids, target_ids=t_ids, input_tokens=[e.input_tokens for e in examples],
            output_tokens=[text.output_tokens(e.target, self.tokenizer) for e in examples], n_steps=n_steps,
            extras={"baseline_log_probs": torch.where(lay.t_valid, f_x0, torch.zeros_like(f_x0))} if with_delta else {},
        )  # fmt: skip
