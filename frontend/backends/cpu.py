"""The CPU backend: every kernel of the registry, in NumPy.

It is also the float64 reference the GPU kernels are tested against, so it
favours exactness over speed: float16/bfloat16 inputs are computed in float32
and rounded once at the end, as the CUDA kernels do.
"""
import math

import numpy as np

from .. import dtypes as dt
from ..device import CPU, cpu as cpu_device
from ..dispatch import register
from ..tensor import Tensor, from_numpy_owned, make, Storage, contiguous_strides
from ..ops import codes as C
from ..ops.special import erf, erf_np_gelu_tanh
from ..random import cpu_generator

_HALF = (dt.float16, dt.bfloat16)
# Python floats, not NumPy scalars: a float64 NumPy scalar would promote a
# float32 array to float64 (NEP 50).
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_F32 = np.dtype(np.float32)


def _a(t):
    """Compute array of t: float32 for half dtypes, the array itself otherwise."""
    if t._dtype in _HALF:
        return t._np.astype(np.float32)
    return t._np


def _arg(x):
    return _a(x) if hasattr(x, "_np") else x


def _out(arr, dtype):
    return from_numpy_owned(np.asarray(arr), dtype)


def _compute_dtype(dtype):
    return np.float32 if dtype in _HALF else dtype.np


# --- storage and factories ----------------------------------------------------
@register("empty", CPU)
def empty(shape, dtype, device):
    arr = np.empty(shape, dtype.np)
    return from_numpy_owned(arr, dtype)


@register("full", CPU)
def full(shape, value, dtype, device):
    return from_numpy_owned(np.full(shape, dt.to_numpy(value, dtype)), dtype)


@register("arange", CPU)
def arange(start, end, step, dtype, device):
    if dtype.is_floating_point:
        n = max(0, int(np.ceil((end - start) / step)))
        arr = dt.to_numpy(start + np.arange(n, dtype=np.float64) * step, dtype)
    else:
        arr = np.arange(start, end, step, dtype=np.int64).astype(dtype.np)
    return from_numpy_owned(arr, dtype)


@register("from_numpy", CPU)
def from_numpy_copy(arr, dtype, device):
    return from_numpy_owned(np.array(dt.to_numpy(arr, dtype), copy=True), dtype)


@register("to_device", CPU)
def to_device(t, device):
    if device.backend == CPU:
        return t
    raise NotImplementedError(f"the CPU backend cannot move tensors to {device}")


@register("copy_", CPU)
def copy_(dst, src):
    s = src._np if src._storage.device.backend == CPU else src._host_array()
    np.copyto(dst._np, np.broadcast_to(s, dst._shape), casting="unsafe")
    return dst


@register("cast", CPU)
def cast(x, dtype):
    return from_numpy_owned(dt.to_numpy(x._np, dtype), dtype)


@register("contiguous", CPU)
def contiguous(x):
    return from_numpy_owned(np.array(x._np, order="C"), x._dtype)


# --- random -------------------------------------------------------------------
@register("uniform", CPU)
def uniform(shape, lo, hi, dtype, device, generator):
    g = generator or cpu_generator()
    return _out(g.numpy().uniform(lo, hi, size=shape), dtype)


@register("normal", CPU)
def normal(shape, mean, std, dtype, device, generator):
    g = generator or cpu_generator()
    return _out(g.numpy().normal(mean, std, size=shape), dtype)


@register("randint", CPU)
def randint(low, high, shape, dtype, device, generator):
    g = generator or cpu_generator()
    return _out(g.numpy().integers(low, high, size=shape), dtype)


@register("bernoulli_scaled", CPU)
def bernoulli_scaled(shape, keep, dtype, device, generator):
    """Dropout mask: 1/keep with probability keep, else 0."""
    g = generator or cpu_generator()
    mask = g.numpy().random(size=shape) < keep
    return _out(mask.astype(np.float32) * np.float32(1.0 / keep), dtype)


@register("randperm", CPU)
def randperm(n, dtype, device, generator):
    g = generator or cpu_generator()
    return _out(g.numpy().permutation(n), dtype)


