"""Pictures of stored attributions: heatmaps over images, bar charts for vectors and tokens.

Colours are diverging and centred at zero (red positive, blue negative), clipped at a
percentile of |attribution| so a few extreme values do not wash out the rest. Needs
matplotlib (``pip install fastattr[bench]`` or ``pip install matplotlib``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import RenderError  # noqa: F401 - re-exported


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), or RenderError naming the fix."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RenderError("rendering needs matplotlib: pip install matplotlib (or fastattr[render])") from exc
    return plt


def render_grid(
    attributions: np.ndarray,
    out_path: str,
    *,
    inputs: np.ndarray | None = None,
    indices: list[int] | None = None,
    titles: list[str] | None = None,
    percentile: float = 99.0,
    size: tuple[int, int] = (1200, 900),
    image: bool | None = None,
) -> None:
    """Draw one panel per sample into a PNG of ``size`` pixels.

    attributions (N, C, H, W) or (N, H, W): heatmaps (channels summed), overlaid on the
    inputs when given; (N, F) or (N, T, D): bar charts (D summed, per token). ``image``: draw
    (N, H, W) as heatmaps (True) or bar charts (False) whatever their size (default: heatmaps above 8x8).
    """
    plt = pyplot()
    n = attributions.shape[0]
    if n == 0:
        raise RenderError("no samples to render")
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    dpi = 100
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False)
    if not 0 <= percentile <= 100:
        raise RenderError(f"percentile must be in [0, 100], got {percentile:g}")
    image_like = attributions.ndim == 4 or (attributions.ndim == 3 and attributions.shape[1] > 8 and attributions.shape[2] > 8)
    image_like = image_like if image is None or attributions.ndim != 3 else image
    if inputs is not None and (len(inputs) != n or (image_like and tuple(inputs.shape[-2:]) != tuple(attributions.shape[-2:]))):
        # another data set's images would be drawn under these heatmaps, stretched or shifted
        raise RenderError(f"the inputs have shape {tuple(inputs.shape)} but the attributions {tuple(attributions.shape)}: give the run's own data")
    for k, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= n:
            ax.axis("off")
            continue
        a = attributions[k].astype(np.float64)
        a = np.where(np.isfinite(a), a, 0.0)
        if image_like:
            heat = a.sum(0) if a.ndim == 3 else a
            lim = np.percentile(np.abs(heat), percentile) or 1e-12
            if inputs is not None:
                img = inputs[k].astype(np.float64)
                img = img.mean(0) if img.ndim == 3 else img
                ax.imshow((img - img.min()) / (np.ptp(img) or 1.0), cmap="gray")
                ax.imshow(np.clip(heat, -lim, lim), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6)
            else:
                ax.imshow(np.clip(heat, -lim, lim), cmap="RdBu_r", vmin=-lim, vmax=lim)
        else:
            bars = a.sum(-1) if a.ndim == 2 else a.reshape(-1)
            lim = np.percentile(np.abs(bars), percentile) or 1e-12
            clipped = np.clip(bars, -lim, lim)
            ax.bar(np.arange(bars.size), clipped, color=np.where(clipped >= 0, "#c0392b", "#2e6db4"), width=0.9)
            ax.axhline(0, color="black", linewidth=0.5)
            ax.set_ylim(-lim * 1.05, lim * 1.05)
        label = titles[k] if titles else (f"#{indices[k]}" if indices else f"{k}")
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=dpi)
    plt.close(fig)
