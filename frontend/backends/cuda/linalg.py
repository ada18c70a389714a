"""matmul on CUDA: the AOT CuTeDSL GEMM (kernels/cute/gemm.py) where it applies,
the SIMT GEMM (kernels/cuda/gemm_fallback.cu) otherwise.
"""
from ...device import CUDA
from ...dispatch import register
from ...ops.broadcast import broadcast_shapes
from ...tensor import make, numel_of
from .launch import _GEMM_DTYPE, _GEMM_MAX_BATCH, _bstrides, _contig, _empty, _lib, _ptr, _stream


def _collapse(shape, strides):
    """One stride s with element i of the flattened dims at i * s, or None if they do not flatten."""
    s = None
    inner = None
    for n, st in zip(reversed(shape), reversed(strides)):
        if n == 1:
            continue
        if s is None:
            s, inner = st, st * n
        elif st != inner:
            return None
        else:
            inner = st * n
    return 0 if s is None else s


@register("matmul", CUDA)
def matmul(a, b, out_dtype):
    """(..., m, k) @ (..., k, n) with broadcast batch dims, through cutegrad._C.gemm."""
    dtype_name = _GEMM_DTYPE.get(a._dtype)
    if dtype_name is None:
        raise NotImplementedError(f"matmul on CUDA supports float32, bfloat16 and float16, got {a._dtype}")
    dev = a._storage.device
    stream = _stream(dev.index)
    m, k = a._shape[-2:]
    n = b._shape[-1]
    batch = tuple(broadcast_shapes(a._shape[:-2], b._shape[:-2]))
    out = _empty(batch + (m, n), out_dtype, dev, stream)
    nb = numel_of(batch)
    if not (nb and m and n):
        return out
    gemm = _lib().gemm
    out_name = _GEMM_DTYPE[out_dtype]
    a_st = _bstrides(a, batch + (m, k))
    b_st = _bstrides(b, batch + (k, n))
    a_sm, a_sk = a_st[-2:]
    b_sk, b_sn = b_st[-2:]
    if a_sk != 1 and a_sm != 1 and k > 1 and m > 1:
        a = _contig(a, stream)
        a_st = _bstrides(a, batch + (m, k))
        a_sm, a_sk = a_st[-2:]
    if b_sn != 1 and b_sk != 1 and k > 1 and n > 1:
        b = _contig(b, stream)
        b_st = _bstrides(b, batch + (k, n))
        b_sk, b_sn = b_st[-2:]
    b_batch_stride = _collapse(batch, b_st[:-2])
    if b_batch_stride == 0 and a_sk == 1:
        # b is shared by every batch: fold the batch into M (one GEMM, as linear layers need)
        fold = _collapse(batch + (m,), a_st[:-1])
        if fold is not None:
            mm = nb * m
            gemm(_ptr(a), (1, mm, k), (mm * k, fold if mm > 1 else k, 1), _ptr(b), (1, k, n), (k * n, b_sk, b_sn),
                 _ptr(out), (1, mm, n), (mm * n, n, 1), dtype_name, out_name, "none", 0, 0, None, False, stream,
                 "auto", 0)
            return out
    a_batch_stride = _collapse(batch, a_st[:-2])
    if a_batch_stride is None:
        a = _contig(_expand_view(a, batch + (m, k)), stream)
        a_st = a._strides
        a_sm, a_sk = a_st[-2:]
        a_batch_stride = m * k
    if b_batch_stride is None:
        b = _contig(_expand_view(b, batch + (k, n)), stream)
        b_st = b._strides
        b_sk, b_sn = b_st[-2:]
        b_batch_stride = k * n
    isz_a, isz_b, isz_o = a._dtype.itemsize, b._dtype.itemsize, out_dtype.itemsize
    for start in range(0, nb, _GEMM_MAX_BATCH):
        cnt = min(_GEMM_MAX_BATCH, nb - start)
        gemm(_ptr(a) + start * a_batch_stride * isz_a, (cnt, m, k), (a_batch_stride, a_sm, a_sk),
             _ptr(b) + start * b_batch_stride * isz_b, (cnt, k, n), (b_batch_stride, b_sk, b_sn),
             _ptr(out) + start * m * n * isz_o, (cnt, m, n), (m * n, n, 1), dtype_name, out_name, "none", 0, 0,
             None, False, stream, "auto", 0)
    return out


def _expand_view(t, shape):
    return make(t._storage, shape, _bstrides(t, shape), t._offset, t._dtype)
