"""Samplers in torch.utils.data's shape: which dataset indices a DataLoader visits, in what order.

Semantics are torch's (lengths, index sets, replacement, argument checks);
the random numbers come from cutegrad's generators (NumPy's PCG64), so a
shuffled order is reproducible under `cutegrad.manual_seed` but is not the
order torch draws:

- a sampler given `generator` (a `cutegrad.Generator`) draws from it, so
  consecutive epochs differ and re-seeding the generator repeats them;
- without one, each `iter()` takes a fresh seed from cutegrad's default CPU
  generator, as torch takes one from its default generator.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

__all__ = ["Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler", "WeightedRandomSampler",
           "BatchSampler"]


def _rng(generator) -> np.random.Generator:
    """The NumPy generator to draw from: the given cutegrad.Generator's, or a fresh one seeded from the default."""
    if generator is not None:
        numpy = getattr(generator, "numpy", None)
        if not callable(numpy):
            raise TypeError(f"generator must be a cutegrad.Generator, got {type(generator).__name__}")
        return numpy()
    from .. import random as _random
    seed = int(_random.cpu_generator().numpy().integers(0, 2 ** 63 - 1))
    return np.random.default_rng(seed)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} should be a positive integer value, but got {name}={value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} should be a boolean value, but got {name}={value!r}")


class Sampler:
    """Base class: an iterable of dataset indices (subclasses define __iter__, usually __len__)."""

    def __init__(self, data_source=None):
        pass

    def __iter__(self) -> Iterator[int]:
        raise NotImplementedError(f"{type(self).__name__} must define __iter__")


class SequentialSampler(Sampler):
    """0, 1, ..., len(data_source) - 1."""

    def __init__(self, data_source):
        self.data_source = data_source

    def __iter__(self):
        return iter(range(len(self.data_source)))

    def __len__(self):
        return len(self.data_source)


class RandomSampler(Sampler):
    """A random order of the dataset (without replacement), or num_samples draws with replacement.

    Without replacement and num_samples > len(data_source), whole permutations
    follow each other and the last is cut short, as torch does.
    """

    def __init__(self, data_source, replacement: bool = False, num_samples: Optional[int] = None, generator=None):
        self.data_source = data_source
        self.replacement = replacement
        self._num_samples = num_samples
        self.generator = generator
        if not isinstance(replacement, bool):
            raise TypeError(f"replacement should be a boolean value, but got replacement={replacement!r}")
        _check_positive_int("num_samples", self.num_samples)

    @property
    def num_samples(self) -> int:
        return len(self.data_source) if self._num_samples is None else self._num_samples

    def __iter__(self):
        n = len(self.data_source)
        rng = _rng(self.generator)
        if self.replacement:
            return iter(rng.integers(0, n, size=self.num_samples).tolist())
        order = [rng.permutation(n) for _ in range(self.num_samples // n)]
        rest = self.num_samples % n
        if rest:
            order.append(rng.permutation(n)[:rest])
        return iter(np.concatenate(order).tolist() if order else [])

    def __len__(self):
        return self.num_samples


class SubsetRandomSampler(Sampler):
    """The given indices in a random order, without replacement."""

    def __init__(self, indices: Sequence[int], generator=None):
        self.indices = indices
        self.generator = generator

    def __iter__(self):
        perm = _rng(self.generator).permutation(len(self.indices))
        return iter([self.indices[i] for i in perm.tolist()])

    def __len__(self):
        return len(self.indices)


class WeightedRandomSampler(Sampler):
    """num_samples indices drawn with probabilities proportional to weights (torch.multinomial's meaning)."""

    def __init__(self, weights: Sequence[float], num_samples: int, replacement: bool = True, generator=None):
        _check_positive_int("num_samples", num_samples)
        _check_bool("replacement", replacement)
        w = np.asarray(weights.numpy() if hasattr(weights, "numpy") else weights, dtype=np.float64)
        if w.ndim != 1:
            raise ValueError(f"weights should be a 1d sequence but given weights have shape {tuple(w.shape)}")
        if w.size == 0 or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        self.weights = w
        self.num_samples = int(num_samples)
        self.replacement = replacement
        self.generator = generator

    def __iter__(self):
        rng = _rng(self.generator)
        w = self.weights
        if self.replacement:
            return iter(rng.choice(len(w), size=self.num_samples, replace=True, p=w / w.sum()).tolist())
        if self.num_samples > len(w):
            raise RuntimeError(f"cannot sample {self.num_samples} samples without replacement from {len(w)} weights")
        # Efraimidis-Spirakis: the largest keys log(u)/w are a weighted sample without replacement; as in
        # torch.multinomial, indices of weight 0 follow once the others are used up (in random order)
        with np.errstate(divide="ignore"):
            keys = np.log(rng.random(len(w))) / w
        keys[w == 0] = -np.inf
        order = np.lexsort((rng.random(len(w)), -keys))
        return iter(order[:self.num_samples].tolist())

    def __len__(self):
        return self.num_samples


class BatchSampler(Sampler):
    """Lists of batch_size indices from sampler; the last one short unless drop_last."""

    def __init__(self, sampler: Iterable[int], batch_size: int, drop_last: bool):
        _check_positive_int("batch_size", batch_size)
        _check_bool("drop_last", drop_last)
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.drop_last = drop_last

    def __iter__(self):
        batch = []
        for idx in self.sampler:
            batch.append(idx)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
