"""fastattr: GPU-accelerated batch attribution for PyTorch, Captum-compatible.

    from fastattr import IntegratedGradients
    attr, delta = IntegratedGradients(model).attribute(x, target=t, return_convergence_delta=True)
"""

from __future__ import annotations

import logging

from .inputs import AttributionInputError, NoGradientError
from .methods import InputXGradient, IntegratedGradients, Saliency
from .precision import PRECISIONS
from .quadrature import RULES

__version__ = "0.1.0"

__all__ = [
    "AttributionInputError",
    "InputXGradient",
    "IntegratedGradients",
    "NoGradientError",
    "PRECISIONS",
    "RULES",
    "Saliency",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
