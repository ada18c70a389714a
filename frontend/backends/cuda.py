"""The CUDA backend: every compute kernel of the registry on CUDA tensors.

Storage kernels (empty, full, from_numpy, to_device) come from
`cutegrad.cuda.tensors`, imported here; this module registers everything
else with the same names, signatures and semantics as the CPU backend (the
spec: half types compute in fp32 and round once) and overrides `copy_` for
device-to-device copies so casts, broadcasts and strided destinations run
on the GPU instead of through the host.

Index kernels (gather, index_select, scatter_add, index_add, one_hot) get
the device's error record (cutegrad.cuda.index_errors): an out-of-range
index is skipped on the device and raised as IndexError at the host's next
wait for the device, so no index tensor is read back before a launch.

Each kernel allocates its output from the caching allocator on the device's
current stream and calls one `cutegrad._C` entry point with raw pointers,
shapes and strides (kernels/cuda/ops_bindings.cpp validates them and launches
on that stream). Nothing here synchronises, except what needs values on the
host: advanced indexing keys (index/index_put_, whose element offsets are
computed and bounds-checked on the host), and randperm.

Importing this module touches neither the driver nor `cutegrad._C`; both are
reached on the first CUDA op. The design of the kernels is in docs/cuda_ops.md.
"""
import numpy as np

from .. import dtypes as dt
from ..device import CUDA
from ..dispatch import register
from ..tensor import Tensor, Storage, make, contiguous_strides, numel_of
from ..ops import codes as C
from ..ops.broadcast import broadcast_shapes
from ..cuda import tensors as _cuda_tensors  # registers empty/full/from_numpy/to_device/copy_ for CUDA
from ..cuda import streams as _streams
from ..cuda import driver as _driver
from ..cuda import index_errors as _index_errors

# compute types and kernel families of kernels/cuda/ops_args.h
_F32, _F64, _I64 = 0, 1, 2
_UNARY, _BINARY, _WHERE, _CLAMP, _ACT, _COPY, _ARANGE = range(7)
_VAR, _LOGSUMEXP = 300, 301
_ABSENT, _SCALAR = -1, -2
_UNIFORM, _NORMAL, _RANDINT, _BERNOULLI = range(4)

# compute type of each dtype, by DType.index
_COMPUTE = tuple(_I64 if d.category != dt.FLOAT else (_F64 if d is dt.float64 else _F32) for d in dt.ALL)
_HALF = (dt.float16, dt.bfloat16)
_GEMM_DTYPE = {dt.float32: "fp32", dt.bfloat16: "bf16", dt.float16: "fp16"}
_NO_STRIDES = ()
_GEMM_MAX_BATCH = 65535

_stream_tls = _streams._tls
_DeviceAllocation = _cuda_tensors.DeviceAllocation
_native = None
_allocators = {}
_poison = False


def _lib():
    global _native
    if _native is None:
        from .._gemm import native
        _native = native()
    return _native


def set_poison_outputs(flag):
    """Fill every output this backend allocates with 0xFF bytes (NaN for floats) before the kernel runs.

    For tests: an element a kernel forgets to write then shows up as NaN (or -1).
    """
    global _poison
    _poison = bool(flag)


def _stream(idx):
    """Handle of the calling thread's current stream on device idx (0: the legacy default stream)."""
    cur = getattr(_stream_tls, "current", None)
    if cur is not None:
        s = cur.get(idx)
        if s is not None:
            return s.handle
    return 0


def _allocator(idx):
    alloc = _allocators.get(idx)
    if alloc is None:
        from cutegrad.allocator import get_allocator
        alloc = _allocators[idx] = get_allocator(idx)
    return alloc


def _empty(shape, dtype, dev, stream):
    """A new contiguous tensor on dev, taken on `stream` (the device's current one)."""
    idx = dev.index
    _driver.activate(idx)
    nbytes = numel_of(shape) * dtype.itemsize
    alloc = _allocators.get(idx) or _allocator(idx)
    block = alloc.malloc(nbytes, stream)
    if _poison and nbytes:
        _driver.call("cuMemsetD8Async", block.ptr, 0xFF, nbytes, _driver.driver().CUstream(stream))
    storage = Storage(_DeviceAllocation(block, alloc, nbytes, idx), dev)
    return make(storage, shape, contiguous_strides(shape), 0, dtype)


