"""Copies and conversions: to(dtype/device), clone, contiguous, copy_."""
from .. import dtypes as dt
from ..device import device as _device
from ..dispatch import kernel
from ..tensor import Tensor
from ..autograd import grad_mode
from ..autograd.engine import Node, attach

_K_CAST = kernel("cast").impl
_K_CONTIG = kernel("contiguous").impl
_K_COPY = kernel("copy_").impl
_K_TO_DEVICE = kernel("to_device").impl
_state = grad_mode.state


class CastBackward(Node):
    __slots__ = ("src_dtype",)

    def __init__(self, src_dtype):
        self.src_dtype = src_dtype

    def backward(self, g):
        return (to_dtype(g, self.src_dtype),)


def to_dtype(x, dtype):
    if x._dtype is dtype:
        return x
    out = _K_CAST[x._storage.device.backend](x, dtype)
    return CastBackward.record(out, (x,), (), x._dtype) if dtype.is_floating_point else out


class ToDeviceBackward(Node):
    __slots__ = ("src",)

    def __init__(self, src):
        self.src = src

    def backward(self, g):
        return (to_device(g, self.src),)


def to_device(x, device):
    device = _device(device)
    src = x._storage.device
    if src == device:
        return x
    backend = device.backend if device.type != "cpu" else src.backend
    return ToDeviceBackward.record(_K_TO_DEVICE[backend](x, device), (x,), (), src)


def to(x, *args, dtype=None, device=None, non_blocking=False, copy=False):
    """x.to(dtype) / x.to(device) / x.to(device, dtype) / x.to(other_tensor)."""
    for a in args:
        if isinstance(a, dt.DType):
            dtype = a
        elif isinstance(a, Tensor):
            dtype, device = a._dtype, a._storage.device
        elif isinstance(a, (str, _device, int)):
            device = a
        else:
            raise TypeError(f"to() received an invalid argument of type {type(a).__name__}")
    out = x
    if device is not None:
        out = to_device(out, device)
    if dtype is not None:
        out = to_dtype(out, dtype)
    if copy and out is x:
        out = clone(x)
    return out


class IdentityBackward(Node):
    __slots__ = ()

    def backward(self, g):
        return (g,)


def clone(x):
    out = _K_CONTIG[x._storage.device.backend](x)
    if out is x or out._storage is x._storage:
        out = _K_CAST[x._storage.device.backend](x, x._dtype)
    return IdentityBackward.record(out, (x,))


def contiguous(x):
    if x.is_contiguous():
        return x
    return IdentityBackward.record(_K_CONTIG[x._storage.device.backend](x), (x,))


def detach(x):
    return x.detach()
