"""What every CUDA kernel family shares: the calling thread's current stream, output
allocation from the caching allocator (optionally poisoned for tests), device
pointers of views, broadcast strides, and the generic copy kernel used for casts.
"""
from ... import dtypes as dt
from ...cuda import driver as _driver, streams as _streams, tensors as _cuda_tensors
from ...device import CUDA
from ...ops import codes as _codes
from ...tensor import _STRIDES, Tensor, contiguous_strides, make


# compute types and kernel families of kernels/cuda/ops_args.h
_F32, _F64, _I64 = 0, 1, 2
_UNARY, _BINARY, _WHERE, _CLAMP, _ACT, _COPY, _ARANGE = range(7)
_VAR, _LOGSUMEXP = _codes.VAR, _codes.LOGSUMEXP
_ABSENT, _SCALAR = -1, -2
_UNIFORM, _NORMAL, _RANDINT, _BERNOULLI = range(4)

# compute type of each dtype, by DType.index
_COMPUTE = tuple(_I64 if d.category != dt.FLOAT else (_F64 if d is dt.float64 else _F32) for d in dt.ALL)
_HALF = (dt.float16, dt.bfloat16)
_GEMM_DTYPE = {dt.float32: "fp32", dt.bfloat16: "bf16", dt.float16: "fp16"}
_NO_STRIDES = ()
_GEMM_MAX_BATCH = 65535

_new_object = object.__new__
_stream_tls = _streams._tls
_driver_tls = _driver._tls
_DeviceStorage = _cuda_tensors.DeviceStorage
_native = None
_allocators = {}
_poison = False
_device_tensor = None  # cutegrad._C.device_tensor once bound (_bind_device_tensor)


def _lib():
    global _native
    if _native is None:
        from ..._gemm import native
        _native = native()
    return _native


def set_poison_outputs(flag):
    """Fill every output this backend allocates with 0xFF bytes (NaN for floats) before the kernel runs.

    For tests: an element a kernel forgets to write then shows up as NaN (or -1).
    """
    global _poison
    _poison = bool(flag)


def _stream(idx):
    """Handle of the calling thread's current stream on device idx (0: the legacy default stream)."""
    cur = _stream_tls.current
    if cur is not None:
        s = cur.get(idx)
        if s is not None:
            return s.handle
    return 0


def _allocator(idx):
    alloc = _allocators.get(idx)
    if alloc is None:
        from cutegrad.allocator import get_allocator
        alloc = _allocators[idx] = get_allocator(idx)
        _bind_device_tensor()
    return alloc


def _bind_device_tensor():
    """Build outputs with _C.device_tensor from the first allocation on (the real module's,
    also on the dry-run device: it launches nothing); without _C, _empty builds them."""
    global _device_tensor
    if _device_tensor is not None:
        return
    try:
        from cutegrad._C import bind_device_tensor, device_tensor
    except ImportError:
        return
    bind_device_tensor(Tensor, _DeviceStorage, dt.DType, _STRIDES, contiguous_strides)
    _device_tensor = device_tensor


def _empty(shape, dtype, dev, stream):
    """A new contiguous tensor on dev, taken on `stream` (the device's current one).

    Every kernel's output comes from here. _C.device_tensor does what the rest
    of this function does, in C (kernels/cuda/allocator_bindings.cpp), unless
    outputs are poisoned; the helpers the Python version would call (numel_of,
    driver.activate when the context is already current) are inlined.
    """
    idx = dev.index
    if _driver_tls.ctx_device != idx:
        _driver.activate(idx)
    if _device_tensor is not None and not _poison:
        return _device_tensor(_allocators.get(idx) or _allocator(idx), shape, dtype, dev, stream)
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    alloc = _allocators.get(idx) or _allocator(idx)
    block = alloc.malloc(nbytes, stream)
    if _poison and nbytes:
        _driver.call("cuMemsetD8Async", block.ptr, 0xFF, nbytes, _driver.driver().CUstream(stream))
    storage = _new_object(_DeviceStorage)  # DeviceStorage(block, alloc, dev) without its __init__ frame
    storage.data, storage.device, storage.version, storage.allocator = block, dev, 0, alloc
    # tensor.make inlined: a CUDA output has no NumPy view and no base.
    t = _new_object(Tensor)
    t._storage, t._shape, t._strides, t._offset, t._dtype = (
        storage, shape, _STRIDES.get(shape) or contiguous_strides(shape), 0, dtype)
    t._np = t._grad = t.grad_fn = t._base = t._hooks = t._accum = t._base_fn = None
    t._requires_grad = t._retains_grad = False
    return t


def _ptr(t):
    return t._storage.data.ptr + t._offset * t._dtype.itemsize


_BSTRIDES = {}  # (shape, strides, broadcast shape) -> broadcast strides; a model repeats few


def _bstrides(t, shape):
    """t's strides broadcast to `shape` (0 on broadcast and missing leading dimensions)."""
    ts = t._shape
    if ts == shape:
        return t._strides
    st = t._strides
    key = (ts, st, shape)
    try:
        out = _BSTRIDES.get(key)
    except TypeError:  # `shape` given as a list: not remembered
        out = key = None
    if out is None:
        off = len(shape) - len(ts)
        out = tuple(0 if i < off or ts[i - off] == 1 else st[i - off] for i in range(len(shape)))
        if key is not None and len(_BSTRIDES) < 4096:
            _BSTRIDES[key] = out
    return out


def _as_number(v):
    """A 0-dim tensor on another device (the CPU) acts as a Python scalar beside CUDA tensors."""
    return v.item() if isinstance(v, Tensor) else v


def _is_cuda(v):
    return isinstance(v, Tensor) and v._storage.device.backend == CUDA


def _copy_compute(src, dst):
    if src.category != dt.FLOAT:
        return _I64
    return _F64 if (src is dt.float64 or dst is dt.float64) else _F32


def _copy_into(dst, src, stream):
    """dst[...] = src (broadcast, cast) on the GPU; both on the same device."""
    _lib().elementwise(_COPY, 0, _copy_compute(src._dtype, dst._dtype), dst._shape, _ptr(dst), dst._dtype.index,
                       dst._strides, _ptr(src), src._dtype.index, _bstrides(src, dst._shape), None,
                       0, _ABSENT, _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None, None, None, stream)


def _contig(x, stream):
    if _STRIDES.get(x._shape) is x._strides or x.is_contiguous():  # the first test: every kernel output
        return x
    out = _empty(x._shape, x._dtype, x._storage.device, stream)
    _copy_into(out, x, stream)
    return out


def _cast_new(x, dtype, stream):
    out = _empty(x._shape, dtype, x._storage.device, stream)
    _copy_into(out, x, stream)
    return out


def _fill(out, value, stream):
    _lib().elementwise(_COPY, 0, _COMPUTE[out._dtype.index], out._shape, _ptr(out), out._dtype.index, out._strides,
                       0, _SCALAR, _NO_STRIDES, value, 0, _ABSENT, _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None,
                       None, None, stream)


def _on(dev, t, stream):
    """t on device dev (index tensors may arrive from the host)."""
    if t._storage.device is dev:
        return t
    from ...ops import to_device
    return to_device(t, dev)