def _ptr(t):
    return t._storage.data.ptr + t._offset * t._dtype.itemsize


def _bstrides(t, shape):
    """t's strides broadcast to `shape` (0 on broadcast and missing leading dimensions)."""
    ts = t._shape
    if ts == shape:
        return t._strides
    off = len(shape) - len(ts)
    st = t._strides
    return tuple(0 if i < off or ts[i - off] == 1 else st[i - off] for i in range(len(shape)))


def _as_number(v):
    """A 0-dim tensor on another device (the CPU) acts as a Python scalar beside CUDA tensors."""
    return v.item() if isinstance(v, Tensor) else v


def _is_cuda(v):
    return isinstance(v, Tensor) and v._storage.device.backend == CUDA


def _copy_compute(src, dst):
    if src.category != dt.FLOAT:
        return _I64
    return _F64 if (src is dt.float64 or dst is dt.float64) else _F32


def _copy_into(dst, src, stream):
    """dst[...] = src (broadcast, cast) on the GPU; both on the same device."""
    _lib().elementwise(_COPY, 0, _copy_compute(src._dtype, dst._dtype), dst._shape, _ptr(dst), dst._dtype.index,
                       dst._strides, _ptr(src), src._dtype.index, _bstrides(src, dst._shape), None,
                       0, _ABSENT, _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None, None, None, stream)


def _contig(x, stream):
    if x.is_contiguous():
        return x
    out = _empty(x._shape, x._dtype, x._storage.device, stream)
    _copy_into(out, x, stream)
    return out


def _cast_new(x, dtype, stream):
    out = _empty(x._shape, dtype, x._storage.device, stream)
    _copy_into(out, x, stream)
    return out


def _fill(out, value, stream):
    _lib().elementwise(_COPY, 0, _COMPUTE[out._dtype.index], out._shape, _ptr(out), out._dtype.index, out._strides,
                       0, _SCALAR, _NO_STRIDES, value, 0, _ABSENT, _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None,
                       None, None, stream)


# --- copies and conversions ------------------------------------------------------
_host_copy_ = _cuda_tensors.copy_


@register("copy_", CUDA)
def copy_(dst, src):
    sdev = src._storage.device
    ddev = dst._storage.device
    # Across devices, from the host, or with no CUDA driver running (tensors over
    # a simulated device) the copy layer of cutegrad.cuda.tensors does it.
    if sdev is not ddev or not numel_of(dst._shape) or not _driver.is_initialized():
        return _host_copy_(dst, src)
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


# --- pointwise ---------------------------------------------------------------------
@register("unary", CUDA)
def unary(code, x, out_dtype):
    dev = x._storage.device
    stream = _stream(dev.index)
    out = _empty(x._shape, out_dtype, dev, stream)
    compute = _COMPUTE[(out_dtype if out_dtype.is_floating_point else x._dtype).index]
    _lib().elementwise(_UNARY, code, compute, x._shape, _ptr(out), out_dtype.index, out._strides,
                       _ptr(x), x._dtype.index, x._strides, None,
                       0, _ABSENT, _NO_STRIDES, None, 0, _ABSENT, _NO_STRIDES, None, None, None, stream)
    return out


def _operand(v, shape):
    """(pointer, dtype code, strides, scalar) of an elementwise input."""
    if _is_cuda(v):
        return _ptr(v), v._dtype.index, _bstrides(v, shape), None
    return 0, _SCALAR, _NO_STRIDES, _as_number(v)


def _shape_of(*vals):
    shapes = [v._shape for v in vals if _is_cuda(v)]
    if len(shapes) == 1 or all(s == shapes[0] for s in shapes):
        return shapes[0]
    return tuple(broadcast_shapes(*shapes))


