"""Factories: tensor(), zeros/ones/full/empty, arange/linspace/eye, random."""
import numbers

import numpy as np

from .. import dtypes as dt
from ..device import device as _device, cpu as _cpu
from ..dispatch import kernel
from ..tensor import Tensor, from_numpy_owned
from ..random import cpu_generator

_K_EMPTY = kernel("empty").impl
_K_FULL = kernel("full").impl
_K_ARANGE = kernel("arange").impl
_K_FROM_NUMPY = kernel("from_numpy").impl
_K_UNIFORM = kernel("uniform").impl
_K_NORMAL = kernel("normal").impl
_K_RANDINT = kernel("randint").impl
_K_RANDPERM = kernel("randperm").impl
_K_MULTINOMIAL = kernel("multinomial").impl


def _shape_arg(size, name):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    out = []
    for s in size:
        if isinstance(s, Tensor):
            s = int(s)
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool):
            raise TypeError(f"{name}(): size must be a sequence of ints, got {type(s).__name__}")
        if s < 0:
            raise RuntimeError(f"{name}(): trying to create tensor with negative dimension {s}: {list(size)}")
        out.append(int(s))
    return tuple(out)


def _dev(device):
    return _cpu if device is None else _device(device)


def _finish(t, requires_grad):
    if requires_grad:
        t.requires_grad_(True)
    return t


def _infer_dtype(arr, data):
    kind = arr.dtype.kind
    if kind == "b":
        return dt.bool_
    if kind in "iu":
        return dt.from_numpy_dtype(arr.dtype) if isinstance(data, np.ndarray) else dt.int64
    if kind == "f" or arr.dtype == dt.bfloat16.np:
        return dt.from_numpy_dtype(arr.dtype) if isinstance(data, np.ndarray) else dt.get_default_dtype()
    raise TypeError(f"tensor(): cannot make a tensor from data of numpy kind {arr.dtype}")


def tensor(data, dtype=None, device=None, requires_grad=False):
    """New tensor copying data (nested lists, numbers, NumPy arrays, tensors)."""
    if isinstance(dtype, str):
        dtype = dt.from_name(dtype)
    if isinstance(data, Tensor):
        src = data.detach()
        arr = src._host_array()
        if dtype is None:
            dtype = data._dtype
    else:
        if isinstance(data, (list, tuple)) and any(isinstance(v, Tensor) for v in _flatten(data)):
            data = _nested_tensors_to_lists(data)
        try:
            arr = np.asarray(data)
        except ValueError as e:  # NumPy >= 1.24 refuses ragged nested lists
            raise ValueError(f"tensor(): could not build a tensor: data is ragged ({e})") from None
        if arr.dtype == object:
            raise TypeError("tensor(): could not infer dtype: data is ragged or holds non-numbers")
        if dtype is None:
            dtype = _infer_dtype(arr, data)
    dev = _dev(device)
    out = _K_FROM_NUMPY[dev.backend](arr, dtype, dev)
    return _finish(out, requires_grad)


def _flatten(data):
    for v in data:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


def _nested_tensors_to_lists(data):
    return [_nested_tensors_to_lists(v) if isinstance(v, (list, tuple)) else
            (v.tolist() if isinstance(v, Tensor) else v) for v in data]


