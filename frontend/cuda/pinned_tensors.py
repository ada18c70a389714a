"""Pinned CPU tensors: `Tensor.pin_memory()`, `Tensor.is_pinned()` and the
asynchronous upload of a pinned tensor.

A pinned tensor is an ordinary CPU tensor whose NumPy storage views a
`PinnedBuffer` (page-locked memory from the cached pinned host allocator,
pinned.py); the buffer lives as long as the storage, and goes back to the
cache when the tensor dies, after the copies recorded on it are done.

`to("cuda", non_blocking=True)` from a contiguous pinned tensor queues one DMA
straight from its memory on the destination's current stream and returns at
once, as in torch: the caller must not write the source until the copy is
done (synchronize the stream, or let the next batch use another buffer, which
the DataLoader's pinned batches do). Every other upload first converts into a
pinned staging buffer, so the source is free again when `to()` returns.
"""
import numpy as np

from ..tensor import Tensor, from_numpy_owned, numel_of
from .pinned import PinnedBuffer


def pinned_buffer_of(t):
    """The PinnedBuffer under CPU tensor t's storage, or None."""
    if t._storage.device.type != "cpu":
        return None
    a = t._storage.data
    while isinstance(a, np.ndarray):
        a = a.base
    owner = getattr(a, "owner", None)
    return owner if isinstance(owner, PinnedBuffer) else None


def is_pinned(t):
    """Whether t is a CPU tensor in page-locked memory (False for CUDA tensors, as torch)."""
    return pinned_buffer_of(t) is not None


def pin_memory(t):
    """A copy of CPU tensor t in page-locked memory (t itself when it is pinned already); needs a GPU."""
    if t._storage.device.type != "cpu":
        raise RuntimeError(f"cannot pin '{t._storage.device}' memory: only dense CPU tensors can be pinned")
    if pinned_buffer_of(t) is not None:
        return t
    buf = PinnedBuffer(numel_of(t._shape) * t._dtype.itemsize)
    arr = buf.array(t._dtype.np, t._shape)
    arr[...] = t._np
    out = from_numpy_owned(arr, t._dtype)
    out._requires_grad = t._requires_grad and t._dtype.is_floating_point
    return out


def upload_non_blocking(t, device):
    """t (a pinned CPU tensor) copied to CUDA `device` by one asynchronous DMA; None when t does not qualify."""
    buf = pinned_buffer_of(t)
    if buf is None or not t.is_contiguous():
        return None
    from . import copies
    from .tensors import _new
    out, stream = _new(t._shape, t._dtype, device)
    nbytes = numel_of(t._shape) * t._dtype.itemsize
    if nbytes:
        copies.host_to_device(out.data_ptr(), t._np.ctypes.data, nbytes, stream)
        buf.record(stream)  # the cache hands this memory out again only after the copy
    return out


Tensor.pin_memory = pin_memory
Tensor.is_pinned = is_pinned
