"""Reductions: sum, mean, max/min (with indices), var/std, logsumexp, argmax."""
import builtins
from collections import namedtuple

from .. import dtypes as dt
from ..dispatch import kernel
from ..tensor import Tensor, numel_of
from ..autograd import grad_mode
from ..autograd.engine import Node
from . import codes as C

_K_REDUCE = kernel("reduce").impl
_K_ARG = kernel("argreduce").impl
_K_VAR = kernel("var").impl
_K_LSE = kernel("logsumexp").impl

values_indices = namedtuple("values_indices", ["values", "indices"])


def _dims(x, dim):
    """Normalized, sorted tuple of reduced dims (all when dim is None)."""
    n = len(x._shape)
    if dim is None:
        return tuple(range(n))
    if isinstance(dim, int):  # the common case: one dim, nothing to sort or deduplicate
        d = x._wrap_dim(dim)
        return (d,) if n else ()
    dims = tuple(sorted(x._wrap_dim(d) for d in dim))
    if n == 0:
        return ()  # a 0-dim tensor's dim 0 / -1 reduces nothing, as in torch
    if len(set(dims)) != len(dims):
        raise RuntimeError(f"dim {list(dim)} appears multiple times in the list of dims")
    return dims


def _unsqueeze_to(g, in_shape, dims, keepdim):
    """Bring a reduced gradient back to broadcastable rank."""
    if keepdim or not dims:
        return g
    from .shape import reshape
    shape = [1 if i in dims else s for i, s in enumerate(in_shape)]
    return reshape(g, shape)


class SumBackward(Node):
    __slots__ = ("in_shape", "dims", "keepdim", "scale")

    def __init__(self, in_shape, dims, keepdim, scale):
        self.in_shape, self.dims, self.keepdim, self.scale = in_shape, dims, keepdim, scale

    def backward(self, g):
        from .shape import expand
        from .pointwise import mul
        g = _unsqueeze_to(g, self.in_shape, self.dims, self.keepdim)
        if self.scale != 1:
            g = mul(g, self.scale)
        return (expand(g, self.in_shape),)


def _sum_dtype(x, dtype):
    if dtype is not None:
        return dtype
    return dt.int64 if x._dtype.category != dt.FLOAT else x._dtype


def sum(input, dim=None, keepdim=False, dtype=None):
    x = input
    if not isinstance(x, Tensor):
        raise TypeError(f"sum(): argument 'input' must be Tensor, not {type(x).__name__}")
    dims = _dims(x, dim)
    out = _K_REDUCE[x._storage.device.backend](C.SUM, x, dims, keepdim, _sum_dtype(x, dtype))
    return SumBackward.record(out, (x,), (), x._shape, dims, keepdim, 1)


def mean(input, dim=None, keepdim=False, dtype=None):
    x = input
    out_dt = dtype or x._dtype
    if not out_dt.is_floating_point:
        raise RuntimeError(f"mean(): could not infer output dtype. Input dtype must be either a floating point or "
                           f"complex dtype. Got: {x._dtype}")
    dims = _dims(x, dim)
    out = _K_REDUCE[x._storage.device.backend](C.MEAN, x, dims, keepdim, out_dt)
    if not x._requires_grad:
        return out
    n = numel_of([x._shape[d] for d in dims])
    return SumBackward.record(out, (x,), (), x._shape, dims, keepdim, 1.0 / n if n else float("nan"))


class _ReducedBackward(Node):
    """A reduction's node: the input's shape, the reduced dims and keepdim."""
    __slots__ = ("in_shape", "dims", "keepdim")

    def __init__(self, in_shape, dims, keepdim):
        self.in_shape, self.dims, self.keepdim = in_shape, dims, keepdim


class MaxBackward(_ReducedBackward):
    __slots__ = ()

    def backward(self, g):
        from .pointwise import eq, mul, div
        x, out = self.saved_tensors
        o = _unsqueeze_to(out, self.in_shape, self.dims, self.keepdim)
        g = _unsqueeze_to(g, self.in_shape, self.dims, self.keepdim)
        mask = eq(x, o).to(g._dtype)
        # Ties share the gradient evenly (torch's rule for full reductions).
        count = sum(mask, self.dims, keepdim=True)
        return (mul(mask, div(g, count)),)


class MaxDimBackward(Node):
    __slots__ = ("in_shape", "dim", "keepdim")

    def __init__(self, in_shape, dim, keepdim):
        self.in_shape, self.dim, self.keepdim = in_shape, dim, keepdim

    def backward(self, g):
        from .indexing import scatter_add
        from .creation import zeros
        from .shape import unsqueeze
        (idx,) = self.saved_tensors
        if not self.keepdim:
            g = unsqueeze(g, self.dim)
            idx = unsqueeze(idx, self.dim)
        return (scatter_add(zeros(self.in_shape, dtype=g._dtype, device=g._storage.device), self.dim, idx, g),)


