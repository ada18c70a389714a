"""DLPack exchange: `Tensor.__dlpack__`, `Tensor.__dlpack_device__`, `cutegrad.from_dlpack`.

Zero-copy both ways with any DLPack producer or consumer (NumPy, PyTorch,
CuPy, JAX): the other library's array and the cutegrad tensor are two views of
one memory, and a write through either is seen by the other.

The protocol is implemented here rather than borrowed from NumPy because
NumPy's `__dlpack__` refuses bfloat16 and cannot describe a cutegrad storage
offset. The ctypes layouts are in `dlpack_abi.py`.

Lifetime
--------
Export: every capsule owns a DLManagedTensor (or DLManagedTensorVersioned when
the consumer passes max_version >= (1, 0)) registered in `_exports` together
with the exported tensor's Storage. The consumer renames the capsule to
"used_dltensor" and calls the deleter when it is done, which drops the entry
and with it the last reference cutegrad keeps for the consumer. A capsule that
is never consumed is released by its destructor.

Import: the capsule is renamed to "used_dltensor[_versioned]" and its deleter
is owned by a `ProducerHandle`, referenced by the memory object under the new
tensor's Storage; the producer's memory is released when the last cutegrad
view of it dies, even if the producer's own array was deleted long before.

Devices
-------
The core (`capsule_for`, `tensor_from_capsule`) only deals in addresses, device
type and id, so a CUDA storage (any object with `.ptr`) goes through the same
code. What is CUDA-specific is stream ordering (the `stream` argument of
`__dlpack__`): it uses `cutegrad.cuda`'s current_stream / Event /
ExternalStream, imported on first CUDA use.
"""
import ctypes
from typing import NamedTuple

import numpy as np

from .. import dtypes as dt
from ..device import device as _device, cpu as _cpu
from ..tensor import Storage, make, from_numpy_owned, numel_of, contiguous_strides
from . import dlpack_abi as abi

_TO_DL = {
    dt.bool_: (abi.kDLBool, 8),
    dt.uint8: (abi.kDLUInt, 8),
    dt.int8: (abi.kDLInt, 8),
    dt.int16: (abi.kDLInt, 16),
    dt.int32: (abi.kDLInt, 32),
    dt.int64: (abi.kDLInt, 64),
    dt.float16: (abi.kDLFloat, 16),
    dt.bfloat16: (abi.kDLBfloat, 16),
    dt.float32: (abi.kDLFloat, 32),
    dt.float64: (abi.kDLFloat, 64),
}
_FROM_DL = {v: k for k, v in _TO_DL.items()}
_CODE_NAMES = {abi.kDLInt: "int", abi.kDLUInt: "uint", abi.kDLFloat: "float", abi.kDLBfloat: "bfloat",
               abi.kDLComplex: "complex", abi.kDLBool: "bool"}

# DLPack device types whose memory the CPU can address directly.
_HOST_DEVICE_TYPES = (abi.kDLCPU, abi.kDLCUDAHost)


# --- export -------------------------------------------------------------------------
class _Export:
    """What must stay alive until the consumer calls the deleter."""

    __slots__ = ("managed", "shape", "strides", "owner")


_exports = {}  # address of a managed struct -> _Export


def _release_export(address):
    try:
        _exports.pop(address, None)
    except Exception:  # module globals already torn down at interpreter exit
        pass


@abi.DELETER
def _export_deleter(address):
    _release_export(address)


@abi.CAPSULE_DESTRUCTOR
def _capsule_destructor(capsule_address):
    # Only an unconsumed capsule still has our name; a consumer renamed it and
    # owns the deleter call.
    for name in (abi.NAME_VERSIONED, abi.NAME_LEGACY):
        if abi.capsule_is(capsule_address, name):
            _release_export(abi.capsule_pointer(capsule_address, name))
            return


abi.immortal(_export_deleter)
abi.immortal(_capsule_destructor)