@register("binary", CUDA)
def binary(code, a, b, compute_dtype, out_dtype):
    # The frontend turns 0-dim CPU tensors into Python numbers, so a Tensor
    # operand here is on this device; the same-shape case skips broadcasting.
    if isinstance(a, Tensor):
        dev = a._storage.device
        pa = a._storage.data.ptr + a._offset * a._dtype.itemsize
        da, va = a._dtype.index, None
        if isinstance(b, Tensor):
            pb = b._storage.data.ptr + b._offset * b._dtype.itemsize
            db, vb = b._dtype.index, None
            shape = a._shape
            if shape == b._shape:
                sa, sb = a._strides, b._strides
            else:
                shape = broadcast_shapes(shape, b._shape)
                sa, sb = _bstrides(a, shape), _bstrides(b, shape)
        else:
            shape, sa = a._shape, a._strides
            pb, db, sb, vb = 0, _SCALAR, _NO_STRIDES, b
    else:
        dev = b._storage.device
        shape, sb = b._shape, b._strides
        pb = b._storage.data.ptr + b._offset * b._dtype.itemsize
        db, vb = b._dtype.index, None
        pa, da, sa, va = 0, _SCALAR, _NO_STRIDES, a
    stream = _stream(dev.index)
    out = _empty(shape, out_dtype, dev, stream)
    (_native or _lib()).elementwise(_BINARY, code, _COMPUTE[compute_dtype.index], shape, _ptr(out),
                                    out_dtype.index, out._strides, pa, da, sa, va, pb, db, sb, vb,
                                    0, _ABSENT, _NO_STRIDES, None, None, None, stream)
    return out


@register("where", CUDA)
def where(cond, a, b, out_dtype):
    dev = cond._storage.device
    shape = _shape_of(cond, a, b)
    stream = _stream(dev.index)
    out = _empty(shape, out_dtype, dev, stream)
    pa, da, sa, va = _operand(a, shape)
    pb, db, sb, vb = _operand(b, shape)
    _lib().elementwise(_WHERE, 0, _COMPUTE[out_dtype.index], shape, _ptr(out), out_dtype.index, out._strides,
                       _ptr(cond), cond._dtype.index, _bstrides(cond, shape), None, pa, da, sa, va, pb, db, sb, vb,
                       None, None, stream)
    return out


@register("clamp", CUDA)
def clamp(x, lo, hi, out_dtype):
    dev = x._storage.device
    stream = _stream(dev.index)
    out = _empty(x._shape, out_dtype, dev, stream)
    _lib().elementwise(_CLAMP, 0, _COMPUTE[out_dtype.index], x._shape, _ptr(out), out_dtype.index, out._strides,
                       _ptr(x), x._dtype.index, x._strides, None, 0, _ABSENT, _NO_STRIDES, None,
                       0, _ABSENT, _NO_STRIDES, None, _as_number(lo), _as_number(hi), stream)
    return out


@register("act_backward", CUDA)
def act_backward(code, grad, x):
    dev = grad._storage.device
    shape = _shape_of(grad, x)
    stream = _stream(dev.index)
    out = _empty(shape, grad._dtype, dev, stream)
    _lib().elementwise(_ACT, code, _COMPUTE[grad._dtype.index], shape, _ptr(out), grad._dtype.index, out._strides,
                       _ptr(grad), grad._dtype.index, _bstrides(grad, shape), None,
                       _ptr(x), x._dtype.index, _bstrides(x, shape), None,
                       0, _ABSENT, _NO_STRIDES, None, None, None, stream)
    return out


# --- reductions ----------------------------------------------------------------------
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


# --- linear algebra --------------------------------------------------------------------
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


# --- softmax and normalisation ------------------------------------------------------------
@register("softmax", CUDA)
def softmax(x, dim, log):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape
    d = dim + len(shape) if dim < 0 else dim
    out = _empty(shape, x._dtype, dev, stream)
    _lib().softmax(_ptr(x), _ptr(out), x._dtype.index, numel_of(shape[:d]), shape[d], numel_of(shape[d + 1:]),
                   bool(log), 0, stream)
    return out


@register("softmax_causal", CUDA)
def softmax_causal(x):
    """softmax over the last dim of a (..., L, S) tensor with columns j > i of query row i
    (the top-left aligned tril of (L, S)) at -inf: 0 in the output; no mask tensor."""
    if len(x._shape) < 2:
        raise RuntimeError(f"softmax_causal: expected a (..., L, S) input, got shape {list(x._shape)}")
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape
    out = _empty(shape, x._dtype, dev, stream)
    _lib().softmax(_ptr(x), _ptr(out), x._dtype.index, numel_of(shape[:-1]), shape[-1], 1, False, shape[-2], stream)
    return out


