"""Map-style datasets: an indexable collection of samples with a length.

Samples are NumPy arrays, Python numbers, or tuples/dicts of them; the
DataLoader's collate turns a list of samples into batched arrays and then
into cutegrad tensors. A dataset may also define `get_batch(indices)`, which
returns the already-batched arrays for a whole index array; the DataLoader
uses it instead of per-sample indexing when no custom collate is given,
which keeps big image batches out of a Python loop.
"""

from __future__ import annotations

import bisect
import itertools
import math
import warnings
from typing import Any, Sequence

import numpy as np

__all__ = ["ConcatDataset", "Dataset", "IterableDataset", "TensorDataset", "Subset", "random_split"]


class Dataset:
    """Base class of map-style datasets: subclasses define `__len__` and `__getitem__`."""

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define __len__")

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define __getitem__")

    def __add__(self, other: "Dataset") -> "ConcatDataset":
        return ConcatDataset([self, other])


class IterableDataset:
    """Base class of iterable-style datasets (a stream of samples): subclasses define `__iter__`.

    The DataLoader draws samples from `iter(dataset)` in order (no sampler, no
    shuffle) and batches consecutive ones. `__len__` is optional; when defined,
    `len(loader)` is computed from it, as torch's.
    """

    def __iter__(self):
        raise NotImplementedError(f"{type(self).__name__} must define __iter__")


class ConcatDataset(Dataset):
    """Map-style datasets end to end: index i runs through the first, then the second, ... (torch's)."""

    def __init__(self, datasets: Sequence[Dataset]):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("ConcatDataset: datasets should not be an empty iterable")
        for d in self.datasets:
            if isinstance(d, IterableDataset):
                raise TypeError("ConcatDataset does not support IterableDataset")
        self.cumulative_sizes = list(itertools.accumulate(len(d) for d in self.datasets))

    def __len__(self) -> int:
        return self.cumulative_sizes[-1]

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        if index < 0:
            if -index > n:
                raise ValueError("absolute value of index should not exceed dataset length")
            index += n
        if index >= n:
            raise IndexError(f"ConcatDataset: index {index} is out of range for length {n}")
        which = bisect.bisect_right(self.cumulative_sizes, index)
        start = self.cumulative_sizes[which - 1] if which else 0
        return self.datasets[which][index - start]


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



def random_split(dataset: Dataset, lengths: Sequence, generator=None) -> list:
    """Disjoint random Subsets of the given lengths (or fractions summing to 1), as torch's random_split.

    Fractions become floor(len * fraction) each, the remainder handed out one
    by one from the first subset on. The permutation comes from `generator`
    (a cutegrad.Generator), by default cutegrad's CPU generator.
    """
    n = len(dataset)
    lengths = list(lengths)
    if math.isclose(sum(lengths), 1) and sum(lengths) <= 1:
        for i, frac in enumerate(lengths):
            if frac < 0 or frac > 1:
                raise ValueError(f"Fraction at index {i} is not between 0 and 1")
        sizes = [int(math.floor(n * frac)) for frac in lengths]
        for i in range(n - sum(sizes)):
            sizes[i % len(sizes)] += 1
        for i, size in enumerate(sizes):
            if size == 0:
                warnings.warn(f"Length of split at index {i} is 0. This might result in an empty dataset.",
                              stacklevel=2)
        lengths = sizes
    if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0 for x in lengths):
        raise ValueError(f"random_split: lengths must be non-negative integers or fractions summing to 1, "
                         f"got {lengths}")
    if sum(lengths) != n:
        raise ValueError("Sum of input lengths does not equal the length of the input dataset!")
    if generator is None:
        from .. import random as _random
        generator = _random.cpu_generator()
    order = generator.numpy().permutation(n).tolist()
    return [Subset(dataset, order[end - size:end]) for end, size in zip(itertools.accumulate(lengths), lengths)]