def capsule_for(ptr, shape, strides, dtype, device_type, device_id, owner, *,
                byte_offset=0, versioned=False, read_only=False, copied=False):
    """A DLPack capsule describing memory that cutegrad (or a backend) owns.

    ptr: address of element [0, ..., 0] minus byte_offset (an int; device
    address for device memory). shape, strides: tuples of ints, strides in
    elements. dtype: a cutegrad dtype. device_type, device_id: the DLPack
    device (`dlpack_abi.kDLCPU`, `kDLCUDA`, ...). owner: any object; it is
    kept alive until the consumer calls the deleter (or the capsule dies
    unconsumed), so pass what keeps the memory allocated (a Storage).
    versioned: produce a "dltensor_versioned" capsule (DLManagedTensorVersioned,
    for consumers that passed max_version >= (1, 0)) with the READ_ONLY and
    IS_COPIED flags as given; otherwise a legacy "dltensor" capsule.
    """
    code, bits = _dl_dtype(dtype)
    ndim = len(shape)
    exp = _Export()
    exp.shape = (ctypes.c_int64 * ndim)(*shape)
    exp.strides = (ctypes.c_int64 * ndim)(*strides)
    exp.owner = owner
    if versioned:
        m = abi.DLManagedTensorVersioned()
        m.version.major, m.version.minor = abi.VERSION
        m.flags = (abi.FLAG_READ_ONLY if read_only else 0) | (abi.FLAG_IS_COPIED if copied else 0)
        name = abi.NAME_VERSIONED
    else:
        m = abi.DLManagedTensor()
        name = abi.NAME_LEGACY
    t = m.dl_tensor
    t.data = ptr
    t.device.device_type = device_type
    t.device.device_id = device_id
    t.ndim = ndim
    t.dtype.code, t.dtype.bits, t.dtype.lanes = code, bits, 1
    t.shape = ctypes.cast(exp.shape, ctypes.POINTER(ctypes.c_int64))
    t.strides = ctypes.cast(exp.strides, ctypes.POINTER(ctypes.c_int64))
    t.byte_offset = byte_offset
    m.deleter = _export_deleter
    exp.managed = m
    address = ctypes.addressof(m)
    _exports[address] = exp
    return abi.new_capsule(address, name, _capsule_destructor)


def _dl_dtype(dtype):
    pair = _TO_DL.get(dtype)
    if pair is None:
        raise BufferError(f"dtype {dtype} cannot be exported through DLPack")
    return pair


def device_of(tensor):
    """`Tensor.__dlpack_device__`: (DLPack device type, device id)."""
    dev = tensor._storage.device
    if dev.type == "cpu":
        return (abi.kDLCPU, 0)
    if dev.type == "cuda":
        return (abi.kDLCUDA, dev.index)
    raise BufferError(f"no DLPack device type for {dev}")


def _device_from_dl(dl_device):
    try:
        kind, index = (int(v) for v in dl_device)
    except (TypeError, ValueError):
        raise TypeError(f"dl_device must be a (device_type, device_id) pair of ints, got {dl_device!r}") from None
    if kind == abi.kDLCPU:
        return _cpu
    if kind == abi.kDLCUDA:
        return _device(f"cuda:{index}")
    raise BufferError(f"cutegrad cannot export to DLPack device type {kind} (it knows CPU=1 and CUDA=2)")


def to_capsule(tensor, stream=None, *, max_version=None, dl_device=None, copy=None):
    """`Tensor.__dlpack__(stream=None, max_version=None, dl_device=None, copy=None)`.

    stream: for a CUDA tensor, the consumer's stream (1 legacy default,
    2 per-thread default, else a CUstream; -1 no ordering); the tensor's
    pending work on cutegrad's current stream is ordered before it. Must be
    None (or -1) for CPU tensors. max_version >= (1, 0) gives a versioned
    capsule. dl_device: a DLPack device pair; a CUDA tensor can be exported
    to the CPU (a copy). copy: True always exports a copy, False never (raises
    BufferError when one would be needed), None copies only when it must.
    """
    if tensor._requires_grad:
        raise RuntimeError("Can't export a tensor that requires grad through DLPack; use tensor.detach()")
    src = tensor._storage.device
    target = src if dl_device is None else _device_from_dl(dl_device)
    copied = False
    if target != src:
        if copy is False:
            raise BufferError(f"exporting a {src} tensor to {target} needs a copy, but copy=False")
        if target.type != "cpu":
            raise BufferError(f"cutegrad cannot export a {src} tensor to {target} through DLPack")
        tensor, copied = tensor.detach().cpu(), True
    elif copy:
        tensor, copied = _copy_of(tensor), True
    dev = tensor._storage.device
    if dev.type == "cuda":
        _order_for_consumer(tensor, stream)
    elif stream is not None and stream != -1:
        raise BufferError(f"stream must be None for a DLPack export of a CPU tensor, got {stream!r}")
    versioned = max_version is not None and int(tuple(max_version)[0]) >= 1
    kind, index = device_of(tensor)
    return capsule_for(tensor.data_ptr(), tensor._shape, tensor._strides, tensor._dtype, kind, index,
                       tensor._storage, versioned=versioned, copied=copied)


