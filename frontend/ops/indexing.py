"""Indexing: x[key] and x[key] = v, gather/scatter_add, index_select,
one_hot. Basic keys (ints, slices, None, ...) make views; keys holding index
tensors, lists or bool masks follow NumPy's advanced-indexing rules and copy.
"""
import numpy as np

from .. import dtypes as dt
from ..dispatch import kernel
from ..tensor import Tensor
from ..autograd.engine import Node
from . import shape as S

_K_GATHER = kernel("gather").impl
_K_SCATTER_ADD = kernel("scatter_add").impl
_K_INDEX_SELECT = kernel("index_select").impl
_K_INDEX_ADD = kernel("index_add").impl
_K_INDEX = kernel("index").impl
_K_ONE_HOT = kernel("one_hot").impl
_K_NONZERO = kernel("nonzero").impl


def _normalize_key(x, key):
    """Tuple key with lists/arrays turned into index tensors; flag if advanced."""
    if not isinstance(key, tuple):
        key = (key,)
    out = []
    advanced = False
    for k in key:
        if isinstance(k, Tensor):
            if k._dtype.category == dt.FLOAT:
                raise IndexError("tensors used as indices must be long, int, byte or bool tensors")
            if k._storage.device is not x._storage.device:
                k = k.to(x._storage.device)
            if k._dtype is dt.uint8:  # a byte tensor is a mask, as in torch
                k = k.to(dt.bool_)
            advanced = True
        elif isinstance(k, (list, np.ndarray)):
            from .creation import tensor
            empty = np.size(k) == 0  # an empty list indexes nothing; it is no float index
            k = tensor(k, dtype=dt.int64 if empty else None, device=x._storage.device)
            if k._dtype.category == dt.FLOAT:
                raise IndexError("tensors used as indices must be long, int, byte or bool tensors")
            advanced = True
        elif isinstance(k, bool):
            raise IndexError("indexing with a Python bool is not supported")
        elif not (k is None or k is Ellipsis or isinstance(k, (slice, int, np.integer))):
            raise IndexError(f"only integers, slices (`:`), ellipsis (`...`), None and long or byte Variables are "
                             f"valid indices (got {type(k).__name__})")
        out.append(k)
    return tuple(out), advanced


def _check_bounds(x, key):
    """Out-of-range entries of integer index tensors raise before any kernel runs."""
    n_spec = sum(1 for k in key if k is not None and k is not Ellipsis)
    d = 0
    for k in key:
        if k is Ellipsis:
            d += len(x._shape) - n_spec
        elif k is None:
            continue
        elif isinstance(k, Tensor):
            if k._dtype is dt.bool_ or k._dtype is dt.uint8:
                if k._shape != x._shape[d:d + len(k._shape)]:
                    raise IndexError(f"The shape of the mask {list(k._shape)} at index {d} does not match the shape "
                                     f"of the indexed tensor {list(x._shape)}")
                d += len(k._shape)
                continue
            if d >= len(x._shape):
                raise IndexError(f"too many indices for tensor of dimension {len(x._shape)}")
            size = x._shape[d]
            if k.numel():
                arr = k._host_array()
                lo, hi = int(arr.min()), int(arr.max())
                if lo < -size or hi >= size:
                    bad = hi if hi >= size else lo
                    raise IndexError(f"index {bad} is out of bounds for dimension {d} with size {size}")
            d += 1
        else:
            d += 1


class IndexBackward(Node):
    __slots__ = ("in_shape", "in_dtype", "key")

    def __init__(self, in_shape, in_dtype, key):
        self.in_shape, self.in_dtype, self.key = in_shape, in_dtype, key

    def backward(self, g):
        from .creation import zeros
        from .inplace import _index_put
        gz = zeros(self.in_shape, dtype=self.in_dtype, device=g._storage.device)
        return (_index_put(gz, self.key, g, accumulate=True),)


def index(x, key):
    """Advanced indexing (NumPy semantics)."""
    _check_bounds(x, key)
    return IndexBackward.record(_K_INDEX[x._storage.device.backend](x, key), (x,), (), x._shape, x._dtype, key)


def getitem(x, key):
    key, advanced = _normalize_key(x, key)
    if advanced:
        return index(x, key)
    return S.basic_index(x, key)


