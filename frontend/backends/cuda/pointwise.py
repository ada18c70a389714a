"""Elementwise kernels: unary, binary, where, clamp and activation backward
(kernels/cuda/elementwise.cu).
"""
from ...device import CUDA
from ...dispatch import register
from ...ops.broadcast import broadcast_shapes
from ...tensor import Tensor
from . import launch as _launch
from .launch import _ABSENT, _ACT, _BINARY, _CLAMP, _COMPUTE, _NO_STRIDES, _SCALAR, _UNARY, _WHERE, _as_number, _bstrides, _empty, _is_cuda, _lib, _ptr, _stream, _stream_tls


@register("unary", CUDA)
def unary(code, x, out_dtype):
    dev = x._storage.device
    stream = _stream(dev.index)
    out = _empty(x._shape, out_dtype, dev, stream)
    compute = _COMPUTE[(out_dtype if out_dtype.is_floating_point else x._dtype).index]
    (_launch._native or _lib()).elementwise(_UNARY, code, compute, x._shape, out._storage.data.ptr, out_dtype.index,
                                            out._strides, _ptr(x), x._dtype.index, x._strides, None, 0, _ABSENT,
                                            _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None, None, None, stream)
    return out


def _operand(v, shape):
    """(pointer, dtype code, strides, scalar) of an elementwise input."""
    if _is_cuda(v):
        return _ptr(v), v._dtype.index, _bstrides(v, shape), None
    return 0, _SCALAR, _NO_STRIDES, _as_number(v)


def _shape_of(*vals):
    shapes = [v._shape for v in vals if _is_cuda(v)]
    if len(shapes) == 1 or all(s == shapes[0] for s in shapes):
        return shapes[0]
    return tuple(broadcast_shapes(*shapes))


@register("binary", CUDA)
def binary(code, a, b, compute_dtype, out_dtype):
    # The frontend turns 0-dim CPU tensors into Python numbers, so a Tensor
    # operand here is on this device; the same-shape case skips broadcasting.
    if isinstance(a, Tensor):
        dev = a._storage.device
        pa = a._storage.data.ptr + a._offset * a._dtype.itemsize
        da, va = a._dtype.index, None
        if isinstance(b, Tensor):
            pb = b._storage.data.ptr + b._offset * b._dtype.itemsize
            db, vb = b._dtype.index, None
            shape = a._shape
            if shape == b._shape:
                sa, sb = a._strides, b._strides
            else:
                shape = broadcast_shapes(shape, b._shape)
                sa, sb = _bstrides(a, shape), _bstrides(b, shape)
        else:
            shape, sa = a._shape, a._strides
            pb, db, sb, vb = 0, _SCALAR, _NO_STRIDES, b
    else:
        dev = b._storage.device
        shape, sb = b._shape, b._strides
        pb = b._storage.data.ptr + b._offset * b._dtype.itemsize
        db, vb = b._dtype.index, None
        pa, da, sa, va = 0, _SCALAR, _NO_STRIDES, a
    cur = _stream_tls.current  # _stream(dev.index), inlined
    stream = 0 if cur is None or dev.index not in cur else cur[dev.index].handle
    out = _empty(shape, out_dtype, dev, stream)
    (_launch._native or _lib()).elementwise(_BINARY, code, _COMPUTE[compute_dtype.index], shape,
                                            out._storage.data.ptr, out_dtype.index, out._strides, pa, da, sa, va,
                                            pb, db, sb, vb, 0, _ABSENT, _NO_STRIDES, None, None, None, stream)
    return out


@register("where", CUDA)
def where(cond, a, b, out_dtype):
    dev = cond._storage.device
    shape = _shape_of(cond, a, b)
    stream = _stream(dev.index)
    out = _empty(shape, out_dtype, dev, stream)
    pa, da, sa, va = _operand(a, shape)
    pb, db, sb, vb = _operand(b, shape)
    _lib().elementwise(_WHERE, 0, _COMPUTE[out_dtype.index], shape, _ptr(out), out_dtype.index, out._strides,
                       _ptr(cond), cond._dtype.index, _bstrides(cond, shape), None, pa, da, sa, va, pb, db, sb, vb,
                       None, None, stream)
    return out


@register("clamp", CUDA)
def clamp(x, lo, hi, out_dtype):
    dev = x._storage.device
    stream = _stream(dev.index)
    out = _empty(x._shape, out_dtype, dev, stream)
    _lib().elementwise(_CLAMP, 0, _COMPUTE[out_dtype.index], x._shape, _ptr(out), out_dtype.index, out._strides,
                       _ptr(x), x._dtype.index, x._strides, None, 0, _ABSENT, _NO_STRIDES, None,
                       0, _ABSENT, _NO_STRIDES, None, _as_number(lo), _as_number(hi), stream)
    return out


@register("act_backward", CUDA)
def act_backward(code, grad, x):
    dev = grad._storage.device
    shape = _shape_of(grad, x)
    stream = _stream(dev.index)
    out = _empty(shape, grad._dtype, dev, stream)
    _lib().elementwise(_ACT, code, _COMPUTE[grad._dtype.index], shape, _ptr(out), grad._dtype.index, out._strides,
                       _ptr(grad), grad._dtype.index, _bstrides(grad, shape), None,
                       _ptr(x), x._dtype.index, _bstrides(x, shape), None,
                       0, _ABSENT, _NO_STRIDES, None, None, None, stream)
    return out
