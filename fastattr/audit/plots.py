"""The audit report's PNG plots (matplotlib's pyplot is passed in: it is imported only when a
report is written)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

DPI = 100


def _hist(ax: Any, dist: dict[str, Any], title: str, log: bool = False) -> None:
    edges = np.asarray(dist["histogram"]["edges"])
    counts = np.asarray(dist["histogram"]["counts"])
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#2e6db4", edgecolor="none")
    if log:
        ax.set_xscale("log")
        nz = np.flatnonzero(counts)
        if nz.size:  # zoom to the occupied decades
            ax.set_xlim(edges[max(nz[0] - 2, 0)], edges[min(nz[-1] + 3, len(edges) - 1)])
    extra = dist["histogram"]["underflow"] + dist["histogram"]["overflow"]
    note = f" ({dist['histogram']['underflow']} below, {dist['histogram']['overflow']} above the range)" if extra else ""
    ax.set_title(title + note, fontsize=9)
    ax.set_ylabel("samples")


def plot_residuals(plt: Any, doc: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=DPI)
    _hist(axes[0], doc["residual"]["abs"], "|delta|", log=True)
    _hist(axes[1], doc["residual"]["rel"], "|delta| / |F(x) - F(x0)|", log=True)
    fig.suptitle("completeness residual")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_pair(plt: Any, left: tuple[dict, str], right: tuple[dict, str], title: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=DPI)
    for ax, (dist, label) in zip(axes, (left, right)):
        _hist(ax, dist, label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_localization(plt: Any, loc: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=DPI)
    _hist(ax, loc["mass_inside"], "share of |attr| inside the mask")
    ax.axvline(loc["mask_fraction"], color="#c0392b", linestyle="--", label=f"uniform random attribution ({loc['mask_fraction']:.3f})")
    ax.legend(fontsize=8)
    fig.suptitle(f"localization (pointing game {loc['pointing_game']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_class_maps(plt: Any, maps: dict[str, np.ndarray], path: Path) -> None:
    keys = list(maps)
    cols = min(len(keys), 8)
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols + 0.5, 2.3 * rows + 0.4), dpi=DPI, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        m = np.asarray(maps[key], dtype=np.float64)
        image = m.ndim == 2 or (m.ndim == 3 and m.shape[1] > 1 and m.shape[2] > 1)
        if image:
            heat = m.sum(0) if m.ndim == 3 else m
            lim = float(np.nanmax(np.abs(heat))) if np.isfinite(heat).any() else 0.0  # NaN: positions no sample reaches
            lim = lim or 1e-12
            ax.imshow(heat, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            bars = m.reshape(-1)
            ax.bar(np.arange(bars.size), bars, color=np.where(bars >= 0, "#c0392b", "#2e6db4"))
            ax.axhline(0, color="black", linewidth=0.5)
        ax.set_title(f"target {key}", fontsize=9)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle("mean attribution per target class (red positive, blue negative)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_perturbation(plt: Any, pert: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=DPI)
    x = pert["fraction"]
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher")):
        ax.plot(x, pert[kind]["curve"], color="#c0392b", label=f"attribution order, AUC {pert[kind]['auc']:.3f}")
        rc = pert["random_control"][kind]
        ax.plot(x, rc["curve"], color="gray", linestyle="--", label=f"random order, AUC {rc['auc']:.3f}")
        ax.set_xlabel(f"fraction of features {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel(f"model score ({pert['score']})")
        ax.set_title(f"{kind} ({better} AUC is better)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{pert['samples']} samples, {pert['steps']} steps, replacement: {pert['replacement']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_randomization(plt: Any, rnd: dict[str, Any], outcome: str, path: Path) -> None:
    labels = ["none (reproduced)"] + [f"{'down to ' if rnd['mode'] == 'cascade' else ''}{r['layer']}" for r in rnd["layers"]]
    values = [rnd["reproduced"]] + [r["similarity"] for r in rnd["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.0), dpi=DPI)
    ax.plot(range(len(values)), values, marker="o", color="#2e6db4", label="Spearman of |attr| vs stored")
    ax.axhline(rnd["max_similarity"], color="#c0392b", linestyle="--", label=f"pass below {rnd['max_similarity']:g}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(min(-0.1, min((v for v in values if v == v), default=0) - 0.05), 1.05)
    ax.set_ylabel("similarity")
    ax.set_title(f"randomization check ({rnd['mode']}): {outcome}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
