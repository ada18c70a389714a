"""Scans, sorting and data-dependent shapes (kernels/cuda/scan.cu, sort.cu): cumsum,
sort, nonzero, multinomial.
"""
import numpy as np

from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import register
from ...tensor import numel_of
from .launch import _F32, _F64, _I64, _contig, _copy_into, _empty, _lib, _ptr, _stream
from .random import _philox


def _lines(x, dim):
    shape = x._shape
    return numel_of(shape[:dim]), shape[dim], numel_of(shape[dim + 1:])


@register("cumsum", CUDA)
def cumsum(x, dim, out_dtype):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    out = _empty(x._shape, out_dtype, dev, stream)
    if x._shape:
        if out_dtype.is_floating_point:
            compute = _F64 if out_dtype is dt.float64 else _F32
        else:
            compute = _I64
        outer, n, inner = _lines(x, dim)
        _lib().cumsum(_ptr(x), x._dtype.index, _ptr(out), out_dtype.index, compute, outer, n, inner, stream)
    else:
        _copy_into(out, x, stream)
    return out


@register("sort", CUDA)
def sort(x, dim, descending, count):
    """The first `count` entries of x sorted along dim (stable, NaN largest) and their indices."""
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape[:dim] + (count,) + x._shape[dim + 1:]
    values = _empty(shape, x._dtype, dev, stream)
    indices = _empty(shape, dt.int64, dev, stream)
    outer, n, inner = _lines(x, dim)
    _lib().sort(_ptr(x), x._dtype.index, _ptr(values), _ptr(indices), outer, n, inner, count, bool(descending), stream)
    return values, indices


@register("nonzero", CUDA)
def nonzero(x):
    """Indices (k, ndim) of the nonzero elements in C order.

    The output size depends on the values, so this synchronises (as torch's
    does); the scan runs on the host over the downloaded values.
    """
    from ...ops import tensor
    idx = np.argwhere(x._host_array())
    return tensor(idx.astype(np.int64), dtype=dt.int64, device=x._storage.device)


@register("multinomial", CUDA)
def multinomial(probs, num_samples, replacement, generator):
    """Row-wise category draws, sampled on the host from the device generator's Philox stream.

    Synchronises (the probabilities are read on the host) and cannot be captured
    into a CUDA graph; sampling for text generation, not for the training step.
    """
    dev = probs._storage.device
    p = probs._host_array().astype(np.float64)
    args = _philox(generator, dev, max(1, p.shape[0] * num_samples))
    if args.seed_ptr or args.offset_ptr:
        raise RuntimeError("multinomial on CUDA cannot be captured into a CUDA graph (it samples on the host)")
    rng = np.random.Generator(np.random.Philox(key=args.seed, counter=args.offset // 4))
    out = np.empty((p.shape[0], num_samples), np.int64)
    for r in range(p.shape[0]):
        out[r] = rng.choice(p.shape[1], size=num_samples, replace=replacement, p=p[r] / p[r].sum())
    from ...ops import tensor
    return tensor(out, dtype=dt.int64, device=dev)
