"""LayerNorm and RMSNorm forward and backward (kernels/cuda/norms.cu); the weight and
bias gradients reduce in two fixed-order stages, no atomics.
"""
from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import register
from ...tensor import contiguous_strides, make, numel_of
from .launch import _cast_new, _contig, _empty, _lib, _ptr, _stream
from .reduction import _split_workspace_bytes


def _param_ptr(p, stream):
    if p is None:
        return 0, 0, None
    p = _contig(p, stream)
    return _ptr(p), p._dtype.index, p  # the tensor is returned to keep a contiguous copy alive


def _norm(x, nd, weight, bias, eps, rms):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape
    n = numel_of(shape[len(shape) - nd:])
    rows = numel_of(shape[:len(shape) - nd])
    stat = dt.float64 if x._dtype is dt.float64 else dt.float32
    stat_shape = shape[:len(shape) - nd] + (1,) * nd
    y = _empty(shape, x._dtype, dev, stream)
    if rms:
        mean, rstd = None, _empty(stat_shape, stat, dev, stream)
    else:  # one allocation for both statistics: mean in its first `rows` elements, rstd after them
        stats = _empty((2 * rows,), stat, dev, stream)
        strides = contiguous_strides(stat_shape)
        mean = make(stats._storage, stat_shape, strides, 0, stat)
        rstd = make(stats._storage, stat_shape, strides, rows, stat)
    wp, wd, _w = _param_ptr(weight, stream)
    bp, bd, _b = _param_ptr(bias, stream)
    _lib().norm(_ptr(x), _ptr(y), x._dtype.index, rows, n, wp, wd, bp, bd, 0 if rms else _ptr(mean), _ptr(rstd),
                stat.index, float(eps), rms, stream)
    return y, mean, rstd


@register("layer_norm", CUDA)
def layer_norm(x, nd, weight, bias, eps):
    return _norm(x, nd, weight, bias, eps, False)


@register("rms_norm", CUDA)
def rms_norm(x, nd, weight, eps):
    y, _, rstd = _norm(x, nd, weight, None, eps, True)
    return y, rstd


def _norm_backward(dy, x, weight, mean, rstd, nd, want_dweight, want_dbias, rms):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    dy = _contig(dy if dy._dtype is x._dtype else _cast_new(dy, x._dtype, stream), stream)
    if dy._shape != x._shape:
        raise ValueError(f"norm backward: dy shape {list(dy._shape)} differs from x shape {list(x._shape)}")
    shape = x._shape
    n = numel_of(shape[len(shape) - nd:])
    rows = numel_of(shape[:len(shape) - nd])
    pshape = shape[len(shape) - nd:]
    dx = _empty(shape, x._dtype, dev, stream)
    wp, wd, _w = _param_ptr(weight, stream)
    pdt = weight._dtype if weight is not None else x._dtype
    dweight = _empty(pshape, pdt, dev, stream) if want_dweight else None
    dbias = _empty(pshape, pdt, dev, stream) if want_dbias else None
    rstd = _contig(rstd, stream)
    mean = None if rms else _contig(mean, stream)
    # dweight and dbias partials in the accumulation type (fp64 for fp64 inputs)
    ws_bytes = _split_workspace_bytes(n, rows, 16) if (want_dweight or want_dbias) else 0
    ws = _empty((ws_bytes,), dt.uint8, dev, stream) if ws_bytes else None
    _lib().norm_backward(_ptr(dy), _ptr(x), x._dtype.index, rows, n, wp, wd, 0 if rms else _ptr(mean), _ptr(rstd),
                         rstd._dtype.index, _ptr(dx), _ptr(dweight) if dweight is not None else 0, pdt.index,
                         _ptr(dbias) if dbias is not None else 0, pdt.index, rms,
                         _ptr(ws) if ws is not None else 0, ws_bytes, stream)
    return dx, dweight, dbias


@register("layer_norm_backward", CUDA)
def layer_norm_backward(dy, x, nd, weight, mean, rstd, want_dweight=True, want_dbias=True):
    """(dx, dweight, dbias) of layer_norm from its saved mean/rstd (CUDA only; two launches).

    dweight/dbias are None when not wanted; they are summed over rows in a fixed order.
    """
    return _norm_backward(dy, x, weight, mean, rstd, nd, want_dweight and weight is not None, want_dbias, False)


@register("rms_norm_backward", CUDA)
def rms_norm_backward(dy, x, nd, weight, rstd, want_dweight=True):
    """(dx, dweight) of rms_norm from its saved rstd (CUDA only)."""
    dx, dweight, _ = _norm_backward(dy, x, weight, None, rstd, nd, want_dweight and weight is not None, False, True)
    return dx, dweight
