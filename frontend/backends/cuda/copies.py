"""Copies and conversions on the GPU: copy_ between CUDA tensors, cast, contiguous, arange
(kernels/cuda/elementwise.cu's copy and arange modes).
"""
import numpy as np

from ...cuda import driver as _driver, tensors as _cuda_tensors
from ...device import CUDA
from ...dispatch import register
from ...tensor import numel_of
from .launch import _ABSENT, _ARANGE, _COMPUTE, _NO_STRIDES, _cast_new, _copy_into, _empty, _lib, _ptr, _stream


@register("copy_", CUDA)
def copy_(dst, src):
    sdev = src._storage.device
    ddev = dst._storage.device
    # Across devices, from the host, or with no CUDA driver running (tensors over
    # a simulated device) the copy layer of cutegrad.cuda.tensors does it.
    if sdev is not ddev or not numel_of(dst._shape) or not _driver.is_initialized():
        return _cuda_tensors.copy_through_host(dst, src)
    stream = _stream(ddev.index)
    if src._storage is dst._storage:
        src = _cast_new(src, src._dtype, stream)  # overlapping views: read everything before writing
    _copy_into(dst, src, stream)
    return dst


@register("cast", CUDA)
def cast(x, dtype):
    return _cast_new(x, dtype, _stream(x._storage.device.index))


@register("contiguous", CUDA)
def contiguous(x):
    return _cast_new(x, x._dtype, _stream(x._storage.device.index))


@register("arange", CUDA)
def arange(start, end, step, dtype, device):
    n = max(0, int(np.ceil((end - start) / step)))
    stream = _stream(device.index)
    out = _empty((n,), dtype, device, stream)
    if dtype.is_floating_point:
        lo, hi = float(start), float(step)
    else:
        lo, hi = int(start), int(step)
    _lib().elementwise(_ARANGE, 0, _COMPUTE[dtype.index], (n,), _ptr(out), dtype.index, (1,),
                       0, _ABSENT, _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None,
                       lo, hi, stream)
    return out
