"""fastattr: GPU-accelerated batch attribution for PyTorch, Captum-compatible.

    from fastattr import IntegratedGradients
    attr, delta = IntegratedGradients(model).attribute(x, target=t, return_convergence_delta=True)

    fastattr.run(model, dataset, out="runs/ig", target="predicted")   # whole datasets -> HDF5 shards
    store = fastattr.open("runs/ig")                                   # lazy reader for audits
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from . import store  # noqa: E402, F401 - fastattr.store.verify_run etc.
from .activations import LayerActivation  # noqa: E402
from .errors import AttributionInputError, FastattrError, NoGradientError  # noqa: E402
from .gradient_shap import GradientShap  # noqa: E402
from .layer_gradient_x_activation import LayerGradientXActivation  # noqa: E402
from .layer_methods import LayerIntegratedGradients  # noqa: E402
from .llm import LLMGradientAttribution  # noqa: E402
from .methods import InputXGradient, IntegratedGradients, Saliency  # noqa: E402
from .noise_tunnel import NoiseTunnel  # noqa: E402
from .options import Options  # noqa: E402
from .precision import PRECISIONS  # noqa: E402
from .quadrature import RULES  # noqa: E402
from .runner import RunSummary, run  # noqa: E402
from .store import open_run as open  # noqa: E402, A001 - the documented reader: fastattr.open(run_dir)

__all__ = [
    "AttributionInputError",
    "FastattrError",
    "GradientShap",
    "InputXGradient",
    "IntegratedGradients",
    "LayerActivation",
    "LayerIntegratedGradients",
    "LayerGradientXActivation",
    "LLMGradientAttribution",
    "NoGradientError",
    "NoiseTunnel",
    "Options",
    "PRECISIONS",
    "RULES",
    "RunSummary",
    "Saliency",
    "__version__",
    "open",
    "run",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