@register("softmax_backward", CUDA)
def softmax_backward(y, dy, dim, log):
    """Gradient of softmax (log=False) or log_softmax (log=True) along dim from its output y."""
    if dy._shape != y._shape:
        raise RuntimeError(f"softmax_backward: grad_output of shape {list(dy._shape)} does not match the output's "
                           f"shape {list(y._shape)}")
    if dy._storage.device is not y._storage.device:
        raise RuntimeError(f"softmax_backward: grad_output on {dy._storage.device}, output on {y._storage.device}")
    dev = y._storage.device
    stream = _stream(dev.index)
    if dy._dtype is not y._dtype:
        dy = dy.to(y._dtype)
    y = _contig(y, stream)
    dy = _contig(dy, stream)
    shape = y._shape
    d = dim + len(shape) if dim < 0 else dim
    dx = _empty(shape, y._dtype, dev, stream)
    _lib().softmax_backward(_ptr(y), _ptr(dy), _ptr(dx), y._dtype.index, numel_of(shape[:d]), shape[d],
                            numel_of(shape[d + 1:]), bool(log), stream)
    return dx


def _param_ptr(p, stream):
    if p is None:
        return 0, 0, None
    p = _contig(p, stream)
    return _ptr(p), p._dtype.index, p  # the tensor is returned to keep a contiguous copy alive


def _norm(x, nd, weight, bias, eps, rms):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape
    n = numel_of(shape[len(shape) - nd:])
    rows = numel_of(shape[:len(shape) - nd])
    stat = dt.float64 if x._dtype is dt.float64 else dt.float32
    stat_shape = shape[:len(shape) - nd] + (1,) * nd
    y = _empty(shape, x._dtype, dev, stream)
    mean = None if rms else _empty(stat_shape, stat, dev, stream)
    rstd = _empty(stat_shape, stat, dev, stream)
    wp, wd, _w = _param_ptr(weight, stream)
    bp, bd, _b = _param_ptr(bias, stream)
    _lib().norm(_ptr(x), _ptr(y), x._dtype.index, rows, n, wp, wd, bp, bd, 0 if rms else _ptr(mean), _ptr(rstd),
                stat.index, float(eps), rms, stream)
    return y, mean, rstd


@register("layer_norm", CUDA)
def layer_norm(x, nd, weight, bias, eps):
    return _norm(x, nd, weight, bias, eps, False)


@register("rms_norm", CUDA)
def rms_norm(x, nd, weight, eps):
    y, _, rstd = _norm(x, nd, weight, None, eps, True)
    return y, rstd


def _norm_backward(dy, x, weight, mean, rstd, nd, want_dweight, want_dbias, rms):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    dy = _contig(dy if dy._dtype is x._dtype else _cast_new(dy, x._dtype, stream), stream)
    if dy._shape != x._shape:
        raise ValueError(f"norm backward: dy shape {list(dy._shape)} differs from x shape {list(x._shape)}")
    shape = x._shape
    n = numel_of(shape[len(shape) - nd:])
    rows = numel_of(shape[:len(shape) - nd])
    pshape = shape[len(shape) - nd:]
    dx = _empty(shape, x._dtype, dev, stream)
    wp, wd, _w = _param_ptr(weight, stream)
    pdt = weight._dtype if weight is not None else x._dtype
    dweight = _empty(pshape, pdt, dev, stream) if want_dweight else None
    dbias = _empty(pshape, pdt, dev, stream) if want_dbias else None
    rstd = _contig(rstd, stream)
    mean = None if rms else _contig(mean, stream)
    # dweight and dbias partials in the accumulation type (fp64 for fp64 inputs)
    ws_bytes = _split_workspace_bytes(n, rows, 16) if (want_dweight or want_dbias) else 0
    ws = _empty((ws_bytes,), dt.uint8, dev, stream) if ws_bytes else None
    _lib().norm_backward(_ptr(dy), _ptr(x), x._dtype.index, rows, n, wp, wd, 0 if rms else _ptr(mean), _ptr(rstd),
                         rstd._dtype.index, _ptr(dx), _ptr(dweight) if dweight is not None else 0, pdt.index,
                         _ptr(dbias) if dbias is not None else 0, pdt.index, rms,
                         _ptr(ws) if ws is not None else 0, ws_bytes, stream)
    return dx, dweight, dbias