def _copy_of(tensor):
    # empty + copy_ rather than clone: copy_ is one of the storage kernels
    # every backend has, clone needs the backend's compute kernels.
    from ..ops import empty
    return empty(tensor._shape, dtype=tensor._dtype, device=tensor._storage.device).copy_(tensor.detach())


def _cuda(what):
    """cutegrad.cuda, or an error naming what DLPack needed from it."""
    try:
        from .. import cuda
    except ImportError as e:
        raise RuntimeError(f"DLPack exchange of CUDA tensors needs cutegrad.cuda for {what}, "
                           f"and it failed to import: {e}") from e
    for name in ("current_stream", "Event", "ExternalStream"):
        if not hasattr(cuda, name):
            raise RuntimeError(f"DLPack exchange of CUDA tensors needs cutegrad.cuda.{name} for {what}")
    return cuda


def _order_for_consumer(tensor, stream):
    """Make the consumer's stream wait for work queued on cutegrad's current stream.

    The consumer's stream is also recorded as a user of the tensor's memory:
    the consumer calls the deleter when its object dies, possibly before its
    queued kernels ran, and the allocator must not hand the block out again
    before they have.
    """
    if stream == -1:
        return
    if stream is None:
        stream = 1  # the array API's default for CUDA: the legacy default stream
    if not isinstance(stream, int) or stream == 0 or stream < -1:
        raise BufferError(f"bad CUDA stream {stream!r} for DLPack: pass 1 (legacy default), "
                          "2 (per-thread default), a CUstream handle, or -1 for no ordering; 0 is ambiguous")
    cuda = _cuda("stream ordering")
    device_index = tensor._storage.device.index
    producer = cuda.current_stream(device_index)
    # CU_STREAM_LEGACY (1) and handle 0 name the same legacy default stream.
    if stream == producer.handle or (stream == 1 and producer.handle == 0):
        return
    consumer = cuda.ExternalStream(stream, device=device_index)
    ready = cuda.Event()
    ready.record(producer)
    ready.wait(consumer)
    record = getattr(cuda, "record_stream", None)
    if record is not None:
        record(tensor, consumer)


# --- import -------------------------------------------------------------------------
class ProducerHandle:
    """The producer's deleter, called exactly once: on release() or when collected."""

    __slots__ = ("_deleter", "_address", "__weakref__")

    def __init__(self, deleter_address, managed_address):
        self._deleter = abi.DELETER(deleter_address) if deleter_address else None
        self._address = managed_address

    def release(self):
        deleter, self._deleter = self._deleter, None
        if deleter is not None:
            deleter(self._address)

    def __del__(self):
        self.release()


class ImportedTensor(NamedTuple):
    """A DLPack tensor taken over from its capsule.

    ptr: address of element [0, ..., 0] (data + byte_offset). strides are in
    elements. owner: a ProducerHandle; keep it alive as long as the memory is
    used (reference it from the Storage), or call owner.release() once the
    data has been copied.
    """
    ptr: int
    shape: tuple
    strides: tuple
    dtype: object
    device_type: int
    device_id: int
    read_only: bool
    owner: ProducerHandle


