"""Index kernels (kernels/cuda/index.cu): gather, index_select, scatter_add, index_add,
advanced indexing, cat, one_hot.  Out-of-range indices go to the device's error
record (cutegrad.cuda.index_errors) instead of a host sync per launch.
"""
import numpy as np

from ... import dtypes as dt
from ...cuda import index_errors as _index_errors
from ...device import CUDA
from ...dispatch import register
from ...tensor import Tensor, contiguous_strides, make, numel_of
from .launch import _HALF, _NO_STRIDES, _SCALAR, _bstrides, _cast_new, _contig, _copy_into, _empty, _fill, _lib, _on, _ptr, _stream


@register("gather", CUDA)
def gather(x, dim, index):
    dev = x._storage.device
    stream = _stream(dev.index)
    index = _on(dev, index, stream)
    out = _empty(index._shape, x._dtype, dev, stream)
    if not index._shape:  # 0-d: one element, a 1-d launch
        shape, istr, xstr, ostr, d = (1,), (0,), (x._strides or (0,)), (1,), 0
    else:
        shape, istr, xstr, ostr, d = index._shape, index._strides, x._strides, out._strides, dim
    _lib().gather(shape, d, (x._shape or (1,))[d], _ptr(index), index._dtype.index, istr, _ptr(x),
                  x._dtype.index, xstr, _ptr(out), x._dtype.index, ostr, stream,
                  _index_errors.record_pointer(dev.index), _index_errors.GATHER, d)
    return out


@register("index_select", CUDA)
def index_select(x, dim, index):
    dev = x._storage.device
    stream = _stream(dev.index)
    index = _on(dev, index, stream)
    k = numel_of(index._shape)
    it_shape = x._shape[:dim] + (k,) + x._shape[dim + 1:]
    out_shape = x._shape[:dim] + index._shape + x._shape[dim + 1:]
    out = _empty(out_shape, x._dtype, dev, stream)
    istride = index._strides[0] if index._shape else 0
    istr = tuple(istride if d == dim else 0 for d in range(len(it_shape)))
    _lib().gather(it_shape, dim, x._shape[dim], _ptr(index), index._dtype.index, istr, _ptr(x), x._dtype.index,
                  x._strides, _ptr(out), x._dtype.index, contiguous_strides(it_shape), stream,
                  _index_errors.record_pointer(dev.index), _index_errors.INDEX_SELECT, dim)
    return out


def _accumulator(base, stream):
    """A contiguous copy of base to add into: fp32 for half types, so each sum rounds once."""
    acc_dtype = dt.float32 if base._dtype in _HALF else base._dtype
    if acc_dtype not in (dt.float32, dt.float64, dt.int32, dt.int64):
        raise NotImplementedError(f"scatter/index add on CUDA supports float and int32/int64 tensors, got {base._dtype}")
    return _cast_new(base, acc_dtype, stream)


def _accumulation(base, index):
    """(device, stream, index on the device, accumulator, index-error record) of an accumulating scatter."""
    dev = base._storage.device
    stream = _stream(dev.index)
    return (dev, stream, _on(dev, index, stream), _accumulator(base, stream),
            _index_errors.record_pointer(dev.index))


def _finish_accumulator(acc, dtype, stream):
    return acc if acc._dtype is dtype else _cast_new(acc, dtype, stream)


@register("scatter_add", CUDA)
def scatter_add(base, dim, index, src):
    dev, stream, index, out, err = _accumulation(base, index)
    if index._shape:
        _lib().scatter(index._shape, dim, out._shape[dim], _ptr(index), index._dtype.index, index._strides,
                       _ptr(src), src._dtype.index, src._strides[:len(index._shape)], None, _ptr(out),
                       out._dtype.index, out._strides, True, stream, err, _index_errors.SCATTER_ADD, dim)
    else:
        _lib().scatter((1,), 0, (out._shape or (1,))[0], _ptr(index), index._dtype.index, (0,), _ptr(src),
                       src._dtype.index, (0,), None, _ptr(out), out._dtype.index, (out._strides or (1,))[:1], True,
                       stream, err, _index_errors.SCATTER_ADD, 0)
    return _finish_accumulator(out, base._dtype, stream)


_SORT_KEY_LIMIT = 1 << 32  # the sort packs (row, position) into 64-bit keys, 32 bits each


@register("index_add", CUDA)
def index_add(base, dim, index, src):
    dev, stream, index, out, err = _accumulation(base, index)
    n = numel_of(index._shape)
    if (dim == 0 and out._dtype.is_floating_point and base._shape and 0 < n < _SORT_KEY_LIMIT
            and base._shape[0] < _SORT_KEY_LIMIT - 1):
        # embedding backward: a fixed summation order, the same bits every run
        idx = _contig(index if index._dtype is dt.int64 else _cast_new(index, dt.int64, stream), stream)
        s = _contig(src if src._dtype is out._dtype else _cast_new(src, out._dtype, stream), stream)
        perm = _empty((n,), dt.int64, dev, stream)
        sorted_idx = _empty((n,), dt.int64, dev, stream)
        _lib().index_add_rows(_ptr(out), out._dtype.index, _ptr(s), _ptr(idx), n, out._shape[0],
                              numel_of(out._shape[1:]), _ptr(perm), _ptr(sorted_idx), stream, err,
                              _index_errors.INDEX_ADD)
        return _finish_accumulator(out, base._dtype, stream)
    istride = index._strides[0] if index._shape else 0
    istr = tuple(istride if d == dim else 0 for d in range(len(src._shape)))
    _lib().scatter(src._shape, dim, out._shape[dim], _ptr(index), index._dtype.index, istr, _ptr(src),
                   src._dtype.index, src._strides, None, _ptr(out), out._dtype.index, out._strides, True, stream,
                   err, _index_errors.INDEX_ADD, dim)
    return _finish_accumulator(out, base._dtype, stream)


