"""Pinned (page-locked) host memory for asynchronous host<->device copies, cached.

cuMemFreeHost synchronises the whole device, so freeing staging memory after
each copy would stall the host behind unrelated work on every stream (and hang
outright if a stream waits for the host). Buffers are therefore cached, as
PyTorch's CachingHostAllocator does: a dead buffer returns to a free list keyed
by its size class (a power of two, at least 512 B) together with an event
recorded after the last copy that used it, and is handed out again once that
event has completed. Memory goes back to the driver only in
`empty_pinned_cache()`.

Staging memory is host work, so taking a buffer during graph capture is
refused (see docs/graphs.md).
"""
import ctypes
import threading

import numpy as np

from . import driver as _drv
from .capture_guard import _check_not_capturing

_MIN_SIZE = 512
_lock = threading.Lock()
_free = {}  # size class -> [(ptr, Event or None)], most recently freed last


def _size_class(nbytes):
    return max(_MIN_SIZE, 1 << (nbytes - 1).bit_length())


def _take(nbytes):
    size = _size_class(nbytes)
    with _lock:
        entries = _free.get(size)
        if entries:
            for i in range(len(entries) - 1, -1, -1):
                ptr, event = entries[i]
                if event is None or event.query():
                    del entries[i]
                    return ptr, size
    from .device import current_device
    _drv.activate(current_device())
    return int(_drv.call("cuMemHostAlloc", size, 0)), size


def _give_back(ptr, size, event):
    with _lock:
        _free.setdefault(size, []).append((ptr, event))


def empty_pinned_cache():
    """Free every cached pinned buffer (waits for the copies that used them)."""
    _check_not_capturing("cutegrad.cuda.empty_pinned_cache()")
    with _lock:
        entries = [e for lst in _free.values() for e in lst]
        _free.clear()
    for ptr, event in entries:
        if event is not None and event._cu is not None:
            # the raw wait: an index error pending on the device must not stop the freeing
            _drv.call("cuEventSynchronize", event._cu)
        _drv.call("cuMemFreeHost", ptr)


class PinnedBuffer:
    """At least `nbytes` of page-locked host memory, from the cache.

    It must outlive every copy queued from or into it: `record(stream)` after
    queuing such a copy, so the memory is reused only once the copy is done.
    `array(dtype, shape)` is a NumPy view that keeps the buffer alive.
    """

    __slots__ = ("ptr", "nbytes", "_size", "_event", "__weakref__")

    def __init__(self, nbytes):
        _check_not_capturing("pinned host staging buffer (PinnedBuffer)")
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError(f"PinnedBuffer: nbytes must be >= 0, got {nbytes}")
        self.nbytes = nbytes
        self._event = None
        self.ptr, self._size = _take(nbytes) if nbytes else (0, 0)

    def array(self, dtype, shape):
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count * dtype.itemsize > self.nbytes:
            raise ValueError(f"a {shape} {dtype} view needs {count * dtype.itemsize} bytes, "
                             f"the pinned buffer has {self.nbytes}")
        if not count:
            return np.empty(shape, dtype)
        raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.ptr)
        raw.owner = self
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def record(self, stream):
        """Note that a copy queued on `stream` uses this buffer."""
        from .events import Event
        if self._event is None:
            self._event = Event()
        self._event.record(stream)

    def __del__(self):
        ptr = getattr(self, "ptr", 0)
        if ptr:
            self.ptr = 0
            _give_back(ptr, self._size, self._event)
