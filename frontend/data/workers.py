"""Worker processes of the DataLoader (num_workers > 0), torch's protocol in small.

Each worker owns an index queue; the loader sends it (batch number, indices)
round-robin, keeping at most `prefetch_factor * num_workers` batches in
flight, and reads (batch number, batch or error) from one shared result
queue, yielding batches in order. A worker builds a batch exactly as the
single-process loader does (`get_batch` or per-sample indexing, then the
collate function); the default collate runs only its NumPy half in the
worker (`collate_numpy`) and the loader makes tensors in the parent, so
batches cross the process boundary as NumPy arrays.

Seeds, as torch: every time workers start, a base seed is drawn from the
loader's generator (or cutegrad's default one); worker `i` seeds Python's
`random`, NumPy's global state and cutegrad with `base_seed + i`, then calls
`worker_init_fn(i)`. `get_worker_info()` answers inside a worker.

Processes start with the platform's default context (fork on Linux, as
torch) unless `multiprocessing_context` names one; with "spawn" the dataset
and collate function must be picklable. Workers exit when the loader sends
None, when their iterator dies (non-persistent workers) or with the parent.
"""
from __future__ import annotations

import pickle
import queue
import random
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from multiprocessing.reduction import ForkingPickler

__all__ = ["WorkerInfo", "get_worker_info", "WorkerPool"]


@dataclass(frozen=True)
class WorkerInfo:
    id: int
    num_workers: int
    seed: int
    dataset: Any


_worker_info: Optional[WorkerInfo] = None


def get_worker_info() -> Optional[WorkerInfo]:
    """In a DataLoader worker process: its id, the number of workers, its seed and its dataset copy; else None."""
    return _worker_info


class _WorkerError:
    """An exception raised in a worker, carried to the parent (re-raised there with the worker's traceback)."""

    def __init__(self, exc: BaseException, worker_id: int):
        self.text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.worker_id = worker_id
        try:
            pickle.dumps(exc)
            self.exc = exc
        except Exception:  # noqa: BLE001 - an unpicklable exception becomes a RuntimeError below
            self.exc = None

    def reraise(self):
        note = f"Caught {type(self.exc).__name__ if self.exc else 'an exception'} in DataLoader worker process " \
               f"{self.worker_id}. Original traceback:\n{self.text}"
        if self.exc is not None:
            if hasattr(self.exc, "add_note"):
                self.exc.add_note(note)
            raise self.exc
        raise RuntimeError(note)


def _worker_loop(dataset, collate_fn, use_get_batch, index_queue, result_queue, worker_id, num_workers, seed,
                 worker_init_fn):
    global _worker_info
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    import cutegrad
    cutegrad.manual_seed(seed)
    _worker_info = WorkerInfo(worker_id, num_workers, seed, dataset)
    from .loader import make_batch_function
    try:
        if worker_init_fn is not None:
            worker_init_fn(worker_id)
        make_batch = make_batch_function(dataset, collate_fn, use_get_batch, in_worker=True)
    except BaseException as exc:  # noqa: BLE001 - reported with the first batch this worker is asked for
        init_error = _WorkerError(exc, worker_id)
    else:
        init_error = None
    while True:
        task = index_queue.get()
        if task is None:
            break
        run, number, indices = task
        if init_error is not None:
            result_queue.put((run, number, _pickled(init_error)))
            continue
        try:
            # Pickled here, not by the queue: its feeder thread would print an unpicklable
            # batch's error and drop the batch, leaving the parent to wait forever.
            payload = _pickled(make_batch(indices))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
            payload = _pickled(_WorkerError(exc, worker_id))
        result_queue.put((run, number, payload))


def _pickled(obj):
    return bytes(ForkingPickler.dumps(obj))


def _stop(processes, index_queues):
    for q in index_queues:
        try:
            q.put(None)
        except (OSError, ValueError):
            pass
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=1)


class WorkerPool:
    """num_workers processes building batches; `run(index_batches, finish)` yields finished batches in order."""

    def __init__(self, dataset, collate_fn: Optional[Callable], use_get_batch: bool, num_workers: int,
                 base_seed: int, worker_init_fn: Optional[Callable], context=None):
        if context is None or isinstance(context, str):
            import multiprocessing  # on first use: importing it costs ~10 ms that loaders without workers never need
            context = multiprocessing.get_context(context)
        self.num_workers = num_workers
        self.index_queues = [context.Queue() for _ in range(num_workers)]
        self.result_queue = context.Queue()
        self.processes = []
        for i in range(num_workers):
            p = context.Process(target=_worker_loop,
                                args=(dataset, collate_fn, use_get_batch, self.index_queues[i], self.result_queue,
                                      i, num_workers, base_seed + i, worker_init_fn),
                                daemon=True, name=f"cutegrad-data-worker-{i}")
            p.start()
            self.processes.append(p)
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.index_queues)
        self._run = 0  # results of an abandoned epoch (a loop left early) carry an older number and are dropped

    def close(self):
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(p.is_alive() for p in self.processes)

    def run(self, index_batches: list, depth: int, timeout: float, finish: Callable[[Any], Any]):
        """Batches of index_batches in order, built by the workers; `finish` is applied in this process."""
        self._run += 1
        run = self._run
        total = len(index_batches)
        sent = 0
        done = {}
        for number in range(total):
            while sent < total and sent - number < depth:
                self.index_queues[sent % self.num_workers].put((run, sent, index_batches[sent]))
                sent += 1
            while number not in done:
                got_run, got, payload = self._get(timeout)
                if got_run == run:
                    done[got] = payload
            payload = pickle.loads(done.pop(number))
            if isinstance(payload, _WorkerError):
                payload.reraise()
            yield finish(payload)

    def _get(self, timeout: float):
        while True:
            try:
                return self.result_queue.get(timeout=timeout if timeout > 0 else 1.0)
            except queue.Empty:
                if timeout > 0:
                    raise RuntimeError(f"DataLoader timed out after {timeout} seconds waiting for a batch")
                dead = [p for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"DataLoader worker (pid {dead[0].pid}) exited unexpectedly with exit code "
                                       f"{dead[0].exitcode}")
