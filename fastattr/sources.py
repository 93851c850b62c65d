"""Data sources for dataset-wide runs: random access by global sample index.

Every source answers ``len()``, ``read(start, stop)`` -> (inputs, labels) for a
contiguous range, the per-sample shapes and dtypes, and a fingerprint for resume checks
(fastattr/fingerprints.py: the full contents of arrays, .npy and HDF5 data; a strided
sample of a Dataset's items). Sources read only the rows asked for: ``.npy`` files are
memory-mapped and HDF5 datasets are sliced, so a dataset larger than memory streams through.
Nothing here unpickles: ``.npy`` files load with ``allow_pickle=False``, HDF5 through h5py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import SourceError  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

Array = np.ndarray | torch.Tensor


def _as_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # memory-mapped rows are read-only


class Source:
    """Base: subclasses implement __len__ and _read(start, stop)."""

    has_labels: bool = False
    full_fingerprint: bool = False  # True: cheap to read whole, so the fingerprint hashes every sample

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, start: int, stop: int) -> tuple[tuple[Array, ...], Array | None]:  # pragma: no cover
        raise NotImplementedError

    def read(self, start: int, stop: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Inputs (tuple of (rows, *shape) CPU tensors) and labels ((rows,) int64 or None)."""
        inputs, labels = self._read(start, stop)
        xs = tuple(_as_tensor(x) for x in inputs)
        for i, (x, shape) in enumerate(zip(xs, self.sample_shapes)):
            if tuple(x.shape[1:]) != shape or x.shape[0] != stop - start:
                # a Dataset's batch stacks only if its items agree, so the batch's first sample differs too
                raise SourceError(
                    f"sample {start}: input {i} has shape {tuple(x.shape[1:])} (read as samples [{start}, {stop}): {tuple(x.shape)}); "
                    f"expected {shape} like sample 0"
                )
        return xs, None if labels is None else _as_tensor(labels).reshape(-1).long()

    @property
    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        if not hasattr(self, "_shapes"):
            xs, _ = self._read(0, 1)
            self._shapes = tuple(tuple(_as_tensor(x).shape[1:]) for x in xs)
            self._torch_dtypes = tuple(_as_tensor(x).dtype for x in xs)
        return self._shapes

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Each input's dtype (as the first sample has it)."""
        self.sample_shapes  # noqa: B018 - reads the first sample once
        return self._torch_dtypes

    @property
    def sample_dtypes(self) -> tuple[str, ...]:
        return tuple(str(d) for d in self.dtypes)

    def fingerprint(self) -> dict:
        """What a resume compares: see fastattr/fingerprints.py ("full" or "strided:k")."""
        from .fingerprints import data_fingerprint

        return data_fingerprint(self)


class ArraySource(Source):
    """In-memory or memory-mapped arrays: one array, or a tuple of arrays (multi-input)."""

    full_fingerprint = True

    def __init__(self, inputs: Array | Sequence[Array], labels: Array | None = None, name: str = "array") -> None:
        self.inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        if not self.inputs or any(not hasattr(x, "shape") or len(x.shape) < 1 for x in self.inputs):
            raise SourceError(f"{name}: inputs must be arrays with a leading sample dimension")
        counts = {x.shape[0] for x in self.inputs}
        if labels is not None:
            counts.add(len(labels))
        if len(counts) != 1:
            raise SourceError(f"{name}: inputs and labels disagree on the number of samples: {sorted(counts)}")
        self.labels = labels
        self.has_labels = labels is not None
        self.name = name

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def _read(self, start: int, stop: int) -> tuple[tuple[Array, ...], Array | None]:
        return tuple(x[start:stop] for x in self.inputs), None if self.labels is None else self.labels[start:stop]