def _extreme(code, argcode, name, x, dim, keepdim):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be Tensor, not {type(x).__name__}")
    be = x._storage.device.backend
    if dim is None:
        if numel_of(x._shape) == 0:
            raise RuntimeError(f"{name}(): Expected reduction dim to be specified for input.numel() == 0. "
                               f"Specify the reduction dim with the 'dim' argument.")
        dims = tuple(range(len(x._shape)))
        return MaxBackward.record(_K_REDUCE[be](code, x, dims, False, x._dtype), (x,), (x,), x._shape, dims, False,
                                  save_output=True)
    if isinstance(dim, Tensor) or not isinstance(dim, int):
        return (maximum_like if code == C.MAX else minimum_like)(x, dim)
    d = x._wrap_dim(dim)
    if not x._shape:  # 0-dim: the value itself, at index 0
        from .conversion import clone
        from .creation import zeros
        return values_indices(clone(x), zeros((), dtype=dt.int64, device=x._storage.device))
    if x._shape[d] == 0:
        raise IndexError(f"{name}(): Expected reduction dim {d} to have non-zero size.")
    values = _K_REDUCE[be](code, x, (d,), keepdim, x._dtype)
    indices = _K_ARG[be](argcode, x, d, keepdim)
    return values_indices(MaxDimBackward.record(values, (x,), (indices,), x._shape, d, keepdim), indices)


def maximum_like(x, other):
    from .pointwise import maximum
    return maximum(x, other)


def minimum_like(x, other):
    from .pointwise import minimum
    return minimum(x, other)


def max(input, dim=None, keepdim=False):
    x = input
    return _extreme(C.MAX, C.ARGMAX, "max", x, dim, keepdim)


def min(input, dim=None, keepdim=False):
    x = input
    return _extreme(C.MIN, C.ARGMIN, "min", x, dim, keepdim)


def _extreme_values(code, x, dim, keepdim):
    """amax/amin: values over dims, ties sharing the gradient evenly."""
    dims = _dims(x, dim)
    out = _K_REDUCE[x._storage.device.backend](code, x, dims, keepdim, x._dtype)
    return MaxBackward.record(out, (x,), (x,), x._shape, dims, keepdim, save_output=True)


def amax(input, dim=None, keepdim=False):
    return _extreme_values(C.MAX, input, dim, keepdim)


def amin(input, dim=None, keepdim=False):
    return _extreme_values(C.MIN, input, dim, keepdim)


def argmax(input, dim=None, keepdim=False):
    x = input
    d = None if dim is None else x._wrap_dim(dim)
    if numel_of(x._shape) == 0:
        raise RuntimeError("argmax(): Expected reduction dim to be specified for input.numel() == 0.")
    return _K_ARG[x._storage.device.backend](C.ARGMAX, x, d, keepdim)


def argmin(input, dim=None, keepdim=False):
    x = input
    d = None if dim is None else x._wrap_dim(dim)
    if numel_of(x._shape) == 0:
        raise RuntimeError("argmin(): Expected reduction dim to be specified for input.numel() == 0.")
    return _K_ARG[x._storage.device.backend](C.ARGMIN, x, d, keepdim)


def any(input, dim=None, keepdim=False):
    x = input
    # uint8 in, uint8 out: torch keeps that legacy rule
    return _K_REDUCE[x._storage.device.backend](C.ANY, x, _dims(x, dim), keepdim,
                                                dt.uint8 if x._dtype is dt.uint8 else dt.bool_)


def all(input, dim=None, keepdim=False):
    x = input
    # uint8 in, uint8 out: torch keeps that legacy rule
    return _K_REDUCE[x._storage.device.backend](C.ALL, x, _dims(x, dim), keepdim,
                                                dt.uint8 if x._dtype is dt.uint8 else dt.bool_)


def prod(input, dim=None, keepdim=False, dtype=None):
    x = input
    dims = _dims(x, dim)
    out = _K_REDUCE[x._storage.device.backend](C.PROD, x, dims, keepdim, _sum_dtype(x, dtype))
    return ProdBackward.record(out, (x,), (x,), x._shape, dims, keepdim, save_output=True)


class ProdBackward(_ReducedBackward):
    __slots__ = ()

    def backward(self, g):
        from .pointwise import mul, div, eq, where
        x, out = self.saved_tensors
        o = _unsqueeze_to(out, self.in_shape, self.dims, self.keepdim)
        g = _unsqueeze_to(g, self.in_shape, self.dims, self.keepdim)
        # d prod / d x_i is the product of the others: out / x_i, except at
        # zeros, where it is the product of the non-zeros if x_i is the only
        # zero of its slice, else 0.
        zero = eq(x, 0)
        nonzero_prod = prod(where(zero, 1.0, x), self.dims[0], keepdim=True) if len(self.dims) == 1 else \
            _prod_dims(where(zero, 1.0, x), self.dims)
        single_zero = eq(sum(zero, self.dims, keepdim=True), 1)
        at_zero = where(single_zero, nonzero_prod, 0.0)
        # (the division's denominator is made safe at zeros so that its own
        # gradient, under create_graph, has no 0/0 there)
        return (mul(g, where(zero, at_zero, div(o, where(zero, 1.0, x)))),)


