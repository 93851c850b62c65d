"""A faithfulness check for stored LLM runs: does removing the top-attributed prompt tokens hurt
the target more than removing random ones?

For each audited sample (drawn at random with a fixed seed, or all when fewer), from what the
run stores (prompt ids, target ids, seq_attr and the baseline token in its manifest):

- candidates: the prompt positions whose token differs from the baseline token (replacing the
  others changes nothing);
- k = ``top_k`` (capped at the candidates; default 20% of them, at least 1);
- drop = log p(y | prompt) - log p(y | prompt with the k highest-seq_attr tokens replaced by
  the baseline token), log p(y) summed over the target tokens, teacher-forced;
- random drop: the same with k candidates drawn uniformly, averaged over ``draws`` draws.

The run beats random when the mean drop exceeds the mean random drop. Each sample costs one
forward over 1 + draws variants of its prompt + target (no padding: they share one length).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import AuditError
from ..store import RunReader
from .model import logits_of

DRAWS = 8
TOP_FRACTION = 0.2
# |log p(target) now - as stored| <= rtol * (1 + |stored|): room for float16 storage and batch-shape
# rounding, far below what another model gives
SAME_MODEL_RTOL = 1e-2


def _baseline_token(metadata: dict[str, Any]) -> int:
    b = (metadata.get("params") or {}).get("baselines", 0)
    if isinstance(b, bool) or not isinstance(b, int):
        raise AuditError(f"the run's baseline {b!r} is not one token id; the text deletion check needs one")
    return b


def _check_same_model(index: int, lp: float, stored: float) -> None:
    """The model must give the run's stored log p(target | prompt): another model (or one in train
    mode) would be audited against attributions it did not produce."""
    if not math.isfinite(stored):
        return
    if not abs(lp - stored) <= SAME_MODEL_RTOL * (1 + abs(stored)):
        raise AuditError(
            f"sample {index}: the model gives log p(target | prompt) = {lp:.6g} but the run stored {stored:.6g}; "
            "audit with the model the run was made with, in eval mode"
        )


def _log_probs(model: Any, seqs: torch.Tensor, prompt_len: int, target: torch.Tensor) -> torch.Tensor:
    """(V,) log p(target | prompt variant) summed over the target, for V equal-length variants."""
    with torch.no_grad():
        logits = logits_of(model(seqs)).float()
    steps = logits[:, prompt_len - 1 : prompt_len - 1 + len(target)].log_softmax(-1)
    return steps.gather(2, target[None, :, None].expand(seqs.shape[0], -1, 1)).squeeze(2).sum(1)


def text_deletion(
    reader: RunReader, model: Any, *, top_k: int | None = None, sample: int = 256, draws: int = DRAWS, seed: int = 0
) -> dict[str, Any]:
    """The check above on a stored llm_integrated_gradients run; a JSON-able section of the audit."""
    meta = reader.metadata
    if meta.get("method") != "llm_integrated_gradients":
        raise AuditError(f"the text deletion check is for llm_integrated_gradients runs, not {meta.get('method')!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise AuditError(f"top_k must be a positive int, got {top_k!r}")
    base = _baseline_token(meta)
    index = np.concatenate([np.arange(s["start"], s["stop"]) for s in meta["shards"]])
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(index, size=min(sample, index.size), replace=False))
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = param.device if param is not None else torch.device("cpu")
    drops, rand, ks, idx = [], [], [], []
    for i in chosen.tolist():
        row = reader[int(i)]
        ex = row["extras"]
        p, t = int(ex["prompt_length"]), int(ex["target_length"])
        prompt = torch.as_tensor(np.asarray(ex["prompt_ids"][:p]), dtype=torch.long)
        target = torch.as_tensor(np.asarray(ex["target_ids"][:t]), dtype=torch.long)
        attr = np.asarray(row["attributions"]["seq_attr"][:p], dtype=np.float64)
        cand = np.nonzero(prompt.numpy() != base)[0]
        if cand.size == 0:
            continue
        k = min(top_k or max(1, math.ceil(TOP_FRACTION * cand.size)), cand.size)
        top = cand[np.argsort(-attr[cand], kind="stable")[:k]]
        variants = [prompt.clone(), prompt.clone()]
        variants[1][top] = base
        for _ in range(draws):
            v = prompt.clone()
            v[rng.choice(cand, size=k, replace=False)] = base
            variants.append(v)
        seqs = torch.stack([torch.cat([v, target[:-1]]) for v in variants]).to(device)
        lp = _log_probs(model, seqs, p, target.to(device)).cpu().double()
        _check_same_model(int(i), float(lp[0]), float(row["output"]))
        drops.append(float(lp[0] - lp[1]))
        rand.append(float((lp[0] - lp[2:]).mean()))
        ks.append(k)
        idx.append(int(i))
    if not drops:
        raise AuditError("no audited sample has a prompt token that differs from the baseline token")
    d, r = np.array(drops), np.array(rand)
    return {
        "samples": len(drops),
        "baseline_token": base,
        "top_k": top_k,
        "k_mean": float(np.mean(ks)),
        "draws": draws,
        "drop": {"mean": float(d.mean()), "median": float(np.median(d))},
        "random_drop": {"mean": float(r.mean()), "median": float(np.median(r))},
        "beats_random_share": float((d > r).mean()),
        "beats_random": bool(d.mean() > r.mean()),
        "index": idx[:10],
    }