# --- pointwise ------------------------------------------------------------------
@np.errstate(all="ignore")
def _quietly(fn, *args):
    """fn(*args) without NumPy's floating-point warnings (torch gives none).
    errstate's decorator form costs less per call than its with-statement."""
    return fn(*args)


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


def _sigmoid(x):
    with np.errstate(over="ignore"):
        return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x)))).astype(x.dtype)


_UNARY = {
    C.NEG: np.negative, C.EXP: np.exp, C.LOG: np.log, C.SQRT: np.sqrt,
    C.RSQRT: lambda x: 1.0 / np.sqrt(x), C.ABS: np.abs, C.TANH: np.tanh,
    C.SIGMOID: _sigmoid, C.RELU: lambda x: np.maximum(x, 0).astype(x.dtype),
    C.GELU: _gelu, C.GELU_TANH: erf_np_gelu_tanh,
    C.SILU: lambda x: x * _sigmoid(x), C.SIGN: np.sign, C.SIN: np.sin, C.COS: np.cos,
    C.LOGICAL_NOT: np.logical_not, C.RECIPROCAL: lambda x: 1.0 / x,
    C.SQUARE: np.square, C.ERF: erf, C.LOG1P: np.log1p, C.EXPM1: np.expm1,
    C.FLOOR: np.floor, C.CEIL: np.ceil, C.ROUND: np.round, C.TRUNC: np.trunc,
    C.ISNAN: np.isnan, C.ISINF: np.isinf, C.ISFINITE: np.isfinite,
}


@register("unary", CPU)
def unary(code, x, out_dtype):
    a = _a(x)
    if out_dtype.is_floating_point and a.dtype.kind != "f" or x._dtype is dt.bool_ and out_dtype is dt.int64:
        # NumPy would pick float16 for exp(uint8) and float64 for exp(int64);
        # torch computes in the output dtype.
        a = a.astype(_compute_dtype(out_dtype))
    elif code == C.SIGN and a.dtype.kind == "b":
        return _out(a.copy(), out_dtype)  # NumPy's sign has no bool loop; sign(True) is True
    r = _quietly(_UNARY[code], a)
    return _out(r, out_dtype)


def _pow(a, b):
    if isinstance(a, np.ndarray) and a.dtype.kind in "iu" and np.any(np.asarray(b) < 0):
        raise RuntimeError("Integers to negative integer powers are not allowed.")
    return np.power(a, b)


def _floordiv(a, b):
    return np.floor_divide(a, b)


def _div(a, b):
    return np.true_divide(a, b)


_BINARY = {
    C.ADD: np.add, C.SUB: np.subtract, C.MUL: np.multiply, C.DIV: _div,
    C.POW: _pow, C.MAXIMUM: np.maximum, C.MINIMUM: np.minimum,
    C.EQ: np.equal, C.NE: np.not_equal, C.LT: np.less, C.LE: np.less_equal,
    C.GT: np.greater, C.GE: np.greater_equal, C.AND: np.logical_and,
    C.OR: np.logical_or, C.XOR: np.logical_xor, C.FLOORDIV: _floordiv,
    C.REMAINDER: np.remainder, C.ATAN2: np.arctan2,
}
_CMP = (C.EQ, C.NE, C.LT, C.LE, C.GT, C.GE, C.AND, C.OR, C.XOR)
# np.errstate costs about as much as a small add, so it is skipped where NumPy
# cannot warn: max/min and comparisons (NaN propagates silently) on any dtype,
# and integer/bool arithmetic (wraps without flags). Float add/sub/mul keep it:
# inf - inf and 0 * inf set IEEE flags, and torch does not warn.
_QUIET_ANY = frozenset((C.MAXIMUM, C.MINIMUM) + _CMP)
_QUIET_INT = frozenset((C.ADD, C.SUB, C.MUL))
_INT_DIVISIONS = frozenset((C.FLOORDIV, C.REMAINDER))


