"""Turn command-line specs into models and data.

MODEL: ``package.module:factory`` (a callable returning an nn.Module, called with the
``--model-arg key=value`` pairs), a TorchScript file, a torch.export ``.pt2`` file, or
``hf:DIR``: a local Hugging Face causal-LM directory (``save_pretrained``) with its tokenizer,
loaded with ``local_files_only=True`` (nothing is downloaded; needs the ``hf`` extra).
DATA: ``package.module:factory`` (returning a Dataset, DataLoader or array, called with the
``--data-arg key=value`` pairs), a ``.npy`` file, or ``file.h5:dataset``.
Modules are imported as ``python -m fastattr`` would: the current directory comes first.

What loading executes: a ``module:factory`` spec imports the module and calls the factory
(arbitrary Python); ``torch.export.load`` unpickles parts of a ``.pt2`` archive (arbitrary code
on load); ``hf:DIR`` runs transformers' loaders (safetensors weights; a directory whose config
asks for remote code is refused, as trust_remote_code stays False); a TorchScript file's code runs in the TorchScript interpreter when the model is
called. Data paths never unpickle (``.npy`` with ``allow_pickle=False``, HDF5 through h5py).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .errors import SpecError


def parse_kv(pairs: Sequence[str]) -> dict[str, Any]:
    """['depth=3', 'name=x', 'pretrained=false'] -> {'depth': 3, 'name': 'x', 'pretrained': False}."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"expected key=value, got {pair!r}")
        low = raw.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                continue
        else:
            out[key] = raw
    return out


def _call_factory(spec: str, kwargs: dict[str, Any]) -> Any:
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the console script lacks python -m's cwd entry
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot import {module_name!r} from {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise SpecError(f"{module_name} has no attribute {attr!r}")
    if not callable(factory):
        return factory
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise SpecError(f"{spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) raised {type(exc).__name__}: {exc}") from exc


HF_PREFIX = "hf:"


def _hf_directory(spec: str) -> str:
    """The local directory of ``hf:DIR`` (or a bare DIR), once it exists and transformers imports."""
    path = spec.removeprefix(HF_PREFIX)
    if not os.path.isdir(path):
        raise SpecError(f"{spec}: no such directory; hf: takes a local Hugging Face model directory (written by save_pretrained)")
    try:
        import transformers  # noqa: F401 - only to say what is missing
    except ImportError as exc:
        raise SpecError(f"{spec}: loading Hugging Face models needs transformers: pip install 'fastattr[hf]' ({exc})") from exc
    return path


def load_tokenizer(spec: str) -> Any:
    """The tokenizer saved in a local Hugging Face directory (``hf:DIR`` or DIR), local files only."""
    path = _hf_directory(spec)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(f"{spec}: no usable tokenizer in the directory ({type(exc).__name__}: {exc}); save it there with tokenizer.save_pretrained") from exc


def load_hf(spec: str, device: str | None = None) -> tuple[torch.nn.Module, Any]:
    """``hf:DIR`` -> (causal LM in eval mode on ``device``, its tokenizer), from local files only."""
    path = _hf_directory(spec)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise SpecError(f"{spec}: not a loadable causal-LM directory ({type(exc).__name__}: {exc})") from exc
    tokenizer = load_tokenizer(spec)
    if device:
        model = model.to(device)
    return model.eval(), tokenizer


def load_model(spec: str, kwargs: dict[str, Any] | None = None, device: str | None = None) -> torch.nn.Module:
    """The model for a spec, in eval mode, on ``device`` (attribution explains inference)."""
    if spec.startswith(HF_PREFIX):
        if kwargs:
            raise SpecError(f"--model-arg is for a package.module:factory model spec; {spec!r} is a Hugging Face directory")
        return load_hf(spec, device)[0]
    if os.path.isfile(spec):
        if spec.endswith(".pt2"):
            model = torch.export.load(spec).module()
        else:
            try:
                model = torch.jit.load(spec, map_location="cpu")
            except Exception as exc:
                raise SpecError(f"{spec} is not a TorchScript file ({exc}); use package.module:factory for eager models") from exc
    elif ":" in spec:
        model = _call_factory(spec, kwargs or {})
    else:
        raise SpecError(f"no such model file, and not a package.module:factory spec: {spec!r}")
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    if device:
        model = model.to(device)
    if hasattr(model, "eval") and not spec.endswith(".pt2"):  # exported programs have no train mode to leave
        model.eval()
    return model


def load_data(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """A data spec as something fastattr.run accepts (paths pass through; factories get ``kwargs``)."""
    if spec.endswith((".npy", ".jsonl")) or (":" in spec and spec.rpartition(":")[0].endswith((".h5", ".hdf5"))):
        if kwargs:
            raise SpecError(f"--data-arg is for a package.module:factory data spec; {spec!r} is a file")
        return spec
    if ":" in spec:
        return _call_factory(spec, kwargs or {})
    raise SpecError(f"data must be a .npy file, file.h5:dataset, prompts.jsonl (LLM runs) or package.module:factory; got {spec!r}")
