"""Token-by-token heatmaps of a stored LLM run (``fastattr render`` on a llm_integrated_gradients run).

One panel per sample: rows are the target tokens (generated or given), columns the prompt
tokens, each cell token_attr[t, l], cut to the sample's own lengths (extras/prompt_length,
extras/target_length) and labelled with the tokens (the tokenizer's, or the ids without one).
A seq_only run gets one row, seq_attr. Colours are diverging, centred at zero, clipped at a
percentile of |attribution| per panel (as fastattr/render.py does for other runs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import RenderError
from ..render import pyplot


def labels(ids: np.ndarray, tokenizer: Any) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def render_llm(
    batch: dict[str, Any], out_path: str, *, tokenizer: Any = None, percentile: float = 99.0, size: tuple[int, int] = (1200, 900)
) -> list[tuple[list[str], list[str]]]:
    """Draw ``batch`` (a slice of a stored LLM run, as ``fastattr.open(run)[a:b]`` returns it) into a
    PNG; returns each panel's (prompt token labels, target token labels)."""
    plt = pyplot()
    extras, attrs = batch["extras"], batch["attributions"]
    if "prompt_length" not in extras or "seq_attr" not in attrs:
        raise RenderError("not an LLM run: it has no extras/prompt_length or seq_attr")
    n = len(batch["index"])
    if n == 0:
        raise RenderError("no samples to render")
    token_mode = "token_attr" in attrs
    dpi = 100
    fig, axes = plt.subplots(n, 1, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    drawn = []
    for k, ax in enumerate(axes[:, 0]):
        p, t = int(extras["prompt_length"][k]), int(extras["target_length"][k])
        xs = labels(extras["prompt_ids"][k, :p], tokenizer)
        ys = labels(extras["target_ids"][k, :t], tokenizer) if token_mode else ["log p(y)"]
        heat = attrs["token_attr"][k, :t, :p] if token_mode else attrs["seq_attr"][k, None, :p]
        heat = np.where(np.isfinite(heat), heat.astype(np.float64), 0.0)
        lim = np.percentile(np.abs(heat), percentile) or 1e-12
        ax.imshow(np.clip(heat, -lim, lim), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(p), xs, rotation=90, fontsize=6)
        ax.set_yticks(range(len(ys)), ys, fontsize=6)
        generated = bool(extras["generated"][k]) if "generated" in extras else False
        ax.set_title(f"#{int(batch['index'][k])} ({'generated' if generated else 'given'} target, {t} tokens)", fontsize=8)
        drawn.append((xs, ys))
    fig.tight_layout()
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
    return drawn
