"""DataLoader: batches of a map-style dataset, shuffled per epoch, prefetched.

Design:
- Index order. Epoch `e` of a loader with seed `s` visits
  `np.random.default_rng([s, e]).permutation(len(dataset))` when shuffling,
  `arange(len(dataset))` otherwise; so a run is reproducible from its seed and
  every epoch gets a fresh permutation. `iter(loader)` starts the next epoch;
  `set_epoch(e)` picks one explicitly (resuming a run).
- Batching. Consecutive slices of the index order, the last one short unless
  `drop_last`.
- Collate. Samples are stacked field-wise into NumPy arrays (`collate_numpy`);
  integer fields become int64, float64/Python floats become float32, other
  float dtypes are kept. Then each array becomes a cutegrad tensor through
  `cutegrad.from_numpy` (`to_tensors`). NumPy is the only thing the worker
  touches before that last step.
- Prefetch. With `prefetch > 0` a daemon thread builds up to `prefetch`
  batches ahead into a bounded queue. The thread holds no reference to the
  iterator, so dropping the iterator (or `close()`) stops it: a finalizer sets
  a stop flag the worker checks between batches and while waiting on a full
  queue. An exception in the worker is re-raised in the consumer by the
  `next()` call that would have returned that batch. NumPy releases the GIL in
  its heavy loops, which is where the thread buys time.
"""

from __future__ import annotations

import math
import queue
import threading
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .dataset import Dataset

__all__ = ["DataLoader", "collate_numpy", "default_collate", "to_tensor", "to_tensors"]


def _batch_dtype(arr: np.ndarray) -> np.ndarray:
    kind = arr.dtype.kind
    if kind in "iu" and arr.dtype != np.int64:
        return arr.astype(np.int64)
    if arr.dtype == np.float64:
        return arr.astype(np.float32)
    return arr


def _cast_tree(tree: Any) -> Any:
    if isinstance(tree, np.ndarray):
        return _batch_dtype(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_cast_tree(x) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_cast_tree(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _cast_tree(v) for k, v in tree.items()}
    return tree


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

    return cutegrad.from_numpy(np.ascontiguousarray(arr))


def to_tensors(tree: Any) -> Any:
    """Convert every NumPy array in a nested tuple/list/dict to a cutegrad tensor."""
    if isinstance(tree, np.ndarray):
        return to_tensor(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(to_tensors(x) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(to_tensors(x) for x in tree)
    if isinstance(tree, dict):
        return {k: to_tensors(v) for k, v in tree.items()}
    return tree


def default_collate(samples: Sequence[Any]) -> Any:
    """`collate_numpy` followed by `to_tensors`."""
    return to_tensors(collate_numpy(samples))


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


class DataLoader:
    """Iterate over a map-style dataset in batches.

    Args:
        dataset: anything with `__len__` and `__getitem__`; if it also has
            `get_batch(indices)` and no `collate_fn` is given, whole batches are
            fetched through it.
        batch_size: samples per batch (>= 1).
        shuffle: visit samples in a fresh seeded permutation every epoch.
        drop_last: drop the last batch when it is short.
        seed: base seed of the shuffling; `None` draws one from the OS once,
            at construction (read it back from `loader.seed`).
        collate_fn: list of samples -> batch; default `default_collate`
            (NumPy stacking, then cutegrad tensors). Pass `collate_numpy` to
            get NumPy batches.
        prefetch: batches prepared ahead by a background thread; 0 builds each
            batch in the consuming thread.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: Optional[int] = None,
        collate_fn: Optional[Callable[[list], Any]] = None,
        prefetch: int = 2,
    ):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"DataLoader: dataset must define __len__ and __getitem__, got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ValueError(f"DataLoader: prefetch must be a non-negative integer, got {prefetch!r}")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)
        elif isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"DataLoader: seed must be a non-negative integer or None, got {seed!r}")
        if collate_fn is not None and not callable(collate_fn):
            raise TypeError(f"DataLoader: collate_fn must be callable, got {type(collate_fn).__name__}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.collate_fn = collate_fn
        self.prefetch = int(prefetch)
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` run epoch `epoch` (its permutation)."""
        if epoch < 0:
            raise ValueError(f"DataLoader.set_epoch: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def index_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the dataset."""
        n = len(self.dataset)
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(n)
        return np.arange(n)

    def index_batches(self, epoch: int) -> list:
        order = self.index_order(epoch)
        stop = len(self) * self.batch_size if self.drop_last else len(order)
        return [order[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def _batch_maker(self) -> Callable[[np.ndarray], Any]:
        dataset = self.dataset
        collate = self.collate_fn
        get_batch = getattr(dataset, "get_batch", None) if collate is None else None
        if get_batch is not None:
            return lambda idx: to_tensors(_cast_tree(get_batch(idx)))
        collate = collate or default_collate
        return lambda idx: collate([dataset[int(i)] for i in idx])

    def __iter__(self) -> Iterator[Any]:
        batches = self.index_batches(self.epoch)
        self.epoch += 1
        if self.prefetch == 0:
            return _SyncIterator(self._batch_maker(), batches)
        return _PrefetchIterator(self._batch_maker(), batches, self.prefetch)