@register("binary", CPU)
def binary(code, a, b, compute_dtype, out_dtype):
    """a, b: tensors or Python scalars; compute_dtype: promoted input dtype."""
    half = compute_dtype in _HALF
    cd = _F32 if half else compute_dtype.np
    # The common case, a tensor already of the compute dtype, uses its array as is.
    if a.__class__ is Tensor and a._dtype is compute_dtype and not half:
        x = a._np
    else:
        x = np.asarray(_arg(a)).astype(cd, copy=False)
    if b.__class__ is Tensor and b._dtype is compute_dtype and not half:
        y = b._np
    else:
        y = np.asarray(_arg(b)).astype(cd, copy=False)
    if code in _INT_DIVISIONS and compute_dtype.category != dt.FLOAT and np.any(y == 0):
        raise RuntimeError("ZeroDivisionError: integer division (// or %) by zero")  # torch CPU's error
    if code in _QUIET_ANY or (code in _QUIET_INT and compute_dtype.category != dt.FLOAT):
        r = _BINARY[code](x, y)
    else:
        r = _quietly(_BINARY[code], x, y)
    if r.__class__ is not np.ndarray:  # ufuncs return NumPy scalars for 0-d operands
        r = np.asarray(r)
    return from_numpy_owned(r, out_dtype)


@register("where", CPU)
def where(cond, a, b, out_dtype):
    cd = _compute_dtype(out_dtype)
    x = _arg(a)
    y = _arg(b)
    # astype, not asarray(dtype=): a Python int out of the dtype's range wraps
    # (uint8 and -3 give 253, as in torch) instead of raising OverflowError
    r = np.where(cond._np, np.asarray(x).astype(cd, copy=False), np.asarray(y).astype(cd, copy=False))
    return _out(r, out_dtype)


@register("clamp", CPU)
def clamp(x, lo, hi, out_dtype):
    cd = _compute_dtype(out_dtype)
    r = _a(x).astype(cd, copy=False)
    if lo is not None:  # bounds cast (wrapping) to the compute dtype, as in torch
        r = np.maximum(r, np.asarray(_arg(lo)).astype(cd))
    if hi is not None:
        r = np.minimum(r, np.asarray(_arg(hi)).astype(cd))
    return _out(r, out_dtype)


def _gelu_tanh_grad(v):
    """d/dv of tanh-GELU."""
    k = _SQRT_2_OVER_PI
    th = np.tanh(k * (v + 0.044715 * (v * v * v)))
    return 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * k * (1.0 + 3 * 0.044715 * v * v)


@register("act_backward", CPU)
def act_backward(code, grad, x):
    """d act(x)/dx * grad for activations whose derivative needs x."""
    g, v = _a(grad), _a(x)
    if code == C.GELU:
        cdf = 0.5 * (1.0 + erf(v * _SQRT_HALF))
        pdf = np.exp(-0.5 * v * v) * _INV_SQRT_2PI
        r = g * (cdf + v * pdf)
    elif code == C.GELU_TANH:
        r = g * _gelu_tanh_grad(v)
    elif code == C.SILU:
        s = _sigmoid(v)
        r = g * (s * (1.0 + v * (1.0 - s)))
    else:
        raise ValueError(f"act_backward has no rule for activation code {code}")
    return _out(r, grad._dtype)


# --- reductions -----------------------------------------------------------------
_REDUCE = {C.SUM: np.sum, C.MEAN: np.mean, C.MAX: np.max, C.MIN: np.min,
           C.PROD: np.prod, C.ANY: np.any, C.ALL: np.all}


@register("reduce", CPU)
def reduce(code, x, dims, keepdim, out_dtype):
    arr = _a(x)
    if code in (C.SUM, C.MEAN, C.PROD) and out_dtype.is_floating_point:
        arr = arr.astype(np.float64 if out_dtype is dt.float64 else np.float32, copy=False)
    elif code in (C.SUM, C.PROD):
        arr = arr.astype(out_dtype.np, copy=False)
    with np.errstate(all="ignore"):
        if code == C.MEAN and arr.size == 0:
            r = np.sum(arr, axis=dims, keepdims=keepdim) / 0.0  # NaN without NumPy's empty-slice warning
        else:
            r = _REDUCE[code](arr, axis=dims, keepdims=keepdim)
    return _out(r, out_dtype)


