"""Map-style datasets: an indexable collection of samples with a length.

Samples are NumPy arrays, Python numbers, or tuples/dicts of them; the
DataLoader's collate turns a list of samples into batched arrays and then
into cutegrad tensors. A dataset may also define `get_batch(indices)`, which
returns the already-batched arrays for a whole index array; the DataLoader
uses it instead of per-sample indexing when no custom collate is given,
which keeps big image batches out of a Python loop.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["Dataset", "TensorDataset", "Subset"]


class Dataset:
    """Base class of map-style datasets: subclasses define `__len__` and `__getitem__`."""

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define __len__")

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__")


def _as_array(x: Any) -> np.ndarray:
    # cutegrad tensors (and torch tensors) expose .numpy(); everything else goes through NumPy.
    if isinstance(x, np.ndarray):
        return x
    numpy = getattr(x, "numpy", None)
    if callable(numpy):
        return np.asarray(numpy())
    return np.asarray(x)


class TensorDataset(Dataset):
    """Rows of several arrays that share their first dimension.

    `TensorDataset(images, labels)[i] == (images[i], labels[i])`. Accepts NumPy
    arrays and anything with a `.numpy()` method (cutegrad or torch tensors).
    """

    def __init__(self, *arrays: Any):
        if not arrays:
            raise ValueError("TensorDataset needs at least one array")
        self.arrays = tuple(_as_array(a) for a in arrays)
        for i, a in enumerate(self.arrays):
            if a.ndim == 0:
                raise ValueError(f"TensorDataset: array {i} is a scalar; every array needs a first (sample) dimension")
        n = len(self.arrays[0])
        lengths = [len(a) for a in self.arrays]
        if any(m != n for m in lengths):
            raise ValueError(f"TensorDataset: arrays have different first dimensions {lengths}")

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: int) -> tuple:
        return tuple(a[index] for a in self.arrays)

    def get_batch(self, indices: np.ndarray) -> tuple:
        return tuple(a[indices] for a in self.arrays)


class Subset(Dataset):
    """The samples of `dataset` at `indices`, in that order."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1:
            raise ValueError(f"Subset: indices must be one-dimensional, got shape {self.indices.shape}")
        n = len(dataset)
        if len(self.indices) and (self.indices.min() < -n or self.indices.max() >= n):
            raise IndexError(f"Subset: an index is out of range for a dataset of length {n}")
        # Batch access only where the wrapped dataset has it, so the DataLoader's
        # `getattr(dataset, "get_batch", None)` check stays truthful.
        inner = getattr(dataset, "get_batch", None)
        if inner is not None:
            self.get_batch = lambda idx: inner(self.indices[idx])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(self.indices[index])]

