"""Reductions: sum/mean/prod/min/max/any/all, argmin/argmax, var, logsumexp
(kernels/cuda/reduce.cu), with a two-stage split over long reduced extents.
"""
from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import register
from ...ops import codes as C
from ...tensor import numel_of
from .launch import _COMPUTE, _F32, _F64, _I64, _LOGSUMEXP, _VAR, _empty, _lib, _ptr, _stream


def _reduce_into(code, compute, x, dims, keepdim, out_dtype, correction=0.0):
    dev = x._storage.device
    stream = _stream(dev.index)
    dset = set(dims)
    if keepdim:
        shape = tuple(1 if d in dset else n for d, n in enumerate(x._shape))
    else:
        shape = tuple(n for d, n in enumerate(x._shape) if d not in dset)
    out = _empty(shape, out_dtype, dev, stream)
    n_out = numel_of(shape)
    n_reduce = numel_of(x._shape) // n_out if n_out else 0
    # Reducing the unit-stride last dim runs in inner mode, where one block
    # holds at most 8 outputs (reduce.cu): rows enough for 512 blocks never split.
    rows_fill_grid = dims and dims[-1] == len(x._shape) - 1 and x._strides[-1] == 1 and n_out >= 8 * 512
    ws_bytes = 0 if rows_fill_grid else _split_workspace_bytes(n_out, n_reduce, _REDUCE_ACC_BYTES)
    ws = _empty((ws_bytes,), dt.uint8, dev, stream) if ws_bytes else None
    _lib().reduce(code, compute, _ptr(x), x._dtype.index, x._shape, x._strides, list(dims), _ptr(out),
                  out_dtype.index, float(correction), _ptr(ws) if ws is not None else 0, ws_bytes, stream)
    return out


# Upper bound of the workspace of a two-stage reduction (reduce_split in
# kernels/cuda/ops_args.h): split <= min(1024, ceil(1024 / tiles), n_reduce /
# 64) with tiles >= ceil(n_out / 32), and no split once tiles >= 512.  A
# smaller workspace only makes the kernel split less, so the bound may be loose.
_REDUCE_ACC_BYTES = 24  # the largest partial: Welford (n, mean, m2) in fp64
_SPLIT_TARGET_BLOCKS = 1024
_SPLIT_MIN_CHUNK = 64


def _split_workspace_bytes(n_out, n_reduce, acc_bytes):
    if n_out == 0 or n_out >= 32 * (_SPLIT_TARGET_BLOCKS // 2) or n_reduce < 2 * _SPLIT_MIN_CHUNK:
        return 0
    tiles = -(-n_out // 32)
    split = min(_SPLIT_TARGET_BLOCKS, -(-_SPLIT_TARGET_BLOCKS // tiles), n_reduce // _SPLIT_MIN_CHUNK)
    return n_out * split * acc_bytes if split >= 2 else 0


def _norm_dims(x, dims):
    n = len(x._shape)
    return tuple(sorted(d + n if d < 0 else d for d in dims))


@register("reduce", CUDA)
def reduce(code, x, dims, keepdim, out_dtype):
    if code in (C.SUM, C.MEAN, C.PROD):
        if out_dtype.is_floating_point:
            compute = _F64 if out_dtype is dt.float64 else _F32
        else:
            compute = _I64
    else:
        compute = _COMPUTE[x._dtype.index]
    return _reduce_into(code, compute, x, _norm_dims(x, dims), keepdim, out_dtype)


@register("argreduce", CUDA)
def argreduce(code, x, dim, keepdim):
    if dim is None:
        out = _reduce_into(code, _COMPUTE[x._dtype.index], x, tuple(range(len(x._shape))), keepdim, dt.int64)
        return out
    return _reduce_into(code, _COMPUTE[x._dtype.index], x, _norm_dims(x, (dim,)), keepdim, dt.int64)


@register("var", CUDA)
def var(x, dims, correction, keepdim):
    compute = _F64 if x._dtype is dt.float64 else _F32
    return _reduce_into(_VAR, compute, x, _norm_dims(x, dims), keepdim, x._dtype, correction)


@register("logsumexp", CUDA)
def logsumexp(x, dims, keepdim):
    compute = _F64 if x._dtype is dt.float64 else _F32
    return _reduce_into(_LOGSUMEXP, compute, x, _norm_dims(x, dims), keepdim, x._dtype)
