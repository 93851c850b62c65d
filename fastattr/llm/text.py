"""Prompts, targets and baselines as token ids; token labels; greedy generation.

Captum's conventions, kept so results compare one to one:

- a prompt string is ``tokenizer.encode(text)`` (special tokens added, e.g. a BOS);
  a target string is ``tokenizer.encode(target, add_special_tokens=False)``;
- an object shaped like Captum's ``TextTokenInput`` (duck-typed: ``to_model_input()``,
  ``values``, ``baselines``, ``itp_mask``) gives its ids, its baseline token id, and the
  positions reported (``skip_tokens`` positions keep their token in the baseline and are
  left out of the result, as in Captum);
- the baseline is a token id replacing every attributed prompt token: ``TextTokenInput``'s
  default 0 unless given;
- ``input_tokens`` are ``tokenizer.convert_ids_to_tokens`` of the prompt; ``output_tokens``
  are Captum's "pretty" tokens (the decoded text re-split at the tokenizer's offsets);
- without a target, the model generates greedily with Captum's default ``gen_args``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import AttributionInputError
from .batching import Example

logger = logging.getLogger(__name__)

DEFAULT_GEN_ARGS: dict[str, Any] = {"max_new_tokens": 25, "do_sample": False, "temperature": None, "top_p": None}


def _need_tokenizer(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise AttributionInputError(f"{what} needs a tokenizer: pass LLMGradientAttribution(attr_method, tokenizer)")
    return tokenizer


def _ids(value: Any, what: str) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
        raise AttributionInputError(f"{what} must be a 1-D tensor of token ids, got shape {tuple(t.shape)} dtype {t.dtype}")
    if t.numel() == 0:
        raise AttributionInputError(f"{what} is empty; it needs at least one token")
    return t.detach().to("cpu", torch.long)


def is_text_token_input(inp: Any) -> bool:
    return all(hasattr(inp, k) for k in ("to_model_input", "values", "baselines"))


def baseline_id(value: Any, tokenizer: Any, where: str) -> int | torch.Tensor:
    """A baseline given as an int id, a token string, or a 1-D tensor of ids."""
    if isinstance(value, bool):
        raise AttributionInputError(f"{where}: baseline must be a token id, a token string or a tensor of ids, got a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        tok = _need_tokenizer(tokenizer, "a baseline token string")
        tid = tok.convert_tokens_to_ids(value)
        # Hugging Face maps an unknown token to the unk id: a typo would silently become <unk>
        unk_id, unk = getattr(tok, "unk_token_id", None), getattr(tok, "unk_token", None)
        if tid is None or (unk_id is not None and int(tid) == int(unk_id) and value != unk):
            raise AttributionInputError(
                f"{where}: baseline token {value!r} is not in the tokenizer's vocabulary; give a token as the tokenizer "
                "spells it (tokenizer.convert_ids_to_tokens, e.g. 'Ġthe' for GPT-2's ' the') or its id"
            )
        return int(tid)
    if isinstance(value, (torch.Tensor, list, tuple)):
        return _ids(value, f"{where}: baselines")
    raise AttributionInputError(f"{where}: baseline must be a token id, a token string or a tensor of ids, got {type(value).__name__}")


def prompt_example(inp: Any, baseline: Any, tokenizer: Any, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(prompt ids, baseline ids, reported positions, input token labels) of one input."""
    where = f"input {index}"
    mask = None
    if isinstance(inp, str):
        ids = _ids(_need_tokenizer(tokenizer, "a string prompt").encode(inp, return_tensors="pt"), where)
        labels = None
    elif is_text_token_input(inp):
        ids = _ids(inp.to_model_input(), where)
        labels = list(inp.values)
        if baseline is not None:
            raise AttributionInputError(f"{where} is a TextTokenInput, which carries its baseline: pass it there, not as baselines=")
        baseline = inp.baselines
        m = getattr(inp, "itp_mask", None)
        mask = None if m is None else m.reshape(-1).to("cpu", torch.bool)
        if mask is not None and mask.shape[0] != len(ids):
            raise AttributionInputError(f"{where}: itp_mask has {mask.shape[0]} entries for {len(ids)} tokens")
    elif isinstance(inp, (torch.Tensor, list, tuple)):
        ids = _ids(inp, where)
        labels = None
    else:
        raise AttributionInputError(f"{where} must be a string, a 1-D tensor of token ids or a TextTokenInput, got {type(inp).__name__}")
    keep = torch.arange(len(ids)) if mask is None else mask.nonzero().reshape(-1)
    b = baseline_id(0 if baseline is None else baseline, tokenizer, where)
    if isinstance(b, torch.Tensor):
        if b.shape != ids.shape:
            raise AttributionInputError(f"{where}: baseline ids have shape {tuple(b.shape)} but the prompt has {len(ids)} tokens")
        base = b.clone()
    else:
        base = torch.full_like(ids, b)
    if mask is not None:
        base[~mask] = ids[~mask]  # skipped tokens stay themselves: no attribution, as in Captum
    if labels is None:
        labels = input_tokens(ids, tokenizer)
    elif len(labels) != len(keep):
        raise AttributionInputError(f"{where}: {len(labels)} token labels (values) for {len(keep)} attributed tokens")
    return ids, base, keep, labels


def target_ids(target: Any, tokenizer: Any, index: int) -> torch.Tensor:
    if isinstance(target, str):
        tok = _need_tokenizer(tokenizer, "a string target")
        return _ids(torch.tensor(tok.encode(target, add_special_tokens=False), dtype=torch.long), f"target {index}")
    if isinstance(target, (torch.Tensor, list, tuple)):
        return _ids(target, f"target {index}")
    raise AttributionInputError(f"target {index} must be a string, token ids or None, got {type(target).__name__}")