@register("layer_norm_backward", CUDA)
def layer_norm_backward(dy, x, nd, weight, mean, rstd, want_dweight=True, want_dbias=True):
    """(dx, dweight, dbias) of layer_norm from its saved mean/rstd (CUDA only; two launches).

    dweight/dbias are None when not wanted; they are summed over rows in a fixed order.
    """
    return _norm_backward(dy, x, weight, mean, rstd, nd, want_dweight and weight is not None, want_dbias, False)


@register("rms_norm_backward", CUDA)
def rms_norm_backward(dy, x, nd, weight, rstd, want_dweight=True):
    """(dx, dweight) of rms_norm from its saved rstd (CUDA only)."""
    dx, dweight, _ = _norm_backward(dy, x, weight, None, rstd, nd, want_dweight and weight is not None, False, True)
    return dx, dweight


# --- indexing ----------------------------------------------------------------------
def _on(dev, t, stream):
    """t on device dev (index tensors may arrive from the host)."""
    if t._storage.device is dev:
        return t
    from ..ops import to_device
    return to_device(t, dev)


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


def _finish_accumulator(acc, dtype, stream):
    return acc if acc._dtype is dtype else _cast_new(acc, dtype, stream)


@register("scatter_add", CUDA)
def scatter_add(base, dim, index, src):
    dev = base._storage.device
    stream = _stream(dev.index)
    index = _on(dev, index, stream)
    out = _accumulator(base, stream)
    err = _index_errors.record_pointer(dev.index)
    if index._shape:
        _lib().scatter(index._shape, dim, out._shape[dim], _ptr(index), index._dtype.index, index._strides,
                       _ptr(src), src._dtype.index, src._strides[:len(index._shape)], None, _ptr(out),
                       out._dtype.index, out._strides, True, stream, err, _index_errors.SCATTER_ADD, dim)
    else:
        _lib().scatter((1,), 0, (out._shape or (1,))[0], _ptr(index), index._dtype.index, (0,), _ptr(src),
                       src._dtype.index, (0,), None, _ptr(out), out._dtype.index, (out._strides or (1,))[:1], True,
                       stream, err, _index_errors.SCATTER_ADD, 0)
    return _finish_accumulator(out, base._dtype, stream)


_DETERMINISTIC_ROWS_MAX = 65536  # the stable rank is O(n^2): beyond this, atomics


@register("index_add", CUDA)
def index_add(base, dim, index, src):
    dev = base._storage.device
    stream = _stream(dev.index)
    index = _on(dev, index, stream)
    out = _accumulator(base, stream)
    err = _index_errors.record_pointer(dev.index)
    n = numel_of(index._shape)
    if dim == 0 and out._dtype.is_floating_point and 0 < n <= _DETERMINISTIC_ROWS_MAX and base._shape:
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
    from ..ops import tensor
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


# --- random ------------------------------------------------------------------------
def _philox(generator, dev, n):
    from cutegrad.graphs import rng
    if generator is None:
        generator = rng.default_generator(dev.index)
    elif not isinstance(generator, rng.Generator):
        raise TypeError(f"a CUDA random op needs a cutegrad.graphs.Generator (Philox), got {type(generator).__name__}")
    return generator.philox_args(n)


def _random(kind, shape, dtype, device, generator, a=0.0, b=0.0, low=0, span=0):
    stream = _stream(device.index)
    out = _empty(tuple(shape), dtype, device, stream)
    n = numel_of(out._shape)
    if n:
        args = _philox(generator, device, n)
        _lib().random(kind, _ptr(out), dtype.index, n, args.seed, args.seed_ptr, args.offset, args.offset_ptr,
                      float(a), float(b), int(low), int(span), stream)
    return out


@register("uniform", CUDA)
def uniform(shape, lo, hi, dtype, device, generator):
    return _random(_UNIFORM, shape, dtype, device, generator, lo, hi)


@register("normal", CUDA)
def normal(shape, mean, std, dtype, device, generator):
    return _random(_NORMAL, shape, dtype, device, generator, mean, std)


@register("randint", CUDA)
def randint(low, high, shape, dtype, device, generator):
    if high - low > 1 << 32:
        raise ValueError(f"randint on CUDA draws from at most 2**32 values, got [{low}, {high})")
    return _random(_RANDINT, shape, dtype, device, generator, low=low, span=high - low)


