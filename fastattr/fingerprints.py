"""Fingerprints of a run's model and data: what a resume compares to refuse a changed run.

A run records both in its manifest's config; the store refuses a resume whose config differs
and names the differing keys (e.g. ``fingerprints.model.modules`` or
``fingerprints.data.blocks.512:576``). So each fingerprint is a small dict whose keys name
what a user could have changed:

model: ``parameters`` (names, dtypes, shapes and values of parameters and buffers),
``modules`` (the module tree: names, classes, ``extra_repr``, hooks) and ``code`` (the source
of every model class that is not torch's own, TorchScript code, torch.fx / torch.export
graph code).

data: ``kind`` "full" (arrays, memory-mapped .npy, HDF5: every byte hashed, in up to
MAX_BLOCKS blocks of samples so a change is named by its sample range) or "strided:k"
(Datasets and DataLoaders, whose items may be expensive to produce: k items evenly spaced
over the data, first and last included), plus count, shapes, dtypes and whether it has labels.
Everything is hashed from bytes and sources, never from ids or addresses, so two processes
loading the same model and data agree.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import SourceError

if TYPE_CHECKING:
    from .sources import Source

logger = logging.getLogger(__name__)

MAX_BLOCKS = 64  # "full" data fingerprints: hashes per run, so a change is named within n/64 samples
STRIDED_ITEMS = 64  # items read for a "strided" fingerprint
READ_BYTES = 64 * 2**20  # rows read at once while hashing (bounded memory for HDF5 and tensors)


# -- model ------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """{"parameters", "modules", "code"}: sha256 hex digests, see the module docstring."""
    params = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        params.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        params.update(_bytes(t))
    tree, code = hashlib.sha256(), hashlib.sha256()
    classes: dict[str, type] = {}
    for name, m in model.named_modules():
        cls = type(m)
        kind = getattr(m, "original_name", None) if isinstance(m, torch.jit.ScriptModule) else None  # TorchScript keeps the eager class name
        hooks = [_callable_name(h) for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()]
        tree.update(f"{name}|{cls.__module__}.{cls.__qualname__}|{kind}|{_extra_repr(m)}|{hooks}\n".encode())
        for klass in cls.__mro__:
            if not _is_torch_or_builtin(klass):
                classes[f"{klass.__module__}.{klass.__qualname__}"] = klass
        code.update(f"{name}\n".encode())
        code.update(_module_code(m).encode())
    for qualname in sorted(classes):
        code.update(f"class {qualname}\n".encode())
        code.update(_class_source(classes[qualname]))
    return {"parameters": params.hexdigest(), "modules": tree.hexdigest(), "code": code.hexdigest()}


def _extra_repr(m: torch.nn.Module) -> str:
    try:
        return m.extra_repr()
    except Exception as exc:  # a user's extra_repr that fails must not stop the run
        return f"<extra_repr raised {type(exc).__name__}>"


def _callable_name(f: Any) -> str:
    return f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


def _is_torch_or_builtin(klass: type) -> bool:
    mod = klass.__module__ or ""
    return mod == "builtins" or mod == "torch" or mod.startswith("torch.")


def _module_code(m: torch.nn.Module) -> str:
    """Code the module itself carries: every TorchScript method, or an fx GraphModule's code."""
    if isinstance(m, torch.jit.ScriptModule):
        parts = []
        for method in sorted(m._c._method_names()):
            try:
                parts.append(m._c._get_method(method).code)
            except Exception:  # noqa: BLE001 - fall back to the graph, still deterministic
                parts.append(str(getattr(m, method).graph))
        return "\n".join(parts)
    if isinstance(m, torch.fx.GraphModule):
        return m.code
    return ""


def _class_source(klass: type) -> bytes:
    """A user class's source; where there is none (defined in a REPL), its functions' bytecode."""
    try:
        return inspect.getsource(klass).encode()
    except (OSError, TypeError):
        h = hashlib.sha256()
        for name, value in sorted(vars(klass).items()):
            fn = getattr(value, "__func__", value)
            if hasattr(fn, "__code__"):
                h.update(name.encode())
                _hash_code(h, fn.__code__)
        return h.digest()


def _hash_code(h: Any, code: Any) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):  # nested functions: their repr holds an address
            _hash_code(h, const)
        else:
            h.update(repr(const).encode())


# -- data -------------------------------------------------------------------------------------------


def data_fingerprint(source: Source) -> dict[str, Any]:
    """Count, shapes, dtypes, labels and a hash of the contents ("full") or of a strided sample."""
    n = len(source)
    if n == 0:
        raise SourceError("the dataset is empty")
    fp: dict[str, Any] = {"count": n, "shapes": [list(s) for s in source.sample_shapes], "dtypes": list(source.sample_dtypes), "labels": source.has_labels}
    if source.full_fingerprint:
        rows = math.ceil(n / MAX_BLOCKS)
        ranges = [(s, min(n, s + rows)) for s in range(0, n, rows)]
        workers = max(1, min(8, os.cpu_count() or 1, len(ranges)))
        # hashlib and numpy's memory-mapped reads release the GIL: blocks hash in parallel
        with ThreadPoolExecutor(workers, thread_name_prefix="fastattr-fingerprint") as pool:
            digests = list(pool.map(lambda r: _hash_rows(source, *r), ranges))
        fp["kind"] = "full"
        fp["blocks"] = {f"{a}:{b}": d for (a, b), (d, _) in zip(ranges, digests)}
        if source.has_labels:
            fp["labels_sha256"] = hashlib.sha256("".join(lab for _, lab in digests).encode()).hexdigest()[:32]
        return fp
    k = min(n, STRIDED_ITEMS)
    picks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    h = hashlib.sha256()
    for i in picks:
        xs, labels = source._read(i, i + 1)
        for x in xs:
            h.update(_bytes(x))
        if labels is not None:
            h.update(_bytes(labels))
    fp["kind"] = f"strided:{len(picks)}"
    fp["sample_sha256"] = h.hexdigest()[:32]
    return fp


def _hash_rows(source: Source, start: int, stop: int) -> tuple[str, str]:
    """(inputs digest, labels digest) of samples [start, stop), read in bounded pieces. One hash
    per input (and one for labels), so the digests do not depend on how the rows are split."""
    sample_bytes = max(1, sum(math.prod(s) for s in source.sample_shapes) * 8)
    step = max(1, READ_BYTES // sample_bytes)
    hs = [hashlib.sha256() for _ in source.sample_shapes]
    lab = hashlib.sha256()
    for s in range(start, stop, step):
        xs, labels = source._read(s, min(stop, s + step))
        for h, x in zip(hs, xs):
            h.update(_bytes(x))
        if labels is not None:
            lab.update(_bytes(labels))
    inputs = hashlib.sha256("".join(h.hexdigest() for h in hs).encode()).hexdigest()[:32]
    return inputs, lab.hexdigest()[:32]


def _bytes(a: Any) -> Any:
    """A contiguous buffer of an array's or tensor's bytes (no copy where it already is one)."""
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy() if t.numel() else b""
    arr = np.ascontiguousarray(a)
    return arr.reshape(-1).view(np.uint8) if arr.size else b""