def input_tokens(ids: torch.Tensor, tokenizer: Any) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return list(tokenizer.convert_ids_to_tokens(ids.tolist()))


def _clean(token: str) -> str:
    return token.replace("\n", "\\n").strip()


def output_tokens(ids: torch.Tensor, tokenizer: Any) -> list[str]:
    """Captum's pretty tokens: decode, re-encode with offsets, cut the text at the offsets;
    per-token decoding when the re-encoding does not match the ids."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    ids = ids.detach().cpu()
    ids_l = ids.tolist()
    txt = tokenizer.decode(ids)  # a tensor, as Captum passes it (its test tokenizers call .tolist())
    try:
        enc = tokenizer(txt, return_offsets_mapping=True, add_special_tokens=False)
        re_ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (TypeError, ValueError, KeyError, NotImplementedError):
        re_ids, offsets = [], []
    fixed = []
    for i, (start, end) in enumerate(offsets):  # empty spans end where the next one starts
        fixed.append((start, end if start != end else (offsets[i + 1][0] if i + 1 < len(offsets) else len(txt))))
    out: list[str] = []
    end_prev, idx = -1, 0
    for tid, (start, end) in zip(re_ids, fixed):
        if idx >= len(ids_l) or tid != ids_l[idx]:
            continue  # Captum skips tokens the re-encoding does not reproduce
        out.append(_clean(txt[start:end]) + (" [OVERLAP]" if end_prev > start else ""))
        end_prev, idx = end, idx + 1
    if len(out) != len(ids_l):
        logger.debug("pretty tokens did not line up with the ids; decoding token by token")
        return _fallback_tokens(ids, tokenizer)
    return out


def _split(tokenizer: Any, ids: torch.Tensor, k: int) -> tuple[str, bool]:
    """Token k decoded, and whether it is part of a character split over several ids (Captum's test)."""
    decoded = tokenizer.decode(ids[k])
    try:
        split = decoded.strip() == "\ufffd" and list(tokenizer.encode(decoded)) != [int(ids[k])]
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        split = False
    return decoded, split


def _fallback_tokens(ids: torch.Tensor, tokenizer: Any) -> list[str]:
    """Captum's fallback (``_convert_ids_to_pretty_tokens_fallback``): token by token, two ids of one
    split character labelled ``x``, ``x [OVERLAP]``; where Captum's reads past the last id (an
    IndexError there), the last id is labelled alone."""
    out: list[str] = []
    k, n = 0, len(ids)
    while k < n:
        decoded, split = _split(tokenizer, ids, k)
        if split and k + 1 < n:
            nxt, nxt_split = _split(tokenizer, ids, k + 1)
            out += [_clean(decoded), _clean(decoded) + " [OVERLAP]"] if nxt_split else [_clean(decoded), _clean(nxt)]
            k += 2
        else:
            out.append(_clean(decoded))
            k += 1
    return out


def _eos_ids(model: Any, gen_args: dict[str, Any]) -> set[int]:
    eos = gen_args.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def generate(
    model: Any, prompts: Sequence[torch.Tensor], gen_args: dict[str, Any] | None, pad_id: int, device: torch.device,
    max_rows: int | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Continuations of the prompts: ``model.generate`` (Captum's default gen_args when none are
    given), batched with left padding and an attention mask, at most ``max_rows`` prompts per
    call; a greedy loop for plain callables."""
    args = dict(gen_args) if gen_args else dict(DEFAULT_GEN_ARGS)
    if not hasattr(model, "generate"):
        return [_greedy(model, p, args, device) for p in prompts]
    rows = max_rows or len(prompts)
    if len(prompts) > rows:
        return [g for r0 in range(0, len(prompts), rows) for g in generate(model, prompts[r0 : r0 + rows], gen_args, pad_id, device)]
    if len(prompts) == 1:  # exactly Captum's call
        ids = prompts[0][None].to(device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, **args)
        return [_check_generated(out[0, ids.shape[1] :].cpu(), 0)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    args.setdefault("pad_token_id", pad_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **args)[:, width:].cpu()
    eos = _eos_ids(model, args)
    res = []
    for i, row in enumerate(out):  # a finished row is filled with padding after its eos: cut it there
        hits = [k for k, t in enumerate(row.tolist()) if t in eos]
        res.append(_check_generated(row[: hits[0] + 1] if hits else row, i))
    return res


def _check_generated(ids: torch.Tensor, i: int) -> torch.Tensor:
    if ids.numel() == 0:
        raise AttributionInputError(f"generation for prompt {i} produced no tokens; pass a target or gen_args with max_new_tokens >= 1")
    return ids


def _greedy(model: Any, prompt: torch.Tensor, args: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Greedy decoding for a callable without ``generate``: max_new_tokens and eos_token_id only."""
    from .model import logits_of

    extra = {k for k, v in args.items() if k not in ("max_new_tokens", "eos_token_id") and v not in (None, False)}
    if extra:
        raise AttributionInputError(f"the model has no generate(); greedy decoding supports max_new_tokens and eos_token_id, not {sorted(extra)}")
    eos = _eos_ids(model, args)
    seq = prompt.to(device)[None]
    with torch.no_grad():
        for _ in range(int(args.get("max_new_tokens", 25))):
            nxt = logits_of(model(seq))[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            if int(nxt) in eos:
                break
    return _check_generated(seq[0, len(prompt) :].cpu(), 0)


def make_examples(
    prompts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]], targets: list[torch.Tensor]
) -> list[Example]:
    return [Example(p, b, t, k, lab) for (p, b, k, lab), t in zip(prompts, targets)]
