"""cutegrad.allocator: a stream-ordered caching allocator that knows about CUDA graphs.

The policy (``CachingAllocator``) is separate from the memory it manages. A
*memory backend* is any object with these members; streams are opaque ints and
events opaque handles, both given by the backend:

``device``                                   device index (int)
``total_memory() -> int``                    bytes of device memory (for the fraction cap)
``mem_get_info() -> (free, total)``          for out-of-memory reports
``malloc(nbytes, capture_underway) -> int | None``
                                             a new driver allocation, or None when the
                                             device is out of memory; ``capture_underway``
                                             says a graph capture is in progress, so the
                                             call must be safe during capture
``free(ptr)``                                give a driver allocation back (synchronizing)
``fill(ptr, nbytes, value, stream)``         stream-ordered memset (poisoning freed blocks)
``event_create() -> event``
``event_record(event, stream)``              mark the current end of ``stream``'s work
``event_query(event) -> bool``               has that work completed?
``event_synchronize(event)``                 wait on the host until it has
``capture_id(stream) -> id | None``          the stream's capture sequence, None if not capturing

Backends: ``CudaMemory`` (CUDA driver API through cuda-bindings, imported only
when one is created, so this package imports on machines without a GPU) and
``SimulatedMemory`` (a fake device for CPU tests).

Hot-path API used by CUDA tensors: ``get_allocator(device).malloc(nbytes, stream)``
returns a ``Block`` with ``.ptr``, ``.size`` and ``.stream``; ``free(block)`` and
``record_stream(block, stream)``. docs/allocator.md has the policy, the
invariants, the capture rules and the ``CUTEGRAD_CUDA_ALLOC_CONF`` keys.
"""

from __future__ import annotations

import threading

from .block import Block
from .caching import CachingAllocator
from .config import ENV_VAR, AllocatorConfig, parse_config
from .errors import CaptureError, OutOfMemoryError
from .simulated import SimulatedMemory

__all__ = [
    "Block", "CachingAllocator", "CaptureError", "CudaMemory", "AllocatorConfig", "ENV_VAR",
    "OutOfMemoryError", "SimulatedMemory", "get_allocator", "parse_config",
]

_default_allocators = {}
_default_lock = threading.Lock()


def get_allocator(device_index=0):
    """The process-wide caching allocator of CUDA device ``device_index``, created on first use."""
    alloc = _default_allocators.get(device_index)
    if alloc is None:
        with _default_lock:
            alloc = _default_allocators.get(device_index)
            if alloc is None:
                from .cuda_memory import CudaMemory
                alloc = CachingAllocator(CudaMemory(device_index))
                _default_allocators[device_index] = alloc
    return alloc


def __getattr__(name):
    # CudaMemory is exported lazily so importing the package never touches cuda-bindings.
    if name in ("CudaMemory", "CudaDriverError", "NoCudaDeviceError"):
        from . import cuda_memory
        return getattr(cuda_memory, name)
    raise AttributeError(f"module 'cutegrad.allocator' has no attribute {name!r}")