@register("bernoulli_scaled", CUDA)
def bernoulli_scaled(shape, keep, dtype, device, generator):
    """Dropout mask: 1/keep with probability keep, else 0 (Philox; fresh numbers on every graph replay)."""
    return _random(_BERNOULLI, shape, dtype, device, generator, keep, float(np.float32(1.0 / keep)))


@register("randperm", CUDA)
def randperm(n, dtype, device, generator):
    """A permutation drawn on the host from the device generator's Philox stream, then uploaded.

    Not capturable: the shuffle needs the numbers on the host.
    """
    args = _philox(generator, device, max(n, 1))
    if args.seed_ptr or args.offset_ptr:
        raise RuntimeError("randperm on CUDA cannot be captured into a CUDA graph (it shuffles on the host)")
    bitgen = np.random.Philox(key=args.seed, counter=args.offset // 4)
    perm = np.random.Generator(bitgen).permutation(n)
    from ..ops import tensor
    return tensor(perm, dtype=dtype, device=device)


# --- scans, sorting, data-dependent shapes ---------------------------------------------------
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
    from ..ops import tensor
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
    from ..ops import tensor
    return tensor(out, dtype=dt.int64, device=dev)


# --- fused optimizer steps (CUDA only; the CPU optimizers use the ops above) --------------
_MT_CHUNK = 8192  # elements per block of the multi-tensor kernels


def _multi_tensor_lists(name, tensor_lists):
    """Pointer lists of equally long lists of contiguous CUDA tensors on one device, their sizes and dtypes."""
    ref = tensor_lists[0]
    dev = ref[0]._storage.device if ref and _is_cuda(ref[0]) else None
    out = []
    for lst in tensor_lists:
        if len(lst) != len(ref):
            raise ValueError(f"{name}: tensor lists differ in length ({len(lst)} vs {len(ref)})")
        dtype = lst[0]._dtype if lst else None
        ptrs = []
        for i, t in enumerate(lst):
            if not _is_cuda(t) or not t.is_contiguous():
                raise ValueError(f"{name}: tensor {i} must be a contiguous CUDA tensor")
            if t._storage.device != dev:
                raise ValueError(f"{name}: tensor {i} is on {t._storage.device}, the others on {dev}")
            if t._dtype is not dtype:
                raise ValueError(f"{name}: tensor {i} is {t._dtype}, the others of its list {dtype}")
            if t._shape != ref[i]._shape:
                raise ValueError(f"{name}: tensor {i} has shape {list(t._shape)}, expected {list(ref[i]._shape)}")
            ptrs.append(_ptr(t))
        out.append((ptrs, dtype))
    numels = [numel_of(t._shape) for t in ref]
    return out, numels


def _scalar_ptr(t, name, what, dev):
    """Device address of an optional one-element float32 tensor on dev (0 for None)."""
    if t is None:
        return 0
    if not _is_cuda(t) or t._dtype is not dt.float32 or numel_of(t._shape) != 1:
        raise ValueError(f"{name}: {what} must be a one-element float32 CUDA tensor")
    if t._storage.device != dev:
        raise ValueError(f"{name}: {what} is on {t._storage.device}, the tensors on {dev}")
    return _ptr(t)


def _lr_args(lr, name, dev):
    """(float lr, device lr pointer): a tensor lr is read by the kernel from device memory."""
    if isinstance(lr, Tensor):
        return 0.0, _scalar_ptr(lr, name, "lr", dev)
    return float(lr), 0


@register("adamw_multi_tensor", CUDA)
def adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                       maximize=False, grad_scale=None, decoupled=True, increment_step=False):
    """Adam(W) on every parameter in place, 48 tensors per launch (torch.optim.AdamW's update).

    lr: a float, or a one-element float32 CUDA tensor read on the device (a
    schedule may change it between replays of a captured graph).
    step: the step count after this update as an int; or one one-element
    float32 CUDA tensor read by every parameter; or a list of such tensors, one
    per parameter. increment_step (list only): add 1 to each counter on the
    device first (one extra one-block launch per 48 tensors, queued before the
    update, so the update reads the incremented count) -- the optimizer's
    capturable path. decoupled: AdamW's decay p *= 1 - lr*wd (True) or Adam's
    g += wd*p (False). grad_scale: None or a one-element float32 CUDA tensor
    every gradient is multiplied by (the clipping coefficient of grad_norm_clip).
    """
    if not params:
        return
    name = "adamw_multi_tensor"
    ((pp, pdt), (gp, gdt), (mp, mdt), (vp, vdt)), numels = _multi_tensor_lists(
        name, (params, grads, exp_avgs, exp_avg_sqs))
    if mdt is not pdt or vdt is not pdt:
        raise ValueError(f"{name}: optimizer states ({mdt}, {vdt}) must have the parameters' dtype {pdt}")
    dev = params[0]._storage.device
    step_ptrs = []
    if isinstance(step, (list, tuple)):
        if len(step) != len(params):
            raise ValueError(f"{name}: {len(step)} step counters for {len(params)} parameters")
        step_ptrs = [_scalar_ptr(s, name, f"step {i}", dev) for i, s in enumerate(step)]
        if increment_step and len(set(step_ptrs)) != len(step_ptrs):
            raise ValueError(f"{name}: increment_step needs a distinct step counter per parameter")
        step = 0.0
    elif isinstance(step, Tensor):
        if increment_step:
            raise ValueError(f"{name}: increment_step needs a list of step counters, one per parameter")
        step_ptrs, step = [_scalar_ptr(step, name, "step", dev)] * len(params), 0.0
    elif increment_step:
        raise ValueError(f"{name}: increment_step needs device step counters, got step={step!r}")
    lr, lr_ptr = _lr_args(lr, name, dev)
    _lib().adamw(pp, gp, mp, vp, numels, pdt.index, gdt.index, lr, lr_ptr, float(beta1), float(beta2), float(eps),
                 float(weight_decay), bool(decoupled), float(step), step_ptrs, bool(increment_step),
                 _scalar_ptr(grad_scale, name, "grad_scale", dev), bool(maximize), _MT_CHUNK, _stream(dev.index))


