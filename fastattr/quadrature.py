"""Quadrature rules for the integrated-gradients path integral over alpha in [0, 1].

Rules carry Captum's names and Captum's exact points and weights, so results match
Captum's to rounding. One addition: "trapezoid" is the mathematically correct
composite trapezoid rule (weights sum to 1). Captum's "riemann_trapezoid" places
n points on [0, 1] but uses weights 1/n with halved ends, so its weights sum to
1 - 1/n and every attribution is scaled by that factor; it is kept for parity.

Points and weights are computed once per (rule, n) and cached; the engine moves
them to the device once per call.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .errors import OptionError
from .options import positive_int

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "trapezoid")


@functools.lru_cache(maxsize=256)
def _rule(method: str, n_steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if method not in RULES:
        raise OptionError(f"unknown integration method {method!r}; choose one of {', '.join(RULES)}")
    n = positive_int("n_steps", n_steps)
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return tuple(0.5 * (1 + x)), tuple(0.5 * w)
    if n < 2:
        raise OptionError(f"method {method!r} needs n_steps >= 2, got {n}")
    # Captum builds Riemann points with float32 torch.linspace; do the same for parity.
    if method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n, n).tolist()
    elif method == "riemann_right":
        alphas = torch.linspace(1 / n, 1, n).tolist()
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n).tolist()
    else:
        alphas = torch.linspace(0, 1, n).tolist()
    if method == "trapezoid":
        weights = [1 / (n - 1)] * n
    else:
        weights = [1 / n] * n
    if method in ("riemann_trapezoid", "trapezoid"):
        weights[0] /= 2
        weights[-1] /= 2
    return tuple(alphas), tuple(weights)


def points_and_weights(method: str, n_steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(alphas, weights) of a rule with n_steps points, cached."""
    if not isinstance(method, str):
        raise OptionError(f"method must be a rule name ({', '.join(RULES)}), got {method!r}")
    return _rule(method, positive_int("n_steps", n_steps))
