"""Byte copies and fills on raw device pointers.

These are the driver's own asynchronous memcpy/memset, ordered on a stream;
tensors, graphs and tests build on them. Pointers are ints. A copy whose host
side is pageable memory is synchronous with respect to the host for
device-to-host, which is why async device-to-host copies stage through a
`pinned.PinnedBuffer`.
"""
from . import driver as _drv
from .pinned import PinnedBuffer, empty_pinned_cache  # noqa: F401  (re-exported)
from .streams import current_stream


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


def memset32_strided(ptr, pitch, value, count, stream=None):
    """Set one 32-bit word every `pitch` bytes, `count` times, starting at `ptr`.

    Two of these fill 64-bit values (low words, then high words at ptr + 4)
    without a kernel.
    """
    if count:
        _drv.call("cuMemsetD2D32Async", ptr, pitch, value & 0xFFFFFFFF, 1, count, _stream(stream)._cu)