def tensor_from_capsule(capsule):
    """Consume a "dltensor" or "dltensor_versioned" capsule -> ImportedTensor.

    The capsule is renamed to "used_..." so its producer does not free the
    memory; from then on the returned owner is responsible for the deleter.
    Raises BufferError for a consumed capsule, an unsupported DLPack major
    version, dtype or lane count (the producer's deleter is called first).
    """
    if type(capsule) is not abi.CapsuleType:
        raise TypeError(f"expected a DLPack capsule, got {type(capsule).__name__}")
    cap = id(capsule)  # the PyObject* in CPython, which ctypes.pythonapi implies
    if abi.capsule_is(cap, abi.NAME_VERSIONED):
        name, used, versioned = abi.NAME_VERSIONED, abi.NAME_USED_VERSIONED, True
    elif abi.capsule_is(cap, abi.NAME_LEGACY):
        name, used, versioned = abi.NAME_LEGACY, abi.NAME_USED_LEGACY, False
    else:
        found = abi.capsule_name(cap)
        if found and found.startswith("used_"):
            raise BufferError(f"this DLPack capsule was already consumed (its name is {found!r}); "
                              "a capsule can be imported only once")
        raise BufferError(f"not a DLPack capsule: its name is {found!r}, expected 'dltensor' or 'dltensor_versioned'")
    address = abi.capsule_pointer(cap, name)
    managed = (abi.DLManagedTensorVersioned if versioned else abi.DLManagedTensor).from_address(address)
    owner = ProducerHandle(ctypes.cast(managed.deleter, ctypes.c_void_p).value, address)
    abi.rename_capsule(cap, used)
    try:
        read_only = False
        if versioned:
            if managed.version.major != abi.VERSION[0]:
                raise BufferError(f"DLPack version {managed.version.major}.{managed.version.minor} is not supported "
                                  f"(cutegrad reads major version {abi.VERSION[0]})")
            read_only = bool(managed.flags & abi.FLAG_READ_ONLY)
        t = managed.dl_tensor
        ndim = t.ndim
        if ndim < 0:
            raise BufferError(f"DLPack tensor has a negative ndim {ndim}")
        shape = tuple(t.shape[i] for i in range(ndim))
        if any(n < 0 for n in shape):
            raise BufferError(f"DLPack tensor has a negative extent in shape {shape}")
        strides = tuple(t.strides[i] for i in range(ndim)) if t.strides else contiguous_strides(shape)
        code, bits, lanes = t.dtype.code, t.dtype.bits, t.dtype.lanes
        if lanes != 1:
            raise BufferError(f"DLPack vector dtypes (lanes={lanes}) are not supported")
        dtype = _FROM_DL.get((code, bits))
        if dtype is None:
            raise BufferError(f"DLPack dtype {_CODE_NAMES.get(code, f'code {code}')}{bits} has no cutegrad equivalent")
        ptr = (t.data or 0) + t.byte_offset
        return ImportedTensor(ptr, shape, strides, dtype, t.device.device_type, t.device.device_id,
                              read_only, owner)
    except BaseException:
        owner.release()
        raise


