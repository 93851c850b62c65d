"""Dataset runs of ``LLMGradientAttribution``: prompts (+ optional targets) -> fixed-shape stored rows.

``fastattr.run(model, data, method="llm_integrated_gradients", tokenizer=tok, ...)`` goes through
the ordinary runner and store: this module gives it a ``MethodPlan`` whose ``make_source`` turns
the prompts into a fixed-shape ``ArraySource`` of token ids, and whose ``attribute`` runs
``LLMGradientAttribution.attribute_batch`` on one batch and pads the result to the run's maxima.

The data: a ``.jsonl`` path (one object a line: ``prompt`` a string or a list of token ids, and
an optional ``target``, a string, a list of ids, or null), or a list of such dicts, of prompt
strings, or of 1-D token-id arrays. Every prompt is tokenized up front (Captum's conventions,
fastattr/llm/text.py), so the shapes are fixed before the first batch and every shard agrees:
Lmax = the longest prompt, Tmax = max(the longest given target, gen_args' max_new_tokens when
some target is generated). Each sample is stored as the source's four inputs (prompt ids padded
with the pad id, prompt length, target ids, target length; 0 = generate), so the data
fingerprint covers the tokenization, and a resume or another torchrun rank reads the same rows.

Stored per sample: attributions ``token_attr`` (Tmax, Lmax) and ``seq_attr`` (Lmax,) (only
``seq_attr`` with seq_only), zero past the sample's lengths; output = log p(y | prompt),
baseline_output = the same at the baseline prompt, delta = sum(seq_attr) - their difference;
extras: prompt_length, target_length, prompt_ids (Lmax,), target_ids (Tmax,) (pad id past the
lengths; generated targets as generated), generated (bool), target_log_probs (Tmax,),
baseline_log_probs (Tmax,) and token_delta (Tmax,) (the per-token completeness residual;
absent with seq_only).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch

from ..errors import AttributionInputError, OptionError, SourceError
from ..kernels import Stats
from ..sources import ArraySource, Source
from . import text
from .model import CausalLM

logger = logging.getLogger(__name__)

METHOD = "llm_integrated_gradients"
# prompts per attribute_batch call (and per block written) unless the run says otherwise: the
# capture pass holds a(x), a(x0) of the whole batch, and generation runs it in one generate() call
EXAMPLES_PER_BATCH = 64


def read_prompts(data: Any) -> list[tuple[Any, Any]]:
    """(prompt, target or None) per sample from a .jsonl path or a list (see the module docstring)."""
    if isinstance(data, (str, os.PathLike)):
        path = str(data)
        if not path.endswith(".jsonl"):
            raise SourceError(f"prompt data must be a .jsonl file (one {{\"prompt\": ..., \"target\": ...}} object a line), got {path!r}")
        if not os.path.isfile(path):
            raise SourceError(f"no such file: {path}")
        rows = []
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Windows editors write one) is not JSON
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path}, line {n}: not JSON ({exc})") from exc
        items, where = rows, f"{path}: sample"
    elif isinstance(data, (list, tuple)):
        items, where = list(data), "sample"
    elif isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim == 2:  # (N, L) token ids: one prompt a row, no padding
        items, where = [row for row in data], "sample"
    else:
            raise SourceError(
            f"{METHOD} reads prompts from a .jsonl path, a list of prompts / {{'prompt', 'target'}} dicts, or an (N, L) id array; got {type(data).__name__}"
        )
    if not items:
        raise SourceError("the prompt data is empty")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            if "prompt" not in item:
                raise SourceError(f"{where} {i} has no 'prompt' field (fields: {sorted(item)})")
            unknown = sorted(set(item) - {"prompt", "target"})
            if unknown:
                raise SourceError(f"{where} {i} has unknown field(s) {unknown}; a sample has 'prompt' and optional 'target'")
            out.append((item["prompt"], item.get("target")))
        else:
            out.append((item, None))
    return out


def _text_or_ids(value: Any, what: str) -> Any:
    """A prompt or target as stored: a string, or token ids as a tensor (anything else: AttributionInputError)."""
    if isinstance(value, str):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        kind = type(value).__name__ + (f" of {type(value[0]).__name__}" if isinstance(value, (list, tuple)) and value else "")
        raise AttributionInputError(
            f"the {what} must be a string or a list of token ids, got {kind}; a sample with a target is a "
            "{'prompt': ..., 'target': ...} dict"
        ) from None


class PromptSource(ArraySource):
    """Prompts and targets as four fixed-shape id arrays (see the module docstring)."""

    def __init__(self, data: Any, tokenizer: Any, pad_id: int, max_new_tokens: int | None, lm: CausalLM | None = None) -> None:
        prompts, targets = [], []
        for i, (p, t) in enumerate(read_prompts(data)):
            try:
                ids = text.prompt_example(_text_or_ids(p, "prompt"), None, tokenizer, i)[0]
                tgt = None if t is None else text.target_ids(_text_or_ids(t, "target"), tokenizer, i)
                if lm is not None:  # before any work: out-of-vocabulary ids and over-long samples, named
                    lm.check_ids("the prompt", ids)
                    if tgt is not None:
                        lm.check_ids("the target", tgt)
                    n_t = len(tgt) if tgt is not None else max_new_tokens
                    if n_t is not None:
                        what = f"{len(ids)} prompt + {n_t} {'target' if tgt is not None else 'max_new_tokens'} tokens - 1"
                        lm.check_positions("prompt and target", len(ids) + n_t - 1, what)
            except AttributionInputError as exc:
                raise SourceError(f"sample {i}: {exc}") from exc
            prompts.append(ids)
            targets.append(tgt)
        generated = [t is None for t in targets]
        if any(generated) and max_new_tokens is None:
            raise OptionError("some samples have no target, so they are generated: gen_args needs max_new_tokens (it fixes the stored width)")
        tmax = max([len(t) for t in targets if t is not None] + ([int(max_new_tokens)] if any(generated) else []))
        lmax = max(len(p) for p in prompts)
        n = len(prompts)
        ids = np.full((n, lmax), pad_id, dtype=np.int64)
        tids = np.full((n, tmax), pad_id, dtype=np.int64)
        plen = np.zeros(n, dtype=np.int64)
        tlen = np.zeros(n, dtype=np.int64)
        for i, (p, t) in enumerate(zip(prompts, targets)):
            ids[i, : len(p)], plen[i] = p.numpy(), len(p)
            if t is not None:
                tids[i, : len(t)], tlen[i] = t.numpy(), len(t)
        super().__init__((ids, plen, tids, tlen), name=str(data) if isinstance(data, (str, os.PathLike)) else "prompts")
        logger.info("%d prompts (%d to generate), stored padded to %d prompt and %d target tokens", n, sum(generated), lmax, tmax)


def _stats(a: torch.Tensor) -> Stats:
    flat = a.reshape(a.shape[0], -1).float()
    finite = torch.isfinite(flat)
    f = torch.where(finite, flat, torch.zeros_like(flat))
    return Stats(f.sum(1), f.abs().sum(1), f.square().sum(1).sqrt(), f.abs().amax(1), (~finite).sum(1).to(torch.int32))


def _describe_tokenizer(tokenizer: Any) -> dict[str, Any] | None:
    if tokenizer is None:
        return None
    # no path: the data fingerprint already covers the token ids, and a moved directory should still resume
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)  # duck-typed ones may have neither
    return {"class": type(tokenizer).__name__, "size": size if isinstance(size, int) else None}


def _embedding_layer(model: torch.nn.Module, layer: Any) -> tuple[str, torch.nn.Module]:
    if layer is None:
        get = getattr(model, "get_input_embeddings", None)
        if get is None:
            raise OptionError(f"{METHOD} needs layer=: the model's input embedding layer (the model has no get_input_embeddings())")
        module = get()
    elif isinstance(layer, str):
        module = dict(model.named_modules()).get(layer)
        if module is None:
            raise OptionError(f"the model has no layer {layer!r} (see `fastattr layers`)")
    else:
        module = layer
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        raise OptionError(f"{METHOD}: the embedding layer is not a module of the model")
    return name, module


def _generation_config(model: Any) -> dict[str, Any] | None:
    """The model's generation defaults that gen_args does not override (eos and pad ids, sampling,
    lengths: a Hugging Face model's generation_config, as it differs from the library's defaults).
    They decide what a generated target is, and the weights' fingerprint does not cover them, so
    the run records them and a resume with others is refused. None for models without one."""
    config = getattr(model, "generation_config", None)
    if config is None or not callable(getattr(config, "to_diff_dict", None)):
        return None
    out = {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}  # a library upgrade is no change
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def plan(model: torch.nn.Module, opts: dict[str, Any], engine_opts: dict[str, Any]) -> Any:
    """The MethodPlan of an LLM run (fastattr/run_methods.py calls this)."""
    from ..layer_methods import LayerIntegratedGradients
    from ..options import positive_int
    from ..quadrature import RULES
    from ..run_methods import Batch, MethodPlan, describe
    from .api import LLMGradientAttribution
    from .batching import SIDES

    n_steps = opts["n_steps"]
    if isinstance(n_steps, str):
        raise OptionError(f"{METHOD} takes a fixed n_steps (no 'auto'), got {n_steps!r}")
    positive_int("n_steps", n_steps)
    if any(opts.get(k) is not None for k in ("tolerance", "max_steps", "abs_tolerance")):
        raise OptionError(f"{METHOD} has no adaptive steps: drop tolerance / max_steps / abs_tolerance")
    rule = opts["rule"] or "gausslegendre"
    if rule not in RULES:
        raise OptionError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if opts["padding_side"] not in SIDES:
        raise OptionError(f"padding_side must be one of {SIDES}, got {opts['padding_side']!r}")
    seq_only = opts["seq_only"]
    if not isinstance(seq_only, bool):
        raise OptionError(f"seq_only must be True or False, got {seq_only!r}")
    gen_args = dict(opts["gen_args"]) if opts["gen_args"] is not None else dict(text.DEFAULT_GEN_ARGS)
    max_new = gen_args.get("max_new_tokens")
    if max_new is not None:
        positive_int("gen_args max_new_tokens", max_new)
    baseline = opts.get("baselines")
    if isinstance(baseline, float) and baseline.is_integer():
        baseline = int(baseline)  # the CLI's --baseline 0 is a token id here
    if baseline is not None and not isinstance(baseline, (int, str)):
        raise OptionError(f"{METHOD} baselines must be one token id or token string replacing every prompt token, got {type(baseline).__name__}")
    tokenizer = opts["tokenizer"]
    layer_name, layer = _embedding_layer(model, opts["layer"])
    llm = LLMGradientAttribution(LayerIntegratedGradients(model, layer, multiply_by_inputs=opts["multiply_by_inputs"]), tokenizer)
    if isinstance(baseline, str):
        baseline = text.baseline_id(baseline, tokenizer, "baselines")
    if baseline is not None:
        try:
            llm.lm.check_ids("baselines", torch.tensor([baseline]))
        except AttributionInputError as exc:
            raise OptionError(str(exc)) from None
    pad_id = llm._pad_id()

    def attribute(b: Batch) -> Any:
        from ..attribution import BatchResult

        if b.forward_args or len(b.inputs) != 4:
            raise OptionError(f"{METHOD} reads its own prompt data (four id arrays a sample): forward_args_inputs must be 0")
        ids, plen, tids, tlen = (x.cpu() for x in b.inputs)
        n, lmax, tmax = ids.shape[0], ids.shape[1], tids.shape[1]
        prompts = [ids[i, : int(plen[i])] for i in range(n)]
        targets = [tids[i, : int(tlen[i])] if int(tlen[i]) > 0 else None for i in range(n)]
        generate = any(t is None for t in targets)
        try:
            res = llm.attribute_batch(
                prompts, targets, gen_args=gen_args if generate else None, baselines=baseline, n_steps=n_steps, method=rule,
                internal_batch_size=b.max_rows, precision=engine_opts["precision"], memory_budget=engine_opts["memory_budget"],
                seq_only=seq_only, padding_side=opts["padding_side"],
            )  # fmt: skip
        except AttributionInputError as exc:  # its "input i" / "target i" count within the batch
            raise type(exc)(f"samples [{b.start}, {b.stop}) (prompt i of the batch is sample {b.start} + i): {exc}") from exc
        tb, lb = res.target_ids.shape[1], res.seq_attr.shape[1]
        if tb > tmax:
            raise AttributionInputError(f"samples [{b.start}, {b.stop}): a generation has {tb} tokens, more than the run's {tmax}; set max_new_tokens")
        seq = torch.zeros(n, lmax)
        seq[:, :lb] = res.seq_attr.float().cpu()
        t_ids = torch.full((n, tmax), pad_id, dtype=torch.long)
        t_ids[:, :tb] = res.target_ids
        t_ids[torch.arange(tmax)[None, :] >= res.target_lengths[:, None]] = pad_id

        def per_token(v: torch.Tensor | None) -> torch.Tensor:
            out = torch.zeros(n, tmax)
            if v is not None:
                out[:, :tb] = v.float().cpu()
            return out

        lp, lp0 = per_token(res.target_log_probs), per_token(res.extras.get("baseline_log_probs"))
        extras = {
            "prompt_length": plen.clone(), "target_length": res.target_lengths.long().cpu(), "prompt_ids": ids.clone(), "target_ids": t_ids,
            "generated": tlen == 0, "target_log_probs": lp, "baseline_log_probs": lp0,
        }  # fmt: skip
        attrs, names = [seq], ["seq_attr"]
        if not seq_only:
            tok = torch.zeros(n, tmax, lmax)
            tok[:, :tb, :lb] = res.token_attr.float().cpu()
            attrs, names = [tok, seq], ["token_attr", "seq_attr"]
            extras["token_delta"] = per_token(res.delta)
        output, base_out = lp.double().sum(1), lp0.double().sum(1)
        return BatchResult(
            attributions=attrs, is_tuple=True, stats=_stats(attrs[0]), output=output.float(), baseline_output=base_out.float(),
            delta=res.seq_delta.float().cpu() if res.seq_delta is not None else None, n_steps=n_steps, target=None, names=names, extras=extras,
        )  # fmt: skip

    def make_source(data: Any, labels: Any) -> Source:
        if labels is not None:
            raise OptionError(f"{METHOD} takes no labels=: targets come with the prompts")
        return PromptSource(data, tokenizer, pad_id, max_new, llm.lm)

    params = {
        "n_steps": n_steps, "rule": rule, "multiply_by_inputs": opts["multiply_by_inputs"], "baselines": describe(baseline) if baseline is not None else 0,
        "layer": layer_name, "gen_args": gen_args, "seq_only": seq_only, "padding_side": opts["padding_side"], "tokenizer": _describe_tokenizer(tokenizer),
    }  # fmt: skip
    if (generation := _generation_config(model)) is not None:
        params["generation_config"] = generation  # a resume with other eos / pad / sampling defaults is refused
    return MethodPlan(
        METHOD, params, attribute, n_steps + 2, uses_target=False, attributor=llm, needs_float=False, make_source=make_source,
        examples_per_batch=EXAMPLES_PER_BATCH,
    )  # fmt: skip
