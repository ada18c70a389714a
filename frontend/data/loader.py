"""DataLoader: batches of a map-style dataset, shuffled per epoch, prefetched.

torch.utils.data.DataLoader's arguments, with torch's meanings (samplers.py,
workers.py for num_workers > 0).

Design:
- Index order: the sampler's. By default (`shuffle=True` without a sampler
  or generator), epoch `e` of a loader with seed `s` visits
  `np.random.default_rng([s, e]).permutation(len(dataset))`, and
  `arange(len(dataset))` without shuffle; so a run is reproducible from its
  seed and every epoch gets a fresh permutation. `iter(loader)` starts the
  next epoch; `set_epoch(e)` picks one explicitly (resuming a run).
- Batching: the batch sampler's index lists (a BatchSampler over the
  sampler: consecutive slices, the last one short unless `drop_last`).
- Collate. Samples are stacked field-wise into NumPy arrays (`collate_numpy`);
  integer fields become int64, float64/Python floats become float32, other
  float dtypes are kept. Then each array becomes a cutegrad tensor through
  `cutegrad.from_numpy` (`to_tensors`). NumPy is the only thing the worker
  touches before that last step. `pin_memory=True` then copies the batch's
  tensors into page-locked memory.
- Prefetch. With `prefetch > 0` a daemon thread builds up to `prefetch`
  batches ahead into a bounded queue. The thread holds no reference to the
  iterator, so dropping the iterator (or `close()`) stops it: a finalizer sets
  a stop flag the worker checks between batches and while waiting on a full
  queue. An exception in the worker is re-raised in the consumer by the
  `next()` call that would have returned that batch. NumPy releases the GIL in
  its heavy loops, which is where the thread buys time.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .dataset import Dataset, IterableDataset
from .samplers import BatchSampler, RandomSampler, Sampler, SequentialSampler
from .workers import WorkerPool

__all__ = ["DataLoader", "collate_numpy", "default_collate", "default_convert", "make_batch_function", "to_tensor",
           "to_tensors"]


def _batch_dtype(arr: np.ndarray) -> np.ndarray:
    kind = arr.dtype.kind
    if kind in "iu" and arr.dtype != np.int64:
        return arr.astype(np.int64)
    if arr.dtype == np.float64:
        return arr.astype(np.float32)
    return arr


def _map_tree(tree: Any, leaf_type: type, fn: Callable[[Any], Any]) -> Any:
    """tree (nested tuples, namedtuples, lists, dicts) with fn applied to every leaf_type leaf."""
    if isinstance(tree, leaf_type):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_tree(x, leaf_type, fn) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tree(x, leaf_type, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: _map_tree(v, leaf_type, fn) for k, v in tree.items()}
    return tree


def _cast_tree(tree: Any) -> Any:
    return _map_tree(tree, np.ndarray, _batch_dtype)


def _leaf_array(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    numpy = getattr(x, "numpy", None)
    if callable(numpy):
        return np.asarray(numpy())
    return np.asarray(x)


def collate_numpy(samples: Sequence[Any]) -> Any:
    """Stack a list of samples field-wise into NumPy arrays.

    A sample is an array, a number, a tuple/list/namedtuple or a dict of those
    (nested freely); strings are gathered into a list. Integer arrays become
    int64, float64 and Python floats float32.
    """
    if len(samples) == 0:
        raise ValueError("collate_numpy: empty batch")
    first = samples[0]
    if isinstance(first, str):
        return list(samples)
    if isinstance(first, dict):
        keys = first.keys()
        for s in samples:
            if not isinstance(s, dict) or s.keys() != keys:
                raise TypeError(f"collate_numpy: samples disagree on dict keys: {sorted(keys)} vs {s!r:.80}")
        return {k: collate_numpy([s[k] for s in samples]) for k in keys}
    if isinstance(first, (tuple, list)):
        n = len(first)
        for s in samples:
            if not isinstance(s, (tuple, list)) or len(s) != n:
                raise TypeError(f"collate_numpy: samples have different numbers of fields ({n} vs {len(s) if isinstance(s, (tuple, list)) else type(s).__name__})")
        fields = [collate_numpy([s[i] for s in samples]) for i in range(n)]
        if hasattr(first, "_fields"):
            return type(first)(*fields)
        return tuple(fields)
    arrays = [_leaf_array(s) for s in samples]
    shape = arrays[0].shape
    for a in arrays:
        if a.shape != shape:
            raise ValueError(f"collate_numpy: cannot stack samples of shapes {shape} and {a.shape}")
    if arrays[0].dtype == object:
        raise TypeError(f"collate_numpy: cannot batch samples of type {type(first).__name__}")
    return _batch_dtype(np.stack(arrays))


def to_tensor(arr: np.ndarray):
    """One NumPy array -> a cutegrad CPU tensor (the only NumPy/tensor boundary of `cutegrad.data`)."""
    import cutegrad

    # ascontiguousarray would turn a 0-d array into shape (1,)
    return cutegrad.from_numpy(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))


def to_tensors(tree: Any) -> Any:
    """Convert every NumPy array in a nested tuple/list/dict to a cutegrad tensor."""
    return _map_tree(tree, np.ndarray, to_tensor)


def default_collate(samples: Sequence[Any]) -> Any:
    """`collate_numpy` followed by `to_tensors`."""
    return to_tensors(collate_numpy(samples))


def default_convert(data: Any) -> Any:
    """One sample, unbatched (torch's default_convert): NumPy arrays and scalars become tensors of their dtype.

    Containers are walked (a plain tuple becomes a list, as torch's); strings,
    Python numbers and everything else are returned as they are.
    """
    if isinstance(data, (np.ndarray, np.generic)):
        return data if data.dtype.kind in "USO" else to_tensor(np.asarray(data))
    if isinstance(data, dict):
        return {k: default_convert(v) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(default_convert(x) for x in data))
    if isinstance(data, (tuple, list)):
        return [default_convert(x) for x in data]
    return data


class _FirstSample:
    """collate for loaders without batching: the 'batch' of one index is that sample, through `convert`."""

    def __init__(self, convert: Optional[Callable]):
        self.convert = convert

    def __call__(self, samples: list) -> Any:
        return samples[0] if self.convert is None else self.convert(samples[0])


_BATCH, _ERROR, _END = 0, 1, 2


def _put(q: queue.Queue, item: tuple, stop: threading.Event) -> bool:
    while True:
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            if stop.is_set():
                return False


def _produce(make_batch: Callable, index_batches: list, q: queue.Queue, stop: threading.Event) -> None:
    for number, idx in enumerate(index_batches):
        if stop.is_set():
            return
        try:
            item = (_BATCH, make_batch(idx))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            if hasattr(exc, "add_note"):
                exc.add_note(f"(raised in the DataLoader prefetch thread while building batch {number})")
            _put(q, (_ERROR, exc), stop)
            return
        if not _put(q, item, stop):
            return
    _put(q, (_END, None), stop)


def _shutdown(stop: threading.Event, q: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    # Empty the queue so batches (and the arrays they hold) are freed now.
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            break
    if thread is not threading.current_thread():
        thread.join()


class _PrefetchIterator:
    def __init__(self, make_batch: Callable, index_batches: list, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            args=(make_batch, index_batches, self._queue, self._stop),
            name="cutegrad-data-prefetch",
            daemon=True,
        )
        self._thread.start()
        self._finished = False
        self._close = weakref.finalize(self, _shutdown, self._stop, self._queue, self._thread)

    def __iter__(self) -> "_PrefetchIterator":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        kind, payload = self._queue.get()
        if kind == _BATCH:
            return payload
        self.close()
        if kind == _ERROR:
            raise payload
        raise StopIteration

    def close(self) -> None:
        """Stop the prefetch thread and wait for it."""
        self._finished = True
        self._close()

    @property
    def worker_alive(self) -> bool:
        return self._thread.is_alive()


class _SyncIterator:
    def __init__(self, make_batch: Callable, index_batches: list):
        self._make_batch = make_batch
        self._batches = iter(index_batches)

    def __iter__(self) -> "_SyncIterator":
        return self

    def __next__(self) -> Any:
        return self._make_batch(next(self._batches))

    def close(self) -> None:
        self._batches = iter(())


def make_batch_function(dataset, collate_fn: Optional[Callable], use_get_batch: bool,
                        in_worker: bool = False) -> Callable[[Sequence[int]], Any]:
    """indices -> batch. In a worker the default collate stops at NumPy (the parent makes the tensors)."""
    if use_get_batch:
        get_batch = dataset.get_batch
        if in_worker:
            return lambda idx: _cast_tree(get_batch(np.asarray(idx)))
        return lambda idx: to_tensors(_cast_tree(get_batch(np.asarray(idx))))
    if collate_fn is None:
        collate_fn = collate_numpy if in_worker else default_collate
    return lambda idx: collate_fn([dataset[int(i)] for i in idx])


def _pin_tree(tree: Any) -> Any:
    from ..tensor import Tensor
    return _map_tree(tree, Tensor, lambda t: t.pin_memory() if t.device.type == "cpu" else t)


class _SeededShuffle(Sampler):
    """The default shuffle: epoch e visits np.random.default_rng([seed, e]).permutation(n)."""

    def __init__(self, loader: "DataLoader"):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.index_order(self.loader.epoch).tolist())

    def __len__(self):
        return len(self.loader.dataset)


def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


class _WorkerIterator:
    def __init__(self, pool: WorkerPool, owned: bool, batches: Iterator[Any]):
        self._pool = pool if owned else None
        self._batches = batches

    def __iter__(self) -> "_WorkerIterator":
        return self

    def __next__(self) -> Any:
        try:
            return next(self._batches)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._batches.close()
        if self._pool is not None:
            self._pool.close()


class DataLoader:
    """Batches of a map-style dataset: torch.utils.data.DataLoader's arguments and meanings.

    Args (torch's, in torch's order):
        dataset: anything with `__len__` and `__getitem__`; if it also has
            `get_batch(indices)` and no `collate_fn` is given, whole batches are
            fetched through it. Or an IterableDataset: samples in its
            iteration order, consecutive ones batched (no sampler or shuffle;
            num_workers=0 only).
        batch_size: samples per batch (>= 1); None turns batching off: each
            sample goes alone through `collate_fn` (default `default_convert`:
            NumPy arrays become tensors, nothing is stacked).
        shuffle: visit samples in a fresh random order every epoch. Without a
            `generator` the order is `np.random.default_rng([seed, epoch])`'s
            permutation (see `seed`); with one, a RandomSampler drawing from it.
        sampler: an iterable of indices (a Sampler); excludes `shuffle`.
        batch_sampler: an iterable of index lists; excludes batch_size,
            shuffle, sampler and drop_last.
        num_workers: worker processes building batches (0: this process, with
            `prefetch` batches built ahead by a thread).
        collate_fn: list of samples -> batch; default `default_collate`
            (NumPy stacking, then cutegrad tensors). Pass `collate_numpy` to
            get NumPy batches.
        pin_memory: batches' CPU tensors in page-locked memory (for
            `to("cuda", non_blocking=True)`); without a GPU it warns and does
            nothing, as torch's.
        drop_last: drop the last batch when it is short.
        timeout: seconds to wait for a worker's batch (0: forever).
        worker_init_fn: called with the worker id in each worker, after seeding.
        multiprocessing_context: a context or its name ("fork", "spawn", ...).
        generator: a cutegrad.Generator for the shuffle and the workers' base seed.
        prefetch_factor: batches in flight per worker (default 2).
        persistent_workers: keep the workers between epochs.
    cutegrad's own:
        seed: base seed of the default shuffle; None draws one from cutegrad's
            CPU generator at construction (so `cutegrad.manual_seed` makes runs
            repeat; read it back from `loader.seed`).
        prefetch: with num_workers=0, batches prepared ahead by a background
            thread; 0 builds each batch in the consuming thread.
    """

    def __init__(self, dataset: Dataset, batch_size: Optional[int] = 1, shuffle: Optional[bool] = None,
                 sampler=None, batch_sampler=None, num_workers: int = 0,
                 collate_fn: Optional[Callable[[list], Any]] = None, pin_memory: bool = False,
                 drop_last: bool = False, timeout: float = 0, worker_init_fn: Optional[Callable] = None,
                 multiprocessing_context=None, generator=None, *, prefetch_factor: Optional[int] = None,
                 persistent_workers: bool = False, pin_memory_device: str = "", in_order: bool = True,
                 seed: Optional[int] = None, prefetch: int = 2):
        iterable = isinstance(dataset, IterableDataset)
        if not iterable and (not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__")):
            raise TypeError(f"DataLoader: dataset must define __len__ and __getitem__ (or be an IterableDataset), "
                            f"got {type(dataset).__name__}")
        if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
            raise ValueError(f"DataLoader: batch_size must be a positive integer or None, got {batch_size!r}")
        if batch_size is None and drop_last:
            raise ValueError("batch_size=None option disables auto-batching and is mutually exclusive with drop_last")
        if iterable:
            for name, value in (("shuffle", shuffle), ("sampler", sampler), ("batch_sampler", batch_sampler)):
                if value not in (None, False):
                    raise ValueError(f"DataLoader with IterableDataset: expected unspecified {name} option, but got "
                                     f"{name}={value!r}")
            if num_workers:
                raise NotImplementedError("DataLoader: an IterableDataset is read in this process only "
                                          "(num_workers=0)")
        if not _is_int(prefetch) or prefetch < 0:
            raise ValueError(f"DataLoader: prefetch must be a non-negative integer, got {prefetch!r}")
        if not _is_int(num_workers) or num_workers < 0:
            raise ValueError("num_workers option should be non-negative; use num_workers=0 to disable "
                             f"multiprocessing, got {num_workers!r}")
        if num_workers == 0 and prefetch_factor is not None:
            raise ValueError("prefetch_factor option could only be specified in multiprocessing. "
                             "let num_workers > 0 to enable multiprocessing.")
        if prefetch_factor is not None and (not _is_int(prefetch_factor) or prefetch_factor < 1):
            raise ValueError(f"DataLoader: prefetch_factor must be a positive integer, got {prefetch_factor!r}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers option needs num_workers > 0")
        if timeout < 0:
            raise ValueError("timeout option should be non-negative")
        if sampler is not None and shuffle:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        if batch_sampler is not None and (batch_size != 1 or shuffle or sampler is not None or drop_last):
            raise ValueError("batch_sampler option is mutually exclusive with batch_size, shuffle, sampler, "
                             "and drop_last")
        if seed is None:
            from .. import random as _random
            seed = int(_random.cpu_generator().numpy().integers(0, 2 ** 63 - 1))
        elif not _is_int(seed) or seed < 0:
            raise ValueError(f"DataLoader: seed must be a non-negative integer or None, got {seed!r}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"DataLoader: collate_fn must be callable, got {type(collate_fn).__name__}")
        self.dataset = dataset
        self.batch_size = None if batch_sampler is not None or batch_size is None else int(batch_size)
        self._iterable = iterable
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.collate_fn = collate_fn
        self.prefetch = int(prefetch)
        self.num_workers = int(num_workers)
        self.prefetch_factor = 2 if prefetch_factor is None and num_workers else prefetch_factor
        self.persistent_workers = bool(persistent_workers)
        self.timeout = float(timeout)
        self.worker_init_fn = worker_init_fn
        self.multiprocessing_context = multiprocessing_context
        self.generator = generator
        self.pin_memory = bool(pin_memory)
        if self.pin_memory:
            from .. import cuda
            if not cuda.is_available():
                warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device "
                              "pinned memory won't be used.", stacklevel=2)
                self.pin_memory = False
        if iterable:
            sampler = None
        elif sampler is None:
            if not self.shuffle:
                sampler = SequentialSampler(dataset)
            elif generator is not None:
                sampler = RandomSampler(dataset, generator=generator)
            else:
                sampler = _SeededShuffle(self)
        self.sampler = sampler
        self._auto_batch = batch_sampler is not None or batch_size is not None
        if iterable or not self._auto_batch:
            self.batch_sampler = None
            # unbatched map-style loading runs on index "batches" of one sample each
            self._index_lists = None if iterable else BatchSampler(sampler, 1, False)
        else:
            self.batch_sampler = self._index_lists = batch_sampler if batch_sampler is not None else \
                BatchSampler(sampler, self.batch_size, self.drop_last)
        self.epoch = 0
        self._pool = None

    def __len__(self) -> int:
        if not self._iterable:
            return len(self._index_lists)
        n = len(self.dataset)  # a TypeError when the IterableDataset has no __len__, as torch's
        if self.batch_size is None:
            return n
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` run epoch `epoch` (its permutation); passed on to a sampler that has set_epoch."""
        if epoch < 0:
            raise ValueError(f"DataLoader.set_epoch: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def index_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` of the default (seeded) order visits the dataset."""
        n = len(self.dataset)
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(n)
        return np.arange(n)

    def index_batches(self, epoch: int) -> list:
        """The index arrays of the batches of epoch `epoch`."""
        saved, self.epoch = self.epoch, epoch
        try:
            return [np.asarray(b, dtype=np.int64) for b in self._index_lists]
        finally:
            self.epoch = saved

    def _use_get_batch(self) -> bool:
        return self._auto_batch and self.collate_fn is None and getattr(self.dataset, "get_batch", None) is not None

    def _collate(self, in_worker: bool = False) -> Optional[Callable]:
        if self._auto_batch:
            return self.collate_fn
        # a worker hands the raw sample back; the parent converts it (tensors are made in the parent)
        return _FirstSample(self.collate_fn or (None if in_worker else default_convert))

    def _batch_maker(self) -> Callable[[np.ndarray], Any]:
        make = make_batch_function(self.dataset, self._collate(), self._use_get_batch())
        if self.pin_memory:
            return lambda idx: _pin_tree(make(idx))
        return make

    def _finish_worker_batch(self) -> Callable[[Any], Any]:
        if self.collate_fn is not None:
            convert = lambda b: b  # noqa: E731
        else:
            convert = to_tensors if self._auto_batch else default_convert
        if self.pin_memory:
            return lambda b: _pin_tree(convert(b))
        return convert

    def _worker_pool(self) -> WorkerPool:
        from .. import random as _random
        gen = self.generator.numpy() if self.generator is not None else _random.cpu_generator().numpy()
        base_seed = int(gen.integers(0, 2 ** 62))
        return WorkerPool(self.dataset, self._collate(in_worker=True), self._use_get_batch(), self.num_workers,
                          base_seed, self.worker_init_fn, self.multiprocessing_context)

    def _stream_batches(self) -> Iterator[Any]:
        samples = iter(self.dataset)
        if self.batch_size is None:
            convert = self.collate_fn or default_convert
            chunks = ([s] for s in samples)
            make = lambda chunk: convert(chunk[0])  # noqa: E731
        else:
            make = self.collate_fn or default_collate
            chunks = iter(lambda: list(itertools.islice(samples, self.batch_size)), [])
        for chunk in chunks:
            if self.drop_last and len(chunk) < self.batch_size:
                return
            batch = make(chunk)
            yield _pin_tree(batch) if self.pin_memory else batch

    def __iter__(self) -> Iterator[Any]:
        if self._iterable:
            self.epoch += 1
            return self._stream_batches()
        batches = self.index_batches(self.epoch)
        self.epoch += 1
        if self.num_workers:
            pool = self._pool
            if pool is None or not pool.alive:
                pool = self._worker_pool()
                if self.persistent_workers:
                    self._pool = pool
            depth = self.prefetch_factor * self.num_workers
            gen = pool.run(batches, depth, self.timeout, self._finish_worker_batch())
            return _WorkerIterator(pool, not self.persistent_workers, gen)
        if self.prefetch == 0:
            return _SyncIterator(self._batch_maker(), batches)
        return _PrefetchIterator(self._batch_maker(), batches, self.prefetch)