class H5Source(ArraySource):
    """``file.h5:dataset`` inputs, sliced per batch (labels arrive resolved, see open_source)."""

    def __init__(self, spec: str, labels: Array | None = None) -> None:
        import h5py

        path, dataset = _split_h5(spec)
        self._file = h5py.File(path, "r")
        if dataset not in self._file:
            raise SourceError(f"{path} has no dataset {dataset!r} (has: {', '.join(self._file.keys())})")
        super().__init__(self._file[dataset], labels, name=spec)

    def _read(self, start: int, stop: int) -> tuple[tuple[Array, ...], Array | None]:
        return tuple(np.asarray(x[start:stop]) for x in self.inputs), None if self.labels is None else self.labels[start:stop]


def _split_h5(spec: str) -> tuple[str, str]:
    path, sep, dataset = spec.rpartition(":")
    if not sep or not path.endswith((".h5", ".hdf5")):
        raise SourceError(f"HDF5 data must be given as 'file.h5:dataset', got {spec!r}")
    if not os.path.exists(path):
        raise SourceError(f"no such file: {path}")
    return path, dataset


def load_npy(path: str) -> np.ndarray:
    """A .npy file, memory-mapped, never unpickled (object arrays are refused, not loaded)."""
    if not os.path.exists(path):
        raise SourceError(f"no such file: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays: "cannot be memory-mapped" / "allow_pickle=False"
        raise SourceError(f"{path}: {exc}; fastattr reads numeric .npy arrays only and never unpickles data") from exc


def _load_labels(spec: str) -> np.ndarray:
    """Labels named by a path: ``labels.npy`` (memory-mapped) or ``file.h5:dataset`` (read whole:
    one integer per sample)."""
    if spec.endswith(".npy"):
        return load_npy(spec)
    import h5py

    path, dataset = _split_h5(spec)
    with h5py.File(path, "r") as f:
        if dataset not in f:
            raise SourceError(f"{path} has no dataset {dataset!r}")
        return f[dataset][()]


class DatasetSource(Source):
    """A map-style torch Dataset. Items are an input, a tuple of inputs, or (inputs, label)
    where the label is an int or 0-d tensor (usable as target="label")."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise SourceError("a Dataset source must be map-style (define __len__ and __getitem__)")
        self.dataset = dataset
        first = dataset[0]
        self.has_labels = _split_item(first)[1] is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, start: int, stop: int) -> tuple[tuple[Array, ...], Array | None]:
        items = [_split_item(_get(self.dataset, i)) for i in range(start, stop)]
        n_inputs = len(items[0][0])
        inputs = []
        for k in range(n_inputs):
            try:
                inputs.append(torch.stack([_as_tensor(it[0][k]) for it in items]))
            except RuntimeError as e:
                shapes = {tuple(_as_tensor(it[0][k]).shape) for it in items}
                bad = next(start + j for j, it in enumerate(items) if tuple(_as_tensor(it[0][k]).shape) != tuple(_as_tensor(items[0][0][k]).shape))
                raise SourceError(f"sample {bad}: input {k} has a different shape from its batch ({sorted(shapes)})") from e
        labels = None
        if self.has_labels:
            labels = torch.tensor([int(it[1]) for it in items], dtype=torch.long)
        return tuple(inputs), labels


def _get(dataset: Any, i: int) -> Any:
    """dataset[i]; an error of the dataset's own keeps its type and traceback and gains a note
    naming the global sample (its message may not, and under torchrun the other ranks see only it)."""
    try:
        return dataset[i]
    except Exception as exc:
        exc.add_note(f"fastattr: raised by the dataset reading sample {i}")
        raise


def _split_item(item: Any) -> tuple[tuple[Any, ...], Any | None]:
    """(inputs tuple, label or None) for one dataset item."""
    if isinstance(item, (tuple, list)):
        if len(item) == 2 and _is_label(item[1]):
            x = item[0]
            return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), item[1]
        return tuple(item), None
    return (item,), None


def _item_shapes(item: Any) -> list[tuple[int, ...]]:
    inputs, _ = _split_item(item)
    return [tuple(getattr(x, "shape", ())) for x in inputs]


def _first_odd_item(items: list[Any]) -> int | None:
    """The first item whose input shapes differ from the first item's (None: they all agree)."""
    first = _item_shapes(items[0])
    return next((j for j, it in enumerate(items) if _item_shapes(it) != first), None)


def _is_label(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    return isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0 and not (v.dtype.is_floating_point if isinstance(v, torch.Tensor) else np.issubdtype(v.dtype, np.floating))


class LoaderSource(DatasetSource):
    """A DataLoader the user already has: its dataset is read in order by index and each
    batch goes through the loader's own collate_fn (so transforms done there apply); the
    loader's batch size is replaced by fastattr's. Shuffling loaders are refused, since a
    resumable run needs a fixed sample order."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        if isinstance(loader.dataset, torch.utils.data.IterableDataset):
            raise SourceError("an IterableDataset has no random access; fastattr needs a map-style Dataset (or arrays) to resume exactly")
        if not isinstance(loader.sampler, torch.utils.data.SequentialSampler):
            raise SourceError("the DataLoader shuffles or uses a custom sampler; pass a loader with shuffle=False (or its dataset)")
        self.collate = loader.collate_fn
        super().__init__(loader.dataset)
        self.has_labels = self._collated(0, 1)[1] is not None

    def _collated(self, start: int, stop: int) -> tuple[tuple[Array, ...], Array | None]:
        items = [_get(self.dataset, i) for i in range(start, stop)]
        try:
            batch = self.collate(items)
        except Exception as exc:
            bad = _first_odd_item(items)
            if bad is None:
                raise
            raise SourceError(f"sample {start + bad}: its shapes {_item_shapes(items[bad])} differ from sample {start}'s {_item_shapes(items[0])}, so the loader's collate_fn failed ({exc})") from exc
        rows = stop - start
        if isinstance(batch, (tuple, list)):
            if len(batch) == 2 and isinstance(batch[1], torch.Tensor) and batch[1].dim() == 1 and batch[1].shape[0] == rows and not batch[1].is_floating_point():
                x = batch[0]
                return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), batch[1]
            return tuple(batch), None
        return (batch,), None

    def _read(self, start: int, stop: int) -> tuple[tuple[Array, ...], Array | None]:
        inputs, labels = self._collated(start, stop)
        return inputs, (labels if self.has_labels else None)


def open_source(data: Any, labels: Any = None) -> Source:
    """A Source for a Dataset, DataLoader, array(s), '.npy' path or 'file.h5:dataset'."""
    if isinstance(data, (Source, torch.utils.data.DataLoader, torch.utils.data.Dataset)) and labels is not None:
        raise SourceError("labels= goes with array, .npy or HDF5 data; a Dataset or DataLoader yields its own (inputs, label) items")
    if isinstance(data, Source):
        return data
    if isinstance(data, torch.utils.data.DataLoader):
        return LoaderSource(data)
    if isinstance(data, torch.utils.data.Dataset):
        return DatasetSource(data)
    if isinstance(labels, (str, os.PathLike)):
        labels = _load_labels(str(labels))
    if isinstance(data, (str, os.PathLike)):
        spec = str(data)
        if spec.endswith(".npy"):
            return ArraySource(load_npy(spec), labels, name=spec)
        if ":" in spec:
            return H5Source(spec, labels)
        raise SourceError(f"cannot read data from {spec!r}: use a .npy file or 'file.h5:dataset'")
    if isinstance(data, (np.ndarray, torch.Tensor)) or (isinstance(data, (tuple, list)) and data and all(isinstance(x, (np.ndarray, torch.Tensor)) for x in data)):
        return ArraySource(data, labels)
    raise SourceError(f"unsupported data source {type(data).__name__}: pass a Dataset, DataLoader, array(s), a .npy path or 'file.h5:dataset'")
