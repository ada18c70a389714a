"""Sorting, selection and scans: sort, argsort, topk, cumsum.

Selections return (values, indices) with int64 indices; the gradient of the
values goes back to the selected elements by a scatter at the indices, so it
runs on every backend that has scatter_add. cumsum's gradient is the reversed
cumulative sum of the incoming gradient.
"""
from .. import dtypes as dt
from ..dispatch import kernel
from ..tensor import Tensor
from ..autograd.engine import Node
from .indexing import GatherBackward
from .reduction import values_indices

_K_SORT = kernel("sort").impl
_K_CUMSUM = kernel("cumsum").impl


class SelectionBackward(GatherBackward):
    """Gradient of values picked from x along dim at saved indices: gather's."""
    __slots__ = ()


def _check_input(x, opname):
    if not isinstance(x, Tensor):
        raise TypeError(f"{opname}(): argument 'input' must be Tensor, not {type(x).__name__}")


def _selection(x, d, values, indices):
    SelectionBackward.record(values, (x,), (indices,), x._shape, d)
    return values_indices(values, indices)


def sort(x, dim=-1, descending=False, stable=False):
    """Sorted values and their int64 indices along dim (ties keep their order;
    NaN sorts as the largest value, as in torch)."""
    _check_input(x, "sort")
    if not x._shape:
        x._wrap_dim(dim)
        from .creation import zeros
        from .conversion import clone
        return values_indices(clone(x), zeros((), dtype=dt.int64, device=x._storage.device))
    d = x._wrap_dim(dim)
    values, indices = _K_SORT[x._storage.device.backend](x, d, bool(descending), x._shape[d])
    return _selection(x, d, values, indices)


def argsort(x, dim=-1, descending=False, stable=False):
    return sort(x, dim, descending, stable).indices


def topk(x, k, dim=-1, largest=True, sorted=True):
    """The k largest (or smallest) values along dim, in order, with indices."""
    _check_input(x, "topk")
    d = x._wrap_dim(dim)
    size = x._shape[d] if x._shape else 1
    if not isinstance(k, int) or not 0 <= k <= size:
        raise RuntimeError(f"topk(): selected index k={k} is out of range for dimension {d} of size {size}")
    if not x._shape:
        return sort(x, dim)
    values, indices = _K_SORT[x._storage.device.backend](x, d, bool(largest), k)
    return _selection(x, d, values, indices)


class CumsumBackward(Node):
    __slots__ = ("dim", "in_dtype")

    def __init__(self, dim, in_dtype):
        self.dim, self.in_dtype = dim, in_dtype

    def backward(self, g):
        from .shape import flip
        from .conversion import to_dtype
        r = flip(cumsum(flip(g, (self.dim,)), self.dim), (self.dim,))
        return (to_dtype(r, self.in_dtype) if r._dtype is not self.in_dtype else r,)


def cumsum(x, dim, dtype=None):
    """Cumulative sum along dim; integer and bool inputs sum in int64, as torch."""
    _check_input(x, "cumsum")
    if not x._shape:
        from .shape import reshape
        x._wrap_dim(dim)
        return reshape(cumsum(reshape(x, (1,)), 0, dtype), ())
    d = x._wrap_dim(dim)
    if dtype is None:
        dtype = x._dtype if x._dtype.is_floating_point else dt.int64
    out = _K_CUMSUM[x._storage.device.backend](x, d, dtype)
    if dtype.is_floating_point:
        CumsumBackward.record(out, (x,), (), d, x._dtype)
    return out
