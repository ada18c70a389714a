"""CUDA tensors: storage from the caching allocator, creation, and copies between devices.

Importing this module registers the CUDA implementations of the storage
kernels of the registry (`dispatch.register(name, device.CUDA)`): `empty`,
`full`, `from_numpy`, `to_device`. `copy_` and the compute kernels come with the
CUDA backend (cutegrad.backends.cuda), which uses `copy_through_host` here for
copies the GPU kernel cannot make; without them an op on a CUDA tensor raises the registry's
NotImplementedError naming the kernel.

Storage: a CUDA tensor's storage is a `DeviceStorage`, whose `data` is a
block of `cutegrad.allocator.get_allocator(device)` (`.ptr`, `.nbytes`) taken
on the device's current stream; the storage gives it back to the allocator
(stream-ordered) when the last tensor or view of it dies. One object beside the
Tensor, so an op's output costs two objects. `record_stream(tensor, stream)` marks a use on another stream so
the block is not reused before that use completes.

Copies (all ordered on the current stream of the device involved):
- host -> device: the values are converted on the host into a pinned staging
  buffer, then copied asynchronously; the call returns without waiting for the
  GPU, and the buffer is reused only after the copy (pinned.py).
- device -> host (`.cpu()`, `.item()`, `.tolist()`, printing): the bytes the
  view spans are copied into a pinned buffer, the host waits for that stream,
  and NumPy gathers the strided view. Refused during graph capture.
- device -> device with the same dtype and shape, both contiguous: one
  cuMemcpyAsync. Across devices it runs on the source device's current stream,
  which first waits for the destination's current stream; the destination's
  stream then waits for the copy (PyTorch's protocol), so neither block needs a
  cross-device record_stream.
- anything needing a cast, a broadcast or a strided destination goes through
  the host (correct, synchronous, refused during capture) until device kernels
  for it exist.
- `full` writes the value's bit pattern with 8/16/32-bit memsets; a 64-bit
  value whose halves differ uses two strided 32-bit memsets.
"""
import numpy as np

from .. import dtypes as dt
from ..device import CUDA
from ..dispatch import register
from ..tensor import Storage, contiguous_strides, from_numpy_owned, make, numel_of
from . import copies
from . import driver as _drv
from .capture_guard import _check_not_capturing
from .pinned import PinnedBuffer
from .streams import current_stream

_U32 = 0xFFFFFFFF
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _get_allocator(index):
    from cutegrad.allocator import get_allocator
    # The allocator pushes and pops the context around its own driver calls;
    # the copies and fills done on what it returns need the device's context
    # current on this thread.
    _drv.activate(index)
    return get_allocator(index)


class DeviceStorage(Storage):
    """The Storage of a CUDA tensor whose memory came from the caching allocator.

    `data` is the allocator's Block (`.ptr`, `.nbytes`), given back to
    `allocator` when this storage dies.
    """

    __slots__ = ("allocator",)

    def __init__(self, block, allocator, device):
        self.data = block
        self.device = device
        self.version = 0
        self.allocator = allocator

    def record_stream(self, stream):
        if stream.device != self.device.index:
            raise ValueError(f"record_stream: the tensor is on {self.device}, the stream on cuda:{stream.device}")
        self.allocator.record_stream(self.data, stream.handle)

    def __del__(self):
        block, self.data = self.data, None
        if block is not None:
            self.allocator.free(block)


def record_stream(tensor, stream):
    """Mark `tensor`'s memory as used by work queued on `stream`.

    Its block then returns to the allocator only after that work completes.
    Memory imported through DLPack belongs to its producer; nothing to do there.
    """
    rec = getattr(tensor._storage, "record_stream", None)
    if rec is not None:
        rec(stream)


def _new(shape, dtype, device):
    """A contiguous CUDA tensor of uninitialised memory, and the stream it was taken on."""
    shape = tuple(shape)
    idx = device.index
    s = current_stream(idx)
    nbytes = numel_of(shape) * dtype.itemsize
    alloc = _get_allocator(idx)
    block = alloc.malloc(nbytes, s.handle)
    return make(DeviceStorage(block, alloc, device), shape, contiguous_strides(shape), 0, dtype), s


def _span(t):
    """Elements from t's first element to its last one in memory (strides are >= 0)."""
    return 1 + sum((n - 1) * st for n, st in zip(t._shape, t._strides))


def _upload(host, dst_ptr, stream):
    """Queue a copy of the C-contiguous host array `host` to `dst_ptr` via pinned staging."""
    raw = host.reshape(-1).view(np.uint8)
    if not raw.size:
        return
    buf = PinnedBuffer(raw.size)
    buf.array(np.uint8, (raw.size,))[...] = raw
    copies.host_to_device(dst_ptr, buf.ptr, raw.size, stream)
    buf.record(stream)