def setitem(x, key, value):
    from .inplace import write_, _index_put, _check_inplace
    key, advanced = _normalize_key(x, key)
    if isinstance(value, (list, tuple, np.ndarray)):
        from .creation import tensor
        value = tensor(value, dtype=x._dtype, device=x._storage.device)
    if advanced:
        _check_bounds(x, key)
        if isinstance(value, Tensor) and value._dtype is not x._dtype:
            value = value.to(x._dtype)
        _index_put(x, key, value, accumulate=False)
        return
    _check_inplace(x, "setitem")
    shape, strides, offset = S.basic_index_meta(x, key)
    region = S._view(x, shape, strides, offset)
    if not isinstance(value, Tensor):
        from .creation import full
        value = full((), value, dtype=x._dtype, device=x._storage.device)
    write_(region, value, "setitem")


class _GatheredBackward(Node):
    """Node of an op that read x's elements along `dim` at saved indices (gather, index_select)."""
    __slots__ = ("in_shape", "dim")

    def __init__(self, in_shape, dim):
        self.in_shape, self.dim = in_shape, dim


class GatherBackward(_GatheredBackward):
    __slots__ = ()

    def backward(self, g):
        from .creation import zeros
        (idx,) = self.saved_tensors
        return (scatter_add(zeros(self.in_shape, dtype=g._dtype, device=g._storage.device), self.dim, idx, g),)


def _check_index_tensor(index, opname):
    if not isinstance(index, Tensor) or index._dtype not in (dt.int64, dt.int32):
        raise RuntimeError(f"{opname}(): Expected dtype int64 or int32 for index, got "
                           f"{getattr(index, '_dtype', type(index).__name__)}")


def _deferred_on_device(x, index):
    """True when the kernel checks the index itself (CUDA): an out-of-range entry
    is skipped and raised as IndexError at the host's next wait for the device
    (cutegrad.cuda.index_errors). Reading the index back here would be a host
    sync per op and impossible under graph capture."""
    return index._storage.device.type == "cuda" and x._storage.device.type == "cuda"


def _check_index_bounds(x, index, size, dim, opname):
    """Every entry of index must lie in [0, size) before a kernel reads with it (host tensors;
    device tensors are checked by the kernel, see _deferred_on_device)."""
    if index.numel() and not _deferred_on_device(x, index):
        arr = index._host_array()
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= size:
            raise IndexError(f"{opname}(): index {hi if hi >= size else lo} is out of bounds for dimension {dim} "
                             f"with size {size}")


def gather(x, dim, index):
    _check_index_tensor(index, "gather")
    d = x._wrap_dim(dim)
    if len(index._shape) != len(x._shape):
        raise RuntimeError(f"Index tensor must have the same number of dimensions as input tensor "
                           f"({len(index._shape)} vs {len(x._shape)})")
    for i, (a, b) in enumerate(zip(index._shape, x._shape)):
        if i != d and a > b:
            raise RuntimeError(f"Size does not match at dimension {i} expected index {list(index._shape)} to be "
                               f"smaller than self {list(x._shape)} apart from dimension {d}")
    _check_index_bounds(x, index, x._shape[d], d, "gather")
    return GatherBackward.record(_K_GATHER[x._storage.device.backend](x, d, index), (x,), (index,), x._shape, d)


class _AddedAtBackward(Node):
    """Node of an op that added src into x along `dim` at saved indices (scatter_add, index_add)."""
    __slots__ = ("dim", "has_base", "has_src")

    def __init__(self, dim, has_base, has_src):
        self.dim, self.has_base, self.has_src = dim, has_base, has_src


class ScatterAddBackward(_AddedAtBackward):
    __slots__ = ()

    def backward(self, g):
        (idx,) = self.saved_tensors
        out = []
        if self.has_base:
            out.append(g)
        if self.has_src:
            out.append(gather(g, self.dim, idx))
        return tuple(out)


def scatter_add(x, dim, index, src):
    """Out-of-place: x with src added at index along dim."""
    _check_index_tensor(index, "scatter_add")
    d = x._wrap_dim(dim)
    if index._shape != src._shape:
        # torch's rule: index may be smaller than src everywhere, and than x
        # outside dim; only src's leading corner of index's shape is added.
        if not (len(index._shape) == len(src._shape) == len(x._shape)) or \
                any(i > s for i, s in zip(index._shape, src._shape)) or \
                any(i > n for k, (i, n) in enumerate(zip(index._shape, x._shape)) if k != d):
            raise RuntimeError(f"scatter_add: index of shape {list(index._shape)} must have the dimensions of src "
                               f"{list(src._shape)} and self {list(x._shape)} and be no larger than src, nor than "
                               f"self outside dimension {d}")
        src = S.basic_index(src, tuple(slice(0, n) for n in index._shape))
    _check_index_bounds(x, index, x._shape[d], d, "scatter_add")
    out = _K_SCATTER_ADD[x._storage.device.backend](x, d, index, src)
    return ScatterAddBackward.record(out, [t for t in (x, src) if t._requires_grad], (index,), d, x._requires_grad,
                                     src._requires_grad)


