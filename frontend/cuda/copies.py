"""Byte copies and fills on raw device pointers, and pinned host buffers.

These are the driver's own asynchronous memcpy/memset, ordered on a stream;
tensors, graphs and tests build on them. Pointers are ints. A copy whose host
side is pageable memory is synchronous with respect to the host for
device-to-host, which is why async device-to-host copies stage through a
`PinnedBuffer` (page-locked memory from cuMemHostAlloc).
"""
import ctypes

import numpy as np

from . import capture_guard
from . import driver as _drv
from .streams import current_stream

# Pinned buffers that died while a graph was being captured: freeing page-locked
# memory synchronises, which would invalidate the capture, so it waits until the
# next buffer is made or a capture ends (free_deferred_pinned).
_deferred = []


def _stream(stream):
    return current_stream() if stream is None else stream


def host_to_device(dst_ptr, src_host_ptr, nbytes, stream=None):
    if nbytes:
        _drv.call("cuMemcpyHtoDAsync", dst_ptr, src_host_ptr, nbytes, _stream(stream)._cu)


def device_to_host(dst_host_ptr, src_ptr, nbytes, stream=None):
    if nbytes:
        _drv.call("cuMemcpyDtoHAsync", dst_host_ptr, src_ptr, nbytes, _stream(stream)._cu)


def device_to_device(dst_ptr, src_ptr, nbytes, stream=None):
    """Copy between device pointers (any devices of this process: unified addressing)."""
    if nbytes:
        _drv.call("cuMemcpyAsync", dst_ptr, src_ptr, nbytes, _stream(stream)._cu)


def memset8(ptr, value, count, stream=None):
    """Set `count` bytes at `ptr` to `value` (0..255)."""
    if count:
        _drv.call("cuMemsetD8Async", ptr, value & 0xFF, count, _stream(stream)._cu)


def memset16(ptr, value, count, stream=None):
    """Set `count` 16-bit words at `ptr` (2-byte aligned) to the bit pattern `value`."""
    if count:
        _drv.call("cuMemsetD16Async", ptr, value & 0xFFFF, count, _stream(stream)._cu)


def memset32(ptr, value, count, stream=None):
    """Set `count` 32-bit words at `ptr` (4-byte aligned) to the bit pattern `value`."""
    if count:
        _drv.call("cuMemsetD32Async", ptr, value & 0xFFFFFFFF, count, _stream(stream)._cu)


class PinnedBuffer:
    """Page-locked host memory: the staging area of asynchronous host<->device copies.

    It must outlive every copy queued from or into it; `record(stream)` keeps an
    event so that `__del__`-time freeing (cuMemFreeHost, which synchronises)
    happens only after that copy. `array(dtype, shape)` is a NumPy view that
    keeps the buffer alive.
    """

    __slots__ = ("ptr", "nbytes", "_event", "__weakref__")

    def __init__(self, nbytes):
        from .device import current_device
        _drv.activate(current_device())
        self.ptr = 0
        self.nbytes = int(nbytes)
        self._event = None
        if _deferred and not capture_guard.any_capture_underway():
            free_deferred_pinned()
        if self.nbytes:
            self.ptr = int(_drv.call("cuMemHostAlloc", self.nbytes, 0))

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
        """Note that a copy on `stream` uses this buffer, so freeing waits for it."""
        from .events import Event
        if self._event is None:
            self._event = Event()
        self._event.record(stream)

    def __del__(self):
        if getattr(self, "ptr", 0):
            _deferred.append((self.ptr, self._event))
            self.ptr = 0
            if not capture_guard.any_capture_underway():
                free_deferred_pinned()


def free_deferred_pinned():
    """Free pinned buffers that died, after the copies recorded on them finished."""
    while _deferred:
        ptr, event = _deferred.pop()
        try:
            if event is not None and event._cu is not None:
                _drv.call_status("cuEventSynchronize", event._cu)
            _drv.call_status("cuMemFreeHost", ptr)
        except Exception:  # interpreter shutdown may have torn the bindings down
            pass
