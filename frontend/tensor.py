"""Tensor: a strided view of a Storage, with autograd metadata.

A Tensor is (storage, shape, strides, offset, dtype); strides and offset count
elements, never bytes. Views share the storage, and with it the version
counter that autograd reads to catch a saved tensor modified in place.

How a device backend plugs in
-----------------------------
Storage.data is whatever the backend keeps: a 1-D NumPy array for the CPU, a
device allocation object exposing `.ptr` (int) for CUDA. Everything about
shapes, strides, views and autograd is backend-independent and lives here and
in `cutegrad.ops`; a backend supplies

* kernels: `dispatch.register(kernel_name, device.CUDA)(fn)` for each entry of
  `dispatch.KERNELS` (the list and signatures are in docs/architecture.md);
* storage: `dispatch.register("empty", device.CUDA)` returns a new Tensor,
  and `dispatch.register("to_device", ...)` moves data between devices.

CPU tensors also cache `_np`, a NumPy view of their elements, built once per
Tensor object because metadata never changes after construction.
"""
import numpy as np

from . import dtypes as _dt
from .device import cpu as _cpu_device, CPU


class Storage:
    """Memory shared by a tensor and its views, plus their version counter."""

    __slots__ = ("data", "device", "version", "__weakref__")

    def __init__(self, data, device):
        self.data = data
        self.device = device
        self.version = 0


def _np_view(storage, shape, strides, offset, dtype):
    isz = dtype.itemsize
    return np.ndarray(shape, dtype.np, buffer=storage.data, offset=offset * isz,
                      strides=tuple(s * isz for s in strides))


_STRIDES = {}  # shape -> contiguous strides; outputs of a model repeat few shapes


def contiguous_strides(shape):
    shape = tuple(shape)
    strides = _STRIDES.get(shape)
    if strides is None:
        acc, out = 1, []
        for n in reversed(shape):
            out.append(acc)
            acc *= n if n > 1 else 1
        strides = tuple(reversed(out))
        if len(_STRIDES) < 4096:
            _STRIDES[shape] = strides
    return strides


_new_object = object.__new__  # skips Tensor.__new__'s public-constructor guard


def make(storage, shape, strides, offset, dtype, base=None):
    """Build a Tensor object around existing storage (no copy, no checks)."""
    t = _new_object(Tensor)
    t._storage = storage
    t._shape = shape
    t._strides = strides
    t._offset = offset
    t._dtype = dtype
    t._np = _np_view(storage, shape, strides, offset, dtype) if storage.device.backend == CPU else None
    t._requires_grad = False
    t._grad = None
    t.grad_fn = None
    t._base = base
    t._hooks = None
    t._retains_grad = False
    t._accum = None
    t._base_fn = None
    return t


def from_numpy_owned(arr, dtype):
    """Wrap a freshly computed NumPy result (the CPU backend's outputs)."""
    if (arr.dtype is not dtype.np and arr.dtype != dtype.np) or not arr.flags.c_contiguous:
        # np.array, not np.ascontiguousarray: the latter turns 0-d into shape (1,)
        arr = np.array(_dt.to_numpy(arr, dtype), order="C")
    st = Storage(arr.reshape(-1), _cpu_device)
    t = _new_object(Tensor)
    t._storage = st
    t._shape = arr.shape
    t._strides = contiguous_strides(arr.shape)
    t._offset = 0
    t._dtype = dtype
    t._np = arr
    t._requires_grad = False
    t._grad = None
    t.grad_fn = None
    t._base = None
    t._hooks = None
    t._retains_grad = False
    t._accum = None
    t._base_fn = None
    return t


def numel_of(shape):
    n = 1
    for s in shape:
        n *= s
    return n