def _prod_dims(x, dims):
    for d in dims:
        x = prod(x, d, keepdim=True)
    return x


class VarBackward(_ReducedBackward):
    __slots__ = ("correction",)

    def __init__(self, in_shape, dims, keepdim, correction):
        _ReducedBackward.__init__(self, in_shape, dims, keepdim)
        self.correction = correction

    def backward(self, g):
        from .pointwise import mul, sub
        (x,) = self.saved_tensors
        n = numel_of([self.in_shape[d] for d in self.dims])
        g = _unsqueeze_to(g, self.in_shape, self.dims, self.keepdim)
        centered = sub(x, mean(x, self.dims, keepdim=True))
        return (mul(g, mul(centered, 2.0 / builtins.max(n - self.correction, 0) if n > self.correction
                                     else float("nan"))),)


def _correction(unbiased, correction):
    if correction is not None:
        return correction
    return 1 if unbiased in (None, True) else 0


def var(input, dim=None, unbiased=None, keepdim=False, correction=None):
    x = input
    if not x._dtype.is_floating_point:
        raise RuntimeError(f"var(): input dtype should be floating point, got {x._dtype}")
    dims = _dims(x, dim)
    corr = _correction(unbiased, correction)
    out = _K_VAR[x._storage.device.backend](x, dims, corr, keepdim)
    return VarBackward.record(out, (x,), (x,), x._shape, dims, keepdim, corr)


def std(input, dim=None, unbiased=None, keepdim=False, correction=None):
    x = input
    from .pointwise import sqrt
    return sqrt(var(x, dim, unbiased, keepdim, correction))


class LogSumExpBackward(_ReducedBackward):
    __slots__ = ()

    def backward(self, g):
        from .pointwise import exp, sub, mul
        x, out = self.saved_tensors
        o = _unsqueeze_to(out, self.in_shape, self.dims, self.keepdim)
        g = _unsqueeze_to(g, self.in_shape, self.dims, self.keepdim)
        return (mul(g, exp(sub(x, o))),)


def logsumexp(input, dim, keepdim=False):
    x = input
    if not x._dtype.is_floating_point:
        x = x.to(dt.get_default_dtype())
    dims = _dims(x, dim)
    out = _K_LSE[x._storage.device.backend](x, dims, keepdim)
    return LogSumExpBackward.record(out, (x,), (x,), x._shape, dims, keepdim, save_output=True)


def var_mean(input, dim=None, unbiased=None, keepdim=False, correction=None):
    x = input
    return var(x, dim, unbiased, keepdim, correction), mean(x, dim, keepdim)


def std_mean(input, dim=None, unbiased=None, keepdim=False, correction=None):
    x = input
    return std(x, dim, unbiased, keepdim, correction), mean(x, dim, keepdim)


class NormBackward(_ReducedBackward):
    __slots__ = ("p",)

    def __init__(self, p, in_shape, dims, keepdim):
        _ReducedBackward.__init__(self, in_shape, dims, keepdim)
        self.p = p

    def backward(self, g):
        from .pointwise import mul, div, pow, abs, sign, where, eq
        x, out = self.saved_tensors
        o = _unsqueeze_to(out, self.in_shape, self.dims, self.keepdim)
        g = _unsqueeze_to(g, self.in_shape, self.dims, self.keepdim)
        p = self.p
        if p == 1:
            return (mul(g, sign(x)),)
        if p == 2:
            grad = div(x, o)
        else:  # d ||x||_p / dx = sign(x) |x|^(p-1) / ||x||_p^(p-1)
            grad = mul(sign(x), div(pow(abs(x), p - 1), pow(o, p - 1)))
        # a zero norm has zero subgradient, as in torch
        return (mul(g, where(eq(o, 0), 0.0, grad)),)


def norm(input, p="fro", dim=None, keepdim=False, dtype=None):
    """Vector p-norm over dim (all elements when None): p is 'fro', inf, -inf, 0 or any other real
    (sum |x|^p)^(1/p), negative p included, as torch."""
    x = input
    from .pointwise import abs, pow, ne
    if dtype is not None:
        x = x.to(dtype)
    if not x._dtype.is_floating_point:
        raise RuntimeError(f"norm(): input dtype should be floating point, got {x._dtype}")
    if p == "fro":
        p = 2
    if isinstance(p, str):
        raise RuntimeError(f"norm(): unsupported norm type {p!r}; expected 'fro' or a number")
    p = float(p)
    if p == float("inf"):
        return amax(abs(x), dim, keepdim)
    if p == float("-inf"):
        return amin(abs(x), dim, keepdim)
    if p == 0:
        return sum(ne(x, 0), dim, keepdim, dtype=x._dtype)
    dims = _dims(x, dim)
    with grad_mode.no_grad():
        out = pow(sum(pow(abs(x), p), dims, keepdim), 1.0 / p)
    return NormBackward.record(out, (x,), (x,), p, x._shape, dims, keepdim, save_output=True)
