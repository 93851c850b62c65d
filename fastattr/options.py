"""fastattr's own keyword options, parsed and validated in one place.

Every attribution class takes Captum's positional parameters plus these keyword-only extras
(``**options``); ``Options.parse`` checks them all before any model work and hands the method
one frozen ``Options``. A prepared ``Options`` can be passed whole, like zarr's ``ArrayConfig``::

    opts = fastattr.Options(precision="bf16", max_rows=256, output="logits")
    IntegratedGradients(model).attribute(x, target=t, options=opts)            # or
    IntegratedGradients(model).attribute(x, target=t, precision="bf16", max_rows=256, output="logits")

Keyword given next to ``options=`` override it. Invalid values raise ``OptionError`` (a
``ValueError``); a keyword a class does not take raises ``TypeError`` as Python does.

Model outputs (``output``): fastattr attributes one tensor of the model's output. A tensor is
used as it is; an object with a tensor ``.logits`` (Hugging Face ``ModelOutput``, torchvision's
Inception/GoogLeNet namedtuples) or a mapping with a ``"logits"`` key gives that; a 1-tuple
gives its element. Anything else needs ``output=``: a key (mapping key or attribute name), an
index (tuples, lists), or a callable ``output(model_output) -> tensor``.

``forward_kwargs``: keyword arguments for the model's forward (``attention_mask=...``), treated
like ``additional_forward_args``: tensors whose first dim is the batch follow their example's rows
(steps, noise copies, chunks), everything else is passed as given.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict

try:
    from typing import Unpack  # Python 3.11+
except ImportError:  # Python 3.10: torch depends on typing_extensions
    from typing_extensions import Unpack

import numpy as np
import torch

from .budget import parse_bytes
from .errors import AttributionInputError, OptionError
from .precision import AUTO, POLICIES, PRECISIONS, Precision, get_precision

logger = logging.getLogger(__name__)

__all__ = ["Options", "OptionsDict", "Unpack", "positive_int", "select_output"]

KERNEL_BACKENDS = (None, "auto", "triton", "torch")
OutputSelector = str | int | Callable[[Any], torch.Tensor] | None


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (numpy integers accepted, bools refused), or OptionError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else positive_int(name, value)


@dataclass(frozen=True)
class Options:
    """fastattr's keyword options (see the module docstring); validated on construction."""

    precision: str = "fp32"  # fp32, tf32, bf16, fp16: the forward/backward policy; "auto": chosen by a probe
    max_rows: int | None = None  # most rows one forward may see (Captum's internal_batch_size)
    memory_budget: int | None = None  # bytes (or "8GiB" on input): bounds rows per forward (CUDA probe; CPU saved-tensor estimate)
    allow_nonfinite: bool = False  # accept NaN/inf in inputs and baselines
    kernel_backend: str | None = None  # "auto", "triton", "torch" (None: FASTATTR_KERNELS or auto)
    channels_last: bool | None = None  # None: by device and precision, with a fallback (fastattr/engine.py)
    tolerance: float | None = None  # n_steps="auto" only; checked by fastattr/adaptive.py
    max_steps: int | None = None
    abs_tolerance: float | None = None
    min_steps: int | None = None
    output: OutputSelector = None  # which tensor of the model's output to attribute
    forward_kwargs: Mapping[str, Any] | None = None  # keyword arguments for the model's forward
    # precision probe (fastattr/probe.py): the first probe_samples samples attributed in fp32 and in the
    # policy; its relative L2 error is kept in method.last_probe and warned about over precision_warn
    probe: bool = False
    probe_samples: int = 4
    precision_tolerance: float = 0.01  # precision="auto": the largest probe error a faster policy may have
    precision_warn: float = 0.01
    compile: bool = False  # torch.compile the model's forward per chunk (dynamic=False, fixed chunk shapes; engine.py)

    def __post_init__(self) -> None:
        if isinstance(self.precision, Precision):
            object.__setattr__(self, "precision", self.precision.name)
        if self.precision not in POLICIES:
            raise OptionError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}; or 'auto' (the fastest within precision_tolerance)")
        if not isinstance(self.probe, bool):
            raise OptionError(f"probe must be True or False, got {self.probe!r}")
        object.__setattr__(self, "probe_samples", positive_int("probe_samples", self.probe_samples))
        for name in ("precision_tolerance", "precision_warn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise OptionError(f"{name} must be a number >= 0 (a relative L2 error, 0.01 = 1%), got {value!r}")
        object.__setattr__(self, "max_rows", optional_positive_int("max_rows", self.max_rows))
        object.__setattr__(self, "memory_budget", parse_bytes(self.memory_budget))
        if self.memory_budget is not None and self.memory_budget < 1:
            raise OptionError(f"memory_budget must be positive, got {self.memory_budget!r}")
        for name in ("allow_nonfinite", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.channels_last not in (None, True, False):
            raise OptionError(f"channels_last must be None (by device and precision), True or False, got {self.channels_last!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise OptionError(f"kernel backend must be one of {KERNEL_BACKENDS[1:]} (or None), got {self.kernel_backend!r}")
        check_selector(self.output)
        if self.forward_kwargs is not None:
            if not isinstance(self.forward_kwargs, Mapping) or not all(isinstance(k, str) for k in self.forward_kwargs):
                raise OptionError(f"forward_kwargs must be a dict of keyword arguments, got {type(self.forward_kwargs).__name__}")
            object.__setattr__(self, "forward_kwargs", dict(self.forward_kwargs))

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, kwargs: Mapping[str, Any], accepted: frozenset[str], owner: str) -> Options:
        """The options of one call: ``options=`` (an Options) overridden by the keywords given.
        A keyword not in ``accepted`` is a TypeError naming ``owner`` (e.g. "Saliency.attribute")."""
        given = dict(kwargs)
        base = given.pop("options", None)
        unknown = sorted(set(given) - accepted)
        if unknown:
            raise TypeError(f"{owner}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; it takes {', '.join(sorted(accepted))}")
        if base is None:
            return cls(**given)
        if not isinstance(base, Options):
            raise OptionError(f"options must be a fastattr.Options, got {type(base).__name__}")
        return dataclasses.replace(base, **given) if given else base

    def with_rows(self, name: str, value: Any) -> Options:
        """Merge Captum's ``internal_batch_size`` (or another row cap named ``name``) into max_rows."""
        value = optional_positive_int(name, value)
        if value is None or value == self.max_rows:
            return self
        if self.max_rows is not None:
            raise OptionError(f"max_rows={self.max_rows} and {name}={value} disagree; pass one")
        return dataclasses.replace(self, max_rows=value)

    # ------------------------------------------------------------------ uses
    @property
    def policy(self) -> Precision:
        if self.precision == AUTO:
            raise OptionError("precision='auto' must be resolved by a probe before an engine is built (fastattr/probe.py)")
        return get_precision(self.precision)

    def adaptive(self) -> dict[str, Any]:
        """The n_steps='auto' settings actually given (fastattr.adaptive.resolve takes these)."""
        names = ("tolerance", "max_steps", "abs_tolerance", "min_steps")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def engine(self, forward_func: Callable[..., Any], precision: str | Precision | None = None, **overrides: Any) -> Any:
        """An Engine for ``forward_func`` under these options (``precision`` / overrides for the
        fp32 side passes: F(x), F(x0), adaptive nodes)."""
        from .engine import Engine  # engine imports this module

        kw: dict[str, Any] = dict(
            max_rows=self.max_rows, memory_budget=self.memory_budget, kernel_backend=self.kernel_backend, output=self.output, compile=self.compile
        )
        kw.update(overrides)
        return Engine(forward_func, get_precision(precision or self.precision), **kw)

    @property
    def kwargs(self) -> dict[str, Any]:
        """forward_kwargs, never None."""
        return dict(self.forward_kwargs or {})


class OptionsDict(TypedDict, total=False):
    """The keywords ``**options`` takes (for type checkers and IDEs; fields as in Options)."""

    options: Options
    precision: str
    max_rows: int | None
    memory_budget: int | str | None
    allow_nonfinite: bool
    kernel_backend: str | None
    channels_last: bool | None
    tolerance: float | None
    max_steps: int | None
    abs_tolerance: float | None
    min_steps: int | None
    output: OutputSelector
    forward_kwargs: Mapping[str, Any] | None
    probe: bool
    probe_samples: int
    precision_tolerance: float
    precision_warn: float
    compile: bool


FIELDS = frozenset(f.name for f in dataclasses.fields(Options))
ADAPTIVE = frozenset({"tolerance", "max_steps", "abs_tolerance", "min_steps"})
GRADIENT = FIELDS - ADAPTIVE  # Saliency, InputXGradient, GradientShap
PATH = FIELDS  # IntegratedGradients, LayerIntegratedGradients
PROBE = frozenset({"probe", "probe_samples", "precision_tolerance", "precision_warn"})
CAPTURE = frozenset({"precision", "max_rows", "kernel_backend", "forward_kwargs"}) | PROBE  # LayerActivation


# ---------------------------------------------------------------------- model outputs


def check_selector(selector: Any) -> None:
    if selector is None or callable(selector) or isinstance(selector, str):
        return
    if isinstance(selector, (int, np.integer)) and not isinstance(selector, bool):
        return
    raise OptionError(f"output must be None, a key (str), an index (int) or a callable, got {type(selector).__name__}")


def select_output(value: Any, selector: OutputSelector = None) -> torch.Tensor:
    """The tensor to attribute from a model's output (see the module docstring)."""
    if isinstance(value, torch.Tensor) and selector is None:
        return value
    if selector is None:
        logits = value.get("logits") if isinstance(value, Mapping) else getattr(value, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
        if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], torch.Tensor):
            return value[0]
        raise AttributionInputError(
            f"the model must return a tensor, got {_describe(value)}; pass output= to pick one: a key, an index or a callable "
            "(an output with a .logits tensor or a 'logits' key is used without it)"
        )
    try:
        if callable(selector):
            picked = selector(value)
        elif isinstance(selector, str):
            picked = value[selector] if isinstance(value, Mapping) else getattr(value, selector)
        else:
            picked = value[int(selector)]
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise AttributionInputError(f"output={selector!r} cannot select from the model's output {_describe(value)}: {type(e).__name__}: {e}") from None
    if not isinstance(picked, torch.Tensor):
        raise AttributionInputError(f"output={selector!r} selected a {type(picked).__name__} from the model's output; it must select a tensor")
    return picked


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"{type(value).__name__} with keys {list(value)[:8]}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value[:4])}{', ...' if len(value) > 4 else ''})"
    return type(value).__name__