@register("sgd_multi_tensor", CUDA)
def sgd_multi_tensor(params, grads, momentum_buffers, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, first_step=False, maximize=False, grad_scale=None):
    """SGD (momentum, dampening, Nesterov, weight decay) on every parameter in place, as torch.optim.SGD.

    lr: a float, or a one-element float32 CUDA tensor read on the device.
    momentum_buffers: None for momentum 0; first_step: the buffers are
    initialised from the gradient (torch's first step) instead of updated.
    """
    if not params:
        return
    name = "sgd_multi_tensor"
    lists = (params, grads) if momentum_buffers is None else (params, grads, momentum_buffers)
    parts, numels = _multi_tensor_lists(name, lists)
    (pp, pdt), (gp, gdt) = parts[0], parts[1]
    bp = parts[2][0] if momentum_buffers is not None else []
    if momentum_buffers is not None and parts[2][1] is not pdt:
        raise ValueError(f"{name}: momentum buffers must have the parameters' dtype {pdt}")
    dev = params[0]._storage.device
    lr, lr_ptr = _lr_args(lr, name, dev)
    _lib().sgd(pp, gp, bp, numels, pdt.index, gdt.index, lr, lr_ptr, float(momentum), float(dampening),
               float(weight_decay), bool(nesterov), bool(first_step), _scalar_ptr(grad_scale, name, "grad_scale", dev),
               bool(maximize), _MT_CHUNK, _stream(dev.index))


@register("multi_tensor_scale", CUDA)
def multi_tensor_scale(tensors, scale):
    """Multiply every tensor (contiguous, one float dtype, one device) in place by a device scalar.

    scale: a one-element float32 CUDA tensor, read on the device (the clipping
    coefficient of grad_norm_clip), so no host sync; one launch per 48 tensors.
    """
    if not tensors:
        return
    name = "multi_tensor_scale"
    ((tp, tdt),), numels = _multi_tensor_lists(name, (tensors,))
    dev = tensors[0]._storage.device
    _lib().multi_tensor_scale(tp, numels, tdt.index, _scalar_ptr(scale, name, "scale", dev), _MT_CHUNK,
                              _stream(dev.index))