def from_numpy(arr):
    """A CPU tensor sharing memory with a NumPy array (like torch.from_numpy)."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"from_numpy() expects a numpy.ndarray, got {type(arr).__name__}")
    dtype = dt.from_numpy_dtype(arr.dtype)
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = np.array(arr, order="C")
    return from_numpy_owned(arr, dtype)


def as_tensor(data, dtype=None, device=None):
    if isinstance(data, Tensor):
        out = data
        if device is not None:
            out = out.to(device)
        if dtype is not None:
            out = out.to(dtype)
        return out
    if isinstance(data, np.ndarray) and device in (None, "cpu") and (dtype is None or dtype.np == data.dtype):
        return from_numpy(data)
    return tensor(data, dtype=dtype, device=device)


def _resolve(dtype, default=None):
    if dtype is None:
        return default or dt.get_default_dtype()
    if isinstance(dtype, str):
        return dt.from_name(dtype)
    return dtype


def empty(*size, dtype=None, device=None, requires_grad=False):
    shape = _shape_arg(size, "empty")
    dev = _dev(device)
    return _finish(_K_EMPTY[dev.backend](shape, _resolve(dtype), dev), requires_grad)


def full(size, fill_value, dtype=None, device=None, requires_grad=False):
    shape = _shape_arg((size,) if not isinstance(size, (tuple, list)) else (tuple(size),), "full")
    if dtype is None:
        dtype = dt.bool_ if isinstance(fill_value, bool) else dt.int64 if isinstance(fill_value, numbers.Integral) \
            else dt.get_default_dtype()
    dev = _dev(device)
    return _finish(_K_FULL[dev.backend](shape, fill_value, _resolve(dtype), dev), requires_grad)


def zeros(*size, dtype=None, device=None, requires_grad=False):
    shape = _shape_arg(size, "zeros")
    dev = _dev(device)
    return _finish(_K_FULL[dev.backend](shape, 0, _resolve(dtype), dev), requires_grad)


def ones(*size, dtype=None, device=None, requires_grad=False):
    shape = _shape_arg(size, "ones")
    dev = _dev(device)
    return _finish(_K_FULL[dev.backend](shape, 1, _resolve(dtype), dev), requires_grad)


def _like(x, dtype, device):
    return (x._dtype if dtype is None else _resolve(dtype)), (x._storage.device if device is None else _device(device))


def zeros_like(x, dtype=None, device=None, requires_grad=False):
    d, dev = _like(x, dtype, device)
    return _finish(_K_FULL[dev.backend](x._shape, 0, d, dev), requires_grad)


def ones_like(x, dtype=None, device=None, requires_grad=False):
    d, dev = _like(x, dtype, device)
    return _finish(_K_FULL[dev.backend](x._shape, 1, d, dev), requires_grad)


def full_like(x, fill_value, dtype=None, device=None, requires_grad=False):
    d, dev = _like(x, dtype, device)
    return _finish(_K_FULL[dev.backend](x._shape, fill_value, d, dev), requires_grad)


def empty_like(x, dtype=None, device=None, requires_grad=False):
    d, dev = _like(x, dtype, device)
    return _finish(_K_EMPTY[dev.backend](x._shape, d, dev), requires_grad)


def rand_like(x, dtype=None, device=None, generator=None):
    d, dev = _like(x, dtype, device)
    return _K_UNIFORM[dev.backend](x._shape, 0.0, 1.0, d, dev, generator)


def randn_like(x, dtype=None, device=None, generator=None):
    d, dev = _like(x, dtype, device)
    return _K_NORMAL[dev.backend](x._shape, 0.0, 1.0, d, dev, generator)


def arange(start, end=None, step=1, dtype=None, device=None, requires_grad=False):
    if end is None:
        start, end = 0, start
    if step == 0:
        raise RuntimeError("arange(): step must be nonzero")
    if (end - start) * step < 0:
        raise RuntimeError(f"arange(): upper bound and larger bound inconsistent with step sign "
                           f"(start={start}, end={end}, step={step})")
    if dtype is None:
        is_int = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
        dtype = dt.int64 if is_int else dt.get_default_dtype()
    dev = _dev(device)
    return _finish(_K_ARANGE[dev.backend](start, end, step, _resolve(dtype), dev), requires_grad)


def linspace(start, end, steps, dtype=None, device=None, requires_grad=False):
    if steps < 0:
        raise RuntimeError("linspace(): number of steps must be non-negative")
    arr = np.linspace(start, end, steps, dtype=np.float64)
    return tensor(arr, dtype=_resolve(dtype), device=device, requires_grad=requires_grad)


def eye(n, m=None, dtype=None, device=None, requires_grad=False):
    if n < 0 or (m is not None and m < 0):
        raise RuntimeError(f"eye(): n and m must be non-negative, got n={n}, m={m}")
    return tensor(np.eye(n, m), dtype=_resolve(dtype), device=device, requires_grad=requires_grad)


def rand(*size, dtype=None, device=None, generator=None, requires_grad=False):
    shape = _shape_arg(size, "rand")
    dev = _dev(device)
    return _finish(_K_UNIFORM[dev.backend](shape, 0.0, 1.0, _resolve(dtype), dev, generator), requires_grad)


def randn(*size, dtype=None, device=None, generator=None, requires_grad=False):
    shape = _shape_arg(size, "randn")
    dev = _dev(device)
    return _finish(_K_NORMAL[dev.backend](shape, 0.0, 1.0, _resolve(dtype), dev, generator), requires_grad)


def randint(low, high=None, size=None, dtype=None, device=None, generator=None):
    if size is None and isinstance(high, (tuple, list)):  # randint(high, size), as torch
        low, high, size = 0, low, high
    if high is None:
        low, high = 0, low
    if size is None:
        raise TypeError("randint() missing required argument 'size'")
    if high <= low:
        raise RuntimeError(f"random_ expects 'from' to be less than 'to', but got from={low} >= to={high}")
    shape = _shape_arg((tuple(size),), "randint")
    dev = _dev(device)
    return _K_RANDINT[dev.backend](low, high, shape, _resolve(dtype, dt.int64), dev, generator)


def randperm(n, dtype=None, device=None, generator=None):
    dev = _dev(device)
    return _K_RANDPERM[dev.backend](int(n), _resolve(dtype, dt.int64), dev, generator)


def multinomial(input, num_samples, replacement=False, generator=None):
    """Category indices drawn from each row of non-negative weights (1-D or 2-D)."""
    if not isinstance(input, Tensor) or not input._dtype.is_floating_point or len(input._shape) not in (1, 2):
        raise RuntimeError("multinomial: expected a 1-D or 2-D floating point tensor of probabilities")
    n = input._shape[-1]
    if num_samples <= 0:
        raise RuntimeError(f"multinomial: num_samples must be positive, got {num_samples}")
    if not replacement and num_samples > n:
        raise RuntimeError(f"multinomial: cannot sample n_sample > prob_dist.size(-1) samples without "
                           f"replacement ({num_samples} > {n})")
    rows = input if len(input._shape) == 2 else input.reshape(1, n)
    p = rows._host_array().astype(np.float64)
    if not np.isfinite(p).all() or (p < 0).any():
        raise RuntimeError("multinomial: probability tensor contains either `inf`, `nan` or element < 0")
    if (p.sum(axis=1) <= 0).any():
        raise RuntimeError("multinomial: invalid multinomial distribution (sum of probabilities <= 0)")
    if not replacement and ((p > 0).sum(axis=1) < num_samples).any():
        raise RuntimeError("multinomial: not enough categories with non-zero probability to draw "
                           f"{num_samples} samples without replacement")
    out = _K_MULTINOMIAL[rows._storage.device.backend](rows, num_samples, replacement, generator)
    return out if len(input._shape) == 2 else out.reshape(num_samples)


def _fill_from(x, src):
    from .inplace import copy_
    from ..autograd.grad_mode import no_grad
    with no_grad():
        copy_(x, src)
    return x


def uniform_(x, a=0.0, b=1.0, generator=None):
    dev = x._storage.device
    return _fill_from(x, _K_UNIFORM[dev.backend](x._shape, a, b, x._dtype, dev, generator))


def normal_(x, mean=0.0, std=1.0, generator=None):
    dev = x._storage.device
    return _fill_from(x, _K_NORMAL[dev.backend](x._shape, mean, std, x._dtype, dev, generator))


def manual_generator_state():
    return cpu_generator()