class Tensor:
    __slots__ = ("_storage", "_shape", "_strides", "_offset", "_dtype", "_np",
                 "_requires_grad", "_grad", "grad_fn", "_base", "_hooks",
                 "_retains_grad", "_accum", "_base_fn", "__weakref__")

    __array_priority__ = 1000  # numpy scalars defer to our reflected operators

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise TypeError("construct tensors with cutegrad.tensor(data), cutegrad.zeros(...), etc.")
        return object.__new__(cls)

    # --- metadata -----------------------------------------------------------
    @property
    def shape(self):
        return Size(self._shape)

    def size(self, dim=None):
        if dim is None:
            return Size(self._shape)
        return self._shape[self._wrap_dim(dim)]

    def stride(self, dim=None):
        if dim is None:
            return self._strides
        return self._strides[self._wrap_dim(dim)]

    def storage_offset(self):
        return self._offset

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._storage.device

    @property
    def is_cuda(self):
        return self._storage.device.type == "cuda"

    @property
    def ndim(self):
        return len(self._shape)

    def dim(self):
        return len(self._shape)

    def numel(self):
        return numel_of(self._shape)

    def element_size(self):
        return self._dtype.itemsize

    def nelement(self):
        return numel_of(self._shape)

    def is_floating_point(self):
        return self._dtype.is_floating_point

    @property
    def _version(self):
        return self._storage.version

    def data_ptr(self):
        st = self._storage
        if st.device.backend == CPU:
            return st.data.ctypes.data + self._offset * self._dtype.itemsize
        return st.data.ptr + self._offset * self._dtype.itemsize

    def is_contiguous(self):
        if _STRIDES.get(self._shape) is self._strides:  # made by contiguous_strides, as every kernel output is
            return True
        expected = 1
        for n, s in zip(reversed(self._shape), reversed(self._strides)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def _wrap_dim(self, dim):
        n = len(self._shape)
        lo = -n if n else -1
        hi = n - 1 if n else 0
        if not isinstance(dim, int) or not lo <= dim <= hi:
            raise IndexError(f"Dimension out of range (expected to be in range of [{lo}, {hi}], but got {dim})")
        return dim + (n or 1) if dim < 0 else dim  # a 0-dim tensor's dim -1 is 0, as in torch

    def __len__(self):
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __iter__(self):
        if not self._shape:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self._shape[0]))

    # --- autograd metadata ----------------------------------------------------
    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, flag):
        if self.grad_fn is not None and not flag:
            raise RuntimeError("you can only change requires_grad flags of leaf variables. "
                               "Use detach() to get a tensor that does not require grad.")
        if flag and not self._dtype.is_floating_point:
            raise RuntimeError(f"only tensors of floating point dtype can require gradients, got {self._dtype}")
        self._requires_grad = bool(flag)

    def requires_grad_(self, flag=True):
        self.requires_grad = flag
        return self

    @property
    def grad(self):
        return self._grad

    @grad.setter
    def grad(self, g):
        # torch's checks: a mismatched .grad would otherwise surface much later
        # (broadcast into the next accumulation, or a dtype error in an optimizer)
        if g is not None:
            if not isinstance(g, Tensor):
                raise TypeError(f"assigned grad expected to be a Tensor or None but got {type(g).__name__}")
            if g._shape != self._shape:
                raise RuntimeError(f"assigned grad has data of a different size: grad {list(g._shape)}, tensor "
                                   f"{list(self._shape)}")
            if g._dtype is not self._dtype:
                raise RuntimeError(f"assigned grad has data of a different type: grad {g._dtype}, tensor "
                                   f"{self._dtype}")
            if g._storage.device != self._storage.device:
                raise RuntimeError(f"assigned grad has data located on a different device: grad {g.device}, "
                                   f"tensor {self.device}")
        self._grad = g

    @property
    def is_leaf(self):
        return self.grad_fn is None

    def retain_grad(self):
        if self.grad_fn is None:
            return
        if not self._retains_grad:
            self._retains_grad = True
            from .autograd.engine import add_retain_grad_hook
            add_retain_grad_hook(self)

    def register_hook(self, hook):
        """Call hook(grad) when this tensor's gradient is computed; it may return a new grad."""
        if not self._requires_grad:
            raise RuntimeError("cannot register a hook on a tensor that doesn't require gradient")
        from .autograd.engine import register_tensor_hook
        return register_tensor_hook(self, hook)

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        from .autograd.engine import backward
        backward(self, gradient, retain_graph, create_graph, inputs)

    def detach(self):
        # Shares memory but is no autograd view (torch's too): in-place writes
        # into it are allowed and show up as version bumps on the original.
        return make(self._storage, self._shape, self._strides, self._offset, self._dtype)

    def detach_(self):
        self.grad_fn = None
        self._requires_grad = False
        return self

    @property
    def data(self):
        return self.detach()

    @data.setter
    def data(self, other):
        if not isinstance(other, Tensor):
            raise TypeError(f"Tensor.data must be set to a Tensor, got {type(other).__name__}")
        self._storage = other._storage
        self._shape, self._strides, self._offset = other._shape, other._strides, other._offset
        self._dtype = other._dtype
        self._np = other._np

    # --- conversion -----------------------------------------------------------
    def numpy(self):
        """A NumPy array sharing memory with this CPU tensor (like torch)."""
        if self._storage.device.backend != CPU:
            raise TypeError(f"can't convert {self.device} tensor to numpy; use .cpu() first")
        if self._requires_grad:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")
        return self._np

    def _host_array(self):
        """Element values as a NumPy array on the host (a copy for device tensors)."""
        if self._storage.device.backend == CPU:
            return self._np
        from . import ops
        return ops.to_device(self, _cpu_device)._np

    def item(self):
        if numel_of(self._shape) != 1:
            raise RuntimeError(f"a Tensor with {numel_of(self._shape)} elements cannot be converted to Scalar")
        return self._host_array().reshape(()).item() if self._dtype is not _dt.bfloat16 else float(self._host_array().reshape(()))

    def tolist(self):
        arr = self._host_array()
        if self._dtype in (_dt.bfloat16, _dt.float16):
            arr = arr.astype(np.float32)
        return arr.tolist()

    def __bool__(self):
        if numel_of(self._shape) != 1:
            raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous")
        return bool(self.item())

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        if self._dtype.category != _dt.INT or numel_of(self._shape) != 1:
            raise TypeError("only integer tensors of a single element can be converted to an index")
        return int(self.item())

    def __repr__(self):
        arr = self._host_array()
        if self._dtype in (_dt.bfloat16, _dt.float16):
            arr = arr.astype(np.float32)
        body = np.array2string(arr, separator=", ", precision=4, prefix="tensor(")
        extras = []
        if self._storage.device.type != "cpu":
            extras.append(f"device='{self.device}'")
        if self._dtype not in (_dt.float32, _dt.int64, _dt.bool_):
            extras.append(f"dtype={self._dtype}")
        if self.grad_fn is not None:
            extras.append(f"grad_fn=<{type(self.grad_fn).__name__}>")
        elif self._requires_grad:
            extras.append("requires_grad=True")
        return "tensor(" + ", ".join([body] + extras) + ")"

    def __format__(self, spec):
        # f"{loss:.4f}" formats a one-element tensor's value, as torch does
        if spec and numel_of(self._shape) == 1:
            return format(self.item(), spec)
        return format(repr(self), spec)

    def __reduce__(self):
        from . import ops
        arr = np.array(self._host_array())
        return (ops.tensor, (arr, self._dtype, str(self.device), self._requires_grad))

    def __hash__(self):
        return id(self)

    def __dlpack__(self, stream=None, **kwargs):
        from .io import dlpack
        return dlpack.to_capsule(self, stream, **kwargs)

    def __dlpack_device__(self):
        from .io import dlpack
        return dlpack.device_of(self)


class Size(tuple):
    """torch.Size: a tuple of ints with numel()."""

    __slots__ = ()

    def numel(self):
        return numel_of(self)

    def __repr__(self):
        return f"cutegrad.Size({list(self)})"