@register("argreduce", CPU)
def argreduce(code, x, dim, keepdim):
    arr = _a(x)
    fn = np.argmax if code == C.ARGMAX else np.argmin
    if dim is None:
        r = fn(arr.reshape(-1))
        if keepdim:
            r = np.reshape(r, (1,) * arr.ndim)
    else:
        r = fn(arr, axis=dim)
        if keepdim:
            r = np.expand_dims(r, dim)
    return _out(r, dt.int64)


@register("var", CPU)
def var(x, dims, correction, keepdim):
    arr = _a(x).astype(np.float64 if x._dtype is dt.float64 else np.float32, copy=False)
    n = 1
    for d in dims:
        n *= arr.shape[d]
    with np.errstate(all="ignore"):
        mean = arr.mean(axis=dims, keepdims=True)
        r = np.sum((arr - mean) ** 2, axis=dims, keepdims=keepdim) / max(n - correction, 0)
    return _out(r, x._dtype)


@register("logsumexp", CPU)
def logsumexp(x, dims, keepdim):
    arr = _a(x)
    # np.max has no identity for empty slices; -inf is logsumexp's (torch's too)
    m = np.max(arr, axis=dims, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(all="ignore"):
        r = np.log(np.sum(np.exp(arr - m), axis=dims, keepdims=True)) + m
    if not keepdim:
        r = np.squeeze(r, axis=dims)
    return _out(r, x._dtype)


# --- linear algebra --------------------------------------------------------------
@register("matmul", CPU)
def matmul(a, b, out_dtype):
    x, y = _a(a), _a(b)
    if x.ndim > 2 and y.ndim == 2:
        # One (batch*m, k) @ (k, n) GEMM: NumPy would run one small GEMM per
        # batch row, which collapses when BLAS threads share busy cores.
        return _out(np.matmul(x.reshape(-1, x.shape[-1]), y).reshape(x.shape[:-1] + (y.shape[1],)), out_dtype)
    return _out(np.matmul(x, y), out_dtype)


# The fused linear family (ops/linalg.py): the same epilogue order as the GPU GEMM,
# in the compute dtype (float32 for half types, float64 for float64), rounded once.
def _rows(arr):
    return arr.reshape(-1, arr.shape[-1])


@register("linear", CPU)
def linear(x, weight, bias, residual, gelu, out_dtype):
    """(act(x W^T + b) (+ residual), pre-activation or None)."""
    xa = _a(x)
    z = (_rows(xa) @ _a(weight).T).reshape(xa.shape[:-1] + (weight._shape[0],))
    if bias is not None:
        z = z + _a(bias)
    preact = None
    if gelu:
        preact = _out(z, out_dtype)
        z = erf_np_gelu_tanh(_a(preact))  # GELU of the stored (rounded) pre-activation, as the GPU does
    if residual is not None:
        z = z + _a(residual)
    return _out(z, out_dtype), preact


@register("linear_input_grad", CPU)
def linear_input_grad(g, weight, preact):
    """g W (* gelu_tanh'(preact))."""
    ga = _a(g)
    r = (_rows(ga) @ _a(weight)).reshape(ga.shape[:-1] + (weight._shape[1],))
    if preact is not None:
        r = r * _gelu_tanh_grad(_a(preact))
    return _out(r, g._dtype)


@register("linear_weight_grad", CPU)
def linear_weight_grad(g, x, out_dtype, into):
    """g^T x over all rows, in out_dtype; with `into`, added to it in place (beta = 1)."""
    r = _rows(_a(g)).T @ _rows(_a(x))
    if into is None:
        return _out(r, out_dtype)
    into._np[...] = dt.to_numpy(_a(into) + r, into._dtype)
    into._storage.version += 1
    return into


# --- normalisation and softmax ----------------------------------------------------
@register("softmax", CPU)
def softmax(x, dim, log):
    arr = _a(x)
    if arr.size == 0:  # np.max has no identity; the result is empty anyway
        return _out(arr, x._dtype)
    m = np.max(arr, axis=dim, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(all="ignore"):
        e = arr - m
        if log:
            r = e - np.log(np.sum(np.exp(e), axis=dim, keepdims=True))
        else:
            p = np.exp(e)
            r = p / np.sum(p, axis=dim, keepdims=True)
    return _out(r, x._dtype)


@register("layer_norm", CPU)
def layer_norm(x, nd, weight, bias, eps):
    arr = _a(x)
    axes = tuple(range(arr.ndim - nd, arr.ndim))
    n = 1
    for d in axes:
        n *= arr.shape[d]
    # np.add.reduce / n is np.mean without its Python-level wrapper
    mean = np.add.reduce(arr, axis=axes, keepdims=True) / n
    centered = arr - mean
    var = np.add.reduce(centered * centered, axis=axes, keepdims=True) / n
    rstd = 1.0 / np.sqrt(var + eps)
    y = centered * rstd
    if weight is not None:
        y = y * _a(weight)
    if bias is not None:
        y = y + _a(bias)
    stat = dt.float64 if x._dtype is dt.float64 else dt.float32
    return _out(y, x._dtype), _out(mean, stat), _out(rstd, stat)


@register("rms_norm", CPU)
def rms_norm(x, nd, weight, eps):
    arr = _a(x)
    axes = tuple(range(arr.ndim - nd, arr.ndim))
    rstd = 1.0 / np.sqrt((arr * arr).mean(axis=axes, keepdims=True) + eps)
    y = arr * rstd
    if weight is not None:
        y = y * _a(weight)
    stat = dt.float64 if x._dtype is dt.float64 else dt.float32
    return _out(y, x._dtype), _out(rstd, stat)


@register("add_norm", CPU)
def add_norm(x, residual, weight, bias, eps, rms, out_dtype):
    """(normed, new residual, mean or None, rstd) of ops.add_layer_norm / add_rms_norm over the last dim.

    The new residual is x + residual rounded to their promoted dtype (x itself
    without a residual); the norm reads that rounded sum, as the kernels do."""
    if residual is None:
        s = x
    else:
        s_dtype = dt.promote_types(x._dtype, residual._dtype)
        s = _out(_a(x).astype(_compute_dtype(s_dtype)) + _a(residual), s_dtype)
    stat = dt.float64 if s._dtype is dt.float64 else dt.float32
    arr = _a(s).astype(stat.np)
    mean = None if rms else np.add.reduce(arr, axis=-1, keepdims=True) / arr.shape[-1]
    centered = arr if rms else arr - mean
    rstd = 1.0 / np.sqrt(np.add.reduce(centered * centered, axis=-1, keepdims=True) / arr.shape[-1] + eps)
    y = centered * rstd
    if weight is not None:
        y = y * _a(weight)
    if bias is not None:
        y = y + _a(bias)
    return _out(y, out_dtype), s, None if rms else _out(mean, stat), _out(rstd, stat)


@register("add_dropout_norm", CPU)
def add_dropout_norm(x, residual, weight, bias, eps, rms, out_dtype, keep, generator):
    """add_norm of (dropout(x), residual) and the rng_state its backward needs: on the CPU the
    scaled mask itself.  The mask is the one the CPU dropout (ops.dropout: bernoulli_scaled, then
    a multiply) draws from the same generator state, and dropout(x) is rounded to x's dtype as that
    multiply rounds it, so the values equal dropout followed by add_norm."""
    mask = bernoulli_scaled(x._shape, keep, x._dtype, None, generator)
    dropped = _out(_a(x) * _a(mask), x._dtype)
    return add_norm(dropped, residual, weight, bias, eps, rms, out_dtype) + (mask,)


# --- indexing ----------------------------------------------------------------------
@register("gather", CPU)
def gather(x, dim, index):
    idx = index._np
    # torch lets index be smaller than x outside dim; take_along_axis wants equal sizes
    src = x._np[tuple(slice(None) if d == dim else slice(0, n) for d, n in enumerate(idx.shape))]
    return _out(np.take_along_axis(src, idx, axis=dim), x._dtype)


@register("scatter_add", CPU)
def scatter_add(base, dim, index, src):
    """out = base.clone(); out[index along dim] += src (index.shape == src.shape)."""
    out = np.array(_a(base), copy=True)
    idx = index._np
    grids = list(np.indices(idx.shape, sparse=True))
    grids[dim] = idx
    np.add.at(out, tuple(grids), _a(src))
    return _out(out, base._dtype)


@register("index_select", CPU)
def index_select(x, dim, index):
    return _out(np.take(x._np, index._np, axis=dim), x._dtype)


@register("index_add", CPU)
def index_add(base, dim, index, src):
    out = np.array(_a(base), copy=True)
    moved = np.moveaxis(out, dim, 0)
    np.add.at(moved, index._np, np.moveaxis(_a(src), dim, 0))
    return _out(out, base._dtype)


def _np_key(key):
    return tuple(k._np if hasattr(k, "_np") else k for k in key)


@register("index", CPU)
def index(x, key):
    return _out(x._np[_np_key(key)], x._dtype)


@register("index_put_", CPU)
def index_put_(x, key, values, accumulate):
    k = _np_key(key)
    v = values._np if hasattr(values, "_np") else values
    if accumulate:
        tmp = _a(x).copy() if x._dtype in _HALF else x._np
        np.add.at(tmp, k, v.astype(tmp.dtype) if isinstance(v, np.ndarray) else v)
        if tmp is not x._np:
            x._np[...] = tmp.astype(x._dtype.np)
    else:
        x._np[k] = v
    return x


@register("sort", CPU)
def sort(x, dim, descending, count):
    """The first `count` entries of x sorted along dim, and their indices.
    Stable in both directions; NaN sorts as the largest value (torch's order)."""
    arr = _a(x)
    if descending:
        # Stable descending order: ascending sort of the reversed axis, reversed back.
        rev = np.flip(arr, axis=dim)
        idx = np.flip(np.argsort(rev, axis=dim, kind="stable"), axis=dim)
        idx = arr.shape[dim] - 1 - idx
    else:
        idx = np.argsort(arr, axis=dim, kind="stable")
    if count != arr.shape[dim]:
        idx = np.take(idx, np.arange(count), axis=dim)
    return _out(np.take_along_axis(x._np, idx, axis=dim), x._dtype), _out(idx, dt.int64)


@register("cumsum", CPU)
def cumsum(x, dim, out_dtype):
    arr = _a(x)
    acc = np.float64 if out_dtype is dt.float64 else np.float32 if out_dtype.is_floating_point else out_dtype.np
    return _out(np.cumsum(arr, axis=dim, dtype=acc), out_dtype)


@register("nonzero", CPU)
def nonzero(x):
    return _out(np.argwhere(x._np), dt.int64)


@register("multinomial", CPU)
def multinomial(probs, num_samples, replacement, generator):
    """Row-wise draws of category indices (probs: (rows, n), validated by the op)."""
    g = (generator or cpu_generator()).numpy()
    p = _a(probs).astype(np.float64)
    out = np.empty((p.shape[0], num_samples), np.int64)
    for r in range(p.shape[0]):
        out[r] = g.choice(p.shape[1], size=num_samples, replace=replacement, p=p[r] / p[r].sum())
    return _out(out, dt.int64)


@register("cat", CPU)
def cat(tensors, dim, out_dtype):
    return _out(np.concatenate([dt.to_numpy(t._np, out_dtype) for t in tensors], axis=dim), out_dtype)


@register("one_hot", CPU)
def one_hot(index, num_classes):
    idx = index._np
    out = np.zeros(idx.shape + (num_classes,), np.int64)
    np.put_along_axis(out, idx[..., None], 1, axis=-1)
    return _out(out, dt.int64)


def storage_nbytes(t):
    return t._storage.data.nbytes


__all__ = ["storage_nbytes", "make", "Storage", "contiguous_strides", "cpu_device"]