def _key_offsets(shape, strides, offset, key):
    """Element offsets (NumPy int64 array) of x[key] for a view (shape, strides, offset).

    Each coordinate grid is a broadcast view (no memory) indexed with the key, so
    only the result's size is materialised.
    """
    np_key = tuple(k._host_array() if isinstance(k, Tensor) else k for k in key)
    total = None
    nd = len(shape)
    for d in range(nd):
        grid = np.arange(shape[d], dtype=np.int64).reshape((1,) * d + (shape[d],) + (1,) * (nd - d - 1))
        part = np.broadcast_to(grid, shape)[np_key] * strides[d]
        total = part if total is None else total + part
    if total is None:  # 0-d x: x[None], x[...]
        total = np.zeros(np.broadcast_to(np.int64(0), ())[np_key].shape, np.int64)
    return total + offset


def _flat_key(x, key, contiguous_layout=False):
    dev = x._storage.device
    if contiguous_layout:
        offs = _key_offsets(x._shape, contiguous_strides(x._shape), 0, key)
    else:
        offs = _key_offsets(x._shape, x._strides, x._offset, key)
    from ...ops import tensor
    return offs.shape, tensor(offs.reshape(-1), dtype=dt.int64, device=dev)


@register("index", CUDA)
def index(x, key):
    dev = x._storage.device
    stream = _stream(dev.index)
    shape, offs = _flat_key(x, key)
    out = _empty(shape, x._dtype, dev, stream)
    n = numel_of(shape)
    storage_elems = x._storage.data.nbytes // x._dtype.itemsize
    base = x._storage.data.ptr
    _lib().gather((n,), 0, storage_elems, _ptr(offs), dt.int64.index, (1,), base, x._dtype.index, (1,),
                  _ptr(out), x._dtype.index, (1,), stream)
    return out


@register("index_put_", CUDA)
def index_put_(x, key, values, accumulate):
    dev = x._storage.device
    stream = _stream(dev.index)
    half_acc = accumulate and x._dtype in _HALF
    target = _cast_new(x, dt.float32, stream) if half_acc else x
    shape, offs = _flat_key(target, key, contiguous_layout=half_acc)
    n = numel_of(shape)
    it_shape = shape or (1,)
    if isinstance(values, Tensor):
        values = _on(dev, values, stream)
        if values._dtype is not target._dtype:
            values = _cast_new(values, target._dtype, stream)
        vals = (_ptr(values), values._dtype.index, _bstrides(values, it_shape), None)
    else:
        vals = (0, _SCALAR, _NO_STRIDES, values)
    istr = contiguous_strides(it_shape)
    dst_str = (1,) + (0,) * (len(it_shape) - 1)
    storage_elems = target._storage.data.nbytes // target._dtype.itemsize
    if n:
        _lib().scatter(it_shape, 0, storage_elems, _ptr(offs), dt.int64.index, istr, vals[0], vals[1], vals[2],
                       vals[3], target._storage.data.ptr, target._dtype.index, dst_str, bool(accumulate), stream)
    if half_acc:
        _copy_into(x, target, stream)
    return x


@register("cat", CUDA)
def cat(tensors, dim, out_dtype):
    ref = tensors[0]
    dev = ref._storage.device
    stream = _stream(dev.index)
    total = sum(t._shape[dim] for t in tensors)
    shape = ref._shape[:dim] + (total,) + ref._shape[dim + 1:]
    out = _empty(shape, out_dtype, dev, stream)
    step = out._strides[dim] if shape else 0
    pos = 0
    for t in tensors:
        t = _on(dev, t, stream)
        n = t._shape[dim]
        if n and numel_of(t._shape):
            region = make(out._storage, t._shape, out._strides, pos * step, out_dtype)
            _copy_into(region, t, stream)
        pos += n
    return out


@register("one_hot", CUDA)
def one_hot(index, num_classes):
    dev = index._storage.device
    stream = _stream(dev.index)
    shape = index._shape + (num_classes,)
    out = _empty(shape, dt.int64, dev, stream)
    n = numel_of(shape)
    if n:
        _fill(out, 0, stream)
        _lib().scatter(index._shape + (1,), len(index._shape), num_classes, _ptr(index), index._dtype.index,
                       index._strides + (0,), 0, _SCALAR, _NO_STRIDES, 1, _ptr(out), dt.int64.index, out._strides,
                       False, stream, _index_errors.record_pointer(dev.index), _index_errors.ONE_HOT,
                       len(index._shape))
    return out