class IndexSelectBackward(_GatheredBackward):
    __slots__ = ()

    def backward(self, g):
        from .creation import zeros
        (idx,) = self.saved_tensors
        return (index_add(zeros(self.in_shape, dtype=g._dtype, device=g._storage.device), self.dim, idx, g),)


def index_select(x, dim, index):
    _check_index_tensor(index, "index_select")
    if len(index._shape) > 1:
        raise IndexError("index_select(): Index is supposed to be a vector")
    d = x._wrap_dim(dim)
    _check_index_bounds(x, index, x._shape[d], d, "index_select")
    return IndexSelectBackward.record(_K_INDEX_SELECT[x._storage.device.backend](x, d, index), (x,), (index,),
                                      x._shape, d)


class IndexAddBackward(_AddedAtBackward):
    __slots__ = ()

    def backward(self, g):
        (idx,) = self.saved_tensors
        out = []
        if self.has_base:
            out.append(g)
        if self.has_src:
            out.append(index_select(g, self.dim, idx))
        return tuple(out)


def index_add(x, dim, index, source, alpha=1):
    _check_index_tensor(index, "index_add")
    if alpha != 1:
        from .pointwise import mul
        source = mul(source, alpha)
    d = x._wrap_dim(dim)
    if len(index._shape) > 1:
        raise IndexError("index_add(): Index is supposed to be a vector")
    n = index._shape[0] if index._shape else 1
    if source._shape[d:d + 1] != (n,) or len(source._shape) != len(x._shape):
        raise RuntimeError(f"index_add(): source of shape {list(source._shape)} must match self of shape "
                           f"{list(x._shape)} except in dimension {d}, where it must have the index's length {n}")
    _check_index_bounds(x, index, x._shape[d], d, "index_add")
    out = _K_INDEX_ADD[x._storage.device.backend](x, d, index, source)
    return IndexAddBackward.record(out, [t for t in (x, source) if t._requires_grad], (index,), d, x._requires_grad,
                                   source._requires_grad)


def one_hot(tensor, num_classes=-1):
    if tensor._dtype is not dt.int64:
        raise RuntimeError(f"one_hot is only applicable to index tensor of type LongTensor, got {tensor._dtype}")
    if num_classes != -1 and tensor._storage.device.type == "cuda":
        # no host read: the kernel skips a class value outside [0, num_classes) and
        # records it; it is raised at the host's next wait (see _deferred_on_device)
        if num_classes < 0:
            raise RuntimeError(f"one_hot: num_classes must be -1 or non-negative, got {num_classes}")
        return _K_ONE_HOT[tensor._storage.device.backend](tensor, num_classes)
    arr = tensor._host_array()
    if arr.size and arr.min() < 0:
        raise RuntimeError("one_hot: Class values must be non-negative.")
    if num_classes == -1:
        if not arr.size:
            raise RuntimeError("one_hot: Can not infer total number of classes from empty tensor.")
        num_classes = int(arr.max()) + 1
    elif arr.size and arr.max() >= num_classes:
        raise RuntimeError("one_hot: Class values must be smaller than num_classes.")
    return _K_ONE_HOT[tensor._storage.device.backend](tensor, num_classes)


def nonzero(x, as_tuple=False):
    """int64 (count, ndim) indices of the non-zero elements, in row-major order."""
    idx = _K_NONZERO[x._storage.device.backend](x)
    if not as_tuple:
        return idx
    if not x._shape:
        return (S.reshape(idx, (-1,)),)
    return tuple(S.select(idx, 1, d) for d in range(len(x._shape)))


def masked_select(x, mask):
    """1-D tensor of x's elements where the (broadcast) bool mask is True."""
    if not isinstance(mask, Tensor) or mask._dtype is not dt.bool_:
        raise RuntimeError(f"masked_select: expected a bool mask, got {getattr(mask, '_dtype', type(mask).__name__)}")
    from .broadcast import broadcast_shapes
    shape = broadcast_shapes(x._shape, mask._shape)
    return getitem(S.expand(x, shape), S.expand(mask, shape).contiguous())