def _download_span(t):
    """The bytes of t's span as a host array of t's dtype (waits for the current stream)."""
    _check_not_capturing("copying a CUDA tensor to the host (.cpu(), .item(), .tolist(), printing)")
    span = _span(t)
    s = current_stream(t._storage.device.index)
    buf = PinnedBuffer(span * t._dtype.itemsize)
    copies.device_to_host(buf.ptr, t.data_ptr(), span * t._dtype.itemsize, s)
    s.synchronize()
    return buf.array(t._dtype.np, (span,))


def _strided_view(flat, t):
    isz = t._dtype.itemsize
    return np.lib.stride_tricks.as_strided(flat, t._shape, tuple(st * isz for st in t._strides))


def host_array(t):
    """The values of CUDA tensor t as a new C-contiguous NumPy array."""
    if numel_of(t._shape) == 0:
        return np.empty(t._shape, t._dtype.np)
    return np.array(_strided_view(_download_span(t), t), order="C")


def _host_values(src, shape, dtype):
    """src's values broadcast to `shape` and cast to `dtype`, C-contiguous on the host."""
    arr = src._np if src._storage.device.type == "cpu" else host_array(src)
    out = np.empty(shape, dtype.np)
    np.copyto(out, np.broadcast_to(arr, shape), casting="unsafe")
    return out


def _copy_between_devices(dst_ptr, dst_dev, src_ptr, src_dev, nbytes):
    dst_stream = current_stream(dst_dev)
    if dst_dev == src_dev:
        copies.device_to_device(dst_ptr, src_ptr, nbytes, dst_stream)
        return
    src_stream = current_stream(src_dev)
    src_stream.wait_stream(dst_stream)
    copies.device_to_device(dst_ptr, src_ptr, nbytes, src_stream)
    dst_stream.wait_stream(src_stream)


def _overlaps(a, b):
    if a._storage is not b._storage:
        return False
    isz_a, isz_b = a._dtype.itemsize, b._dtype.itemsize
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + _span(b) * isz_b and b0 < a0 + _span(a) * isz_a


# --- kernels ----------------------------------------------------------------------
@register("empty", CUDA)
def empty(shape, dtype, device):
    return _new(shape, dtype, device)[0]


@register("full", CUDA)
def full(shape, value, dtype, device):
    isz = dtype.itemsize
    pattern = int(dt.to_numpy(value, dtype).view(_UINT[isz]))  # raises before allocating
    t, s = _new(shape, dtype, device)
    n = numel_of(t._shape)
    if not n:
        return t
    ptr = t.data_ptr()
    if isz == 1:
        copies.memset8(ptr, pattern, n, s)
    elif isz == 2:
        copies.memset16(ptr, pattern, n, s)
    elif isz == 4:
        copies.memset32(ptr, pattern, n, s)
    else:
        lo, hi = pattern & _U32, pattern >> 32
        if lo == hi:
            copies.memset32(ptr, lo, 2 * n, s)
        else:
            copies.memset32_strided(ptr, 8, lo, n, s)
            copies.memset32_strided(ptr + 4, 8, hi, n, s)
    return t


@register("from_numpy", CUDA)
def from_numpy(arr, dtype, device):
    host = np.array(dt.to_numpy(arr, dtype), order="C", copy=True)
    t, s = _new(host.shape, dtype, device)
    _upload(host, t.data_ptr(), s)
    return t


@register("to_device", CUDA)
def to_device(t, device):
    src = t._storage.device
    if device.type == "cpu":
        return from_numpy_owned(host_array(t), t._dtype)
    if src.type == "cpu":
        return from_numpy(t._np, t._dtype, device)
    if t.is_contiguous():
        out = _new(t._shape, t._dtype, device)[0]
        nbytes = numel_of(t._shape) * t._dtype.itemsize
        if nbytes:
            _copy_between_devices(out.data_ptr(), device.index, t.data_ptr(), src.index, nbytes)
        return out
    return from_numpy(host_array(t), t._dtype, device)


def copy_through_host(dst, src):
    """dst[...] = src where the GPU copy kernel cannot: across devices, from the host, or
    with no driver running (simulated devices).  The registry's CUDA `copy_` is
    cutegrad.backends.cuda.copies.copy_, which calls this."""
    n = numel_of(dst._shape)
    if not n:
        return dst
    dev = dst._storage.device.index
    s = current_stream(dev)
    if (src._storage.device.type == "cuda" and src._dtype is dst._dtype and src._shape == dst._shape
            and src.is_contiguous() and dst.is_contiguous() and not _overlaps(dst, src)):
        _copy_between_devices(dst.data_ptr(), dev, src.data_ptr(), src._storage.device.index,
                              n * dst._dtype.itemsize)
        return dst
    values = _host_values(src, dst._shape, dst._dtype)
    if dst.is_contiguous():
        _upload(values, dst.data_ptr(), s)
        return dst
    # A strided destination: read its span, write the view on the host, write the span back.
    span = np.array(_download_span(dst))
    _strided_view(span, dst)[...] = values
    _upload(span, dst.data_ptr(), s)
    return dst