class _HostMemory:
    """A producer's host memory as a NumPy buffer; holds the producer until collected."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, ptr, nbytes, owner):
        self.__array_interface__ = {"data": (ptr, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}
        self.owner = owner


class DeviceMemory:
    """A producer's device memory under a cutegrad Storage: `.ptr`, `.nbytes`, `.device` (index), the producer.

    It has no record_stream: the producer owns the memory and its reuse.
    """

    __slots__ = ("ptr", "nbytes", "device", "owner", "__weakref__")

    def __init__(self, ptr, nbytes, device, owner):
        self.ptr = ptr
        self.nbytes = nbytes
        self.device = device
        self.owner = owner


def _extent(shape, strides):
    """(lowest, highest) element offset a strided view touches, relative to element [0, ...]."""
    lo = hi = 0
    for n, s in zip(shape, strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi


def _tensor_from_imported(imp, dtype=None, copy=None):
    dtype = dtype or imp.dtype
    if dtype.itemsize != imp.dtype.itemsize:
        raise BufferError(f"cannot view DLPack {imp.dtype} data as {dtype}")
    shape, strides, isz = imp.shape, imp.strides, dtype.itemsize
    if imp.device_type in _HOST_DEVICE_TYPES:
        if numel_of(shape) == 0:
            imp.owner.release()
            return from_numpy_owned(np.empty(shape, dtype.np), dtype)
        lo, hi = _extent(shape, strides)
        # cutegrad views never have negative strides, and a read-only producer
        # cannot be shared with a tensor that allows in-place ops: copy both.
        must_copy = lo < 0 or imp.read_only
        if must_copy and copy is False:
            why = "has negative strides" if lo < 0 else "is read-only"
            raise BufferError(f"the DLPack tensor {why}, so cutegrad must copy it, but copy=False")
        buf = np.asarray(_HostMemory(imp.ptr + lo * isz, (hi - lo + 1) * isz, imp.owner))
        if must_copy or copy:
            view = np.ndarray(shape, dtype.np, buffer=buf, offset=-lo * isz, strides=tuple(s * isz for s in strides))
            out = from_numpy_owned(np.array(view, copy=True, order="C"), dtype)
            del view, buf
            imp.owner.release()
            return out
        return make(Storage(buf, _cpu), shape, strides, 0, dtype)
    if imp.device_type == abi.kDLCUDA:
        _cuda("the CUDA storage kernels")  # importing cutegrad.cuda registers them
        dev = _device(f"cuda:{imp.device_id}")
        if numel_of(shape) == 0:
            imp.owner.release()
            from ..ops import empty
            return empty(shape, dtype=dtype, device=dev)
        lo, hi = _extent(shape, strides)
        if lo < 0:
            imp.owner.release()
            raise BufferError("cutegrad CUDA tensors cannot have negative strides; "
                              "make the producer's array contiguous first")
        storage = Storage(DeviceMemory(imp.ptr, (hi + 1) * isz, imp.device_id, imp.owner), dev)
        out = make(storage, shape, strides, 0, dtype)
        return _copy_of(out) if copy else out
    imp.owner.release()
    raise BufferError(f"cutegrad cannot import DLPack device type {imp.device_type} "
                      "(it knows CPU=1, CUDAHost=3 and CUDA=2)")


def _consumer_stream(device_id):
    s = _cuda("stream ordering").current_stream(device_id)
    return 1 if s.handle == 0 else s.handle


def from_dlpack(obj, *, device=None, copy=None):
    """A cutegrad tensor sharing memory with a DLPack producer (like torch.from_dlpack).

    obj: an object with `__dlpack__`/`__dlpack_device__` (a NumPy array, a
    PyTorch tensor, a cutegrad tensor, ...) or a DLPack capsule. The result
    keeps the producer's memory alive. copy=True always copies, copy=False
    raises BufferError where a copy is needed (a read-only producer, negative
    strides), None copies only then. device: move the result there (a copy when
    it differs from the producer's device).

    NumPy's own `__dlpack__` refuses ml_dtypes bfloat16, so a bfloat16 NumPy
    array is exchanged as its int16 bit pattern and reinterpreted, still
    without a copy.
    """
    as_dtype = None
    if type(obj) is abi.CapsuleType:
        capsule = obj
    else:
        if isinstance(obj, np.ndarray) and obj.dtype == dt.bfloat16.np:
            obj, as_dtype = obj.view(np.int16), dt.bfloat16
        if not hasattr(obj, "__dlpack__"):
            raise TypeError(f"from_dlpack() expects an object with __dlpack__ or a DLPack capsule, "
                            f"got {type(obj).__name__}")
        kind, index = obj.__dlpack_device__()
        kwargs = {"max_version": abi.VERSION}
        if kind == abi.kDLCUDA:
            kwargs["stream"] = _consumer_stream(index)
        try:
            capsule = obj.__dlpack__(**kwargs)
        except TypeError:  # a producer older than DLPack 1.0 has no max_version
            del kwargs["max_version"]
            capsule = obj.__dlpack__(**kwargs)
    out = _tensor_from_imported(tensor_from_capsule(capsule), as_dtype, copy)
    if device is not None and _device(device) != out._storage.device:
        if copy is False:
            raise BufferError(f"moving the DLPack tensor from {out.device} to {device} needs a copy, but copy=False")
        out = out.to(device)
    return out


__all__ = ["from_dlpack", "to_capsule", "device_of", "capsule_for", "tensor_from_capsule",
           "ImportedTensor", "ProducerHandle", "DeviceMemory"]