@register("grad_norm_clip", CUDA)
def grad_norm_clip(grads, max_norm):
    """A float32 CUDA tensor [total L2 norm of grads, min(1, max_norm / (norm + 1e-6))], computed on the device.

    The second element is the scale clip_grad_norm_ applies; pass out[1:] as
    grad_scale of the fused optimizers to clip and step without a host sync.
    The summation order is fixed (per-chunk partials, then one block), so the
    result is the same bits on every run.
    """
    if not grads:
        raise ValueError("grad_norm_clip: no gradients")
    ((gp, gdt),), numels = _multi_tensor_lists("grad_norm_clip", (grads,))
    dev = grads[0]._storage.device
    stream = _stream(dev.index)
    n_partial = max(1, sum((n + _MT_CHUNK - 1) // _MT_CHUNK for n in numels))
    partial = _empty((n_partial,), dt.float32, dev, stream)
    out = _empty((2,), dt.float32, dev, stream)
    _lib().grad_norm(gp, numels, gdt.index, _ptr(partial), n_partial, _ptr(out), float(max_norm), _MT_CHUNK, stream)
    return out


# --- fused cross-entropy (CUDA only; the frontend's cross_entropy is composite) ------------
@register("cross_entropy_rows", CUDA)
def cross_entropy_rows(logits, target, ignore_index=-100, label_smoothing=0.0):
    """(loss per row, logsumexp per row), both float32, for logits (rows, classes) and int64 target (rows).

    loss = lse - (1 - ls) * x[target] - ls * mean(x), 0 where target == ignore_index
    (torch's cross_entropy with reduction='none'); one launch, logits read twice.
    """
    dev = logits._storage.device
    stream = _stream(dev.index)
    logits, target = _ce_inputs(logits, target, stream)
    rows, classes = logits._shape
    loss = _empty((rows,), dt.float32, dev, stream)
    lse = _empty((rows,), dt.float32, dev, stream)
    _lib().cross_entropy(_ptr(logits), logits._dtype.index, _ptr(target), rows, classes, int(ignore_index),
                         float(label_smoothing), _ptr(loss), _ptr(lse), stream,
                         _index_errors.record_pointer(dev.index))
    return loss, lse


@register("cross_entropy_rows_backward", CUDA)
def cross_entropy_rows_backward(logits, target, lse, grad_rows, ignore_index=-100, label_smoothing=0.0):
    """d(sum_i grad_rows[i] * loss[i]) / d logits, in the logits' dtype, from the forward's lse."""
    dev = logits._storage.device
    stream = _stream(dev.index)
    logits, target = _ce_inputs(logits, target, stream)
    rows, classes = logits._shape
    if lse._shape != (rows,) or lse._dtype is not dt.float32 or not _is_cuda(lse):
        raise ValueError(f"cross_entropy_rows_backward: lse must be float32 CUDA of shape ({rows},)")
    grad_rows = _contig(grad_rows if grad_rows._dtype is dt.float32 else _cast_new(grad_rows, dt.float32, stream),
                        stream)
    if grad_rows._shape != (rows,):
        raise ValueError(f"cross_entropy_rows_backward: grad_rows must have shape ({rows},), got {list(grad_rows._shape)}")
    out = _empty((rows, classes), logits._dtype, dev, stream)
    _lib().cross_entropy_backward(_ptr(logits), logits._dtype.index, _ptr(target), rows, classes, int(ignore_index),
                                  float(label_smoothing), _ptr(_contig(lse, stream)), _ptr(grad_rows), _ptr(out),
                                  stream)
    return out


def _ce_inputs(logits, target, stream):
    if len(logits._shape) != 2:
        raise ValueError(f"cross_entropy_rows: logits must be (rows, classes), got shape {list(logits._shape)}")
    if target._shape != logits._shape[:1]:
        raise ValueError(f"cross_entropy_rows: target shape {list(target._shape)} does not match "
                         f"{logits._shape[0]} rows")
    dev = logits._storage.device
    target = _on(dev, target, stream)
    if target._dtype is not dt.int64:
        target = _cast_new(target, dt.int64, stream)
    return _contig(logits, stream), _contig(target, stream)


__all__ = ["set_poison_outputs", "softmax_causal", "softmax_backward", "layer_norm_backward", "rms_norm_backward", "cross_entropy_rows", "cross_entropy_rows_backward", "adamw_multi_tensor", "sgd_multi_tensor", "grad_norm_clip"]
