"""matmul and the fused linear family on CUDA: the AOT CuTeDSL GEMM (kernels/cute/gemm.py)
where it applies, the SIMT GEMM (kernels/cuda/gemm_fallback.cu) otherwise.

Every call is one `_C.gemm` with integer codes (cutegrad._gemm) and the device index, so the
native side parses no strings and asks the runtime nothing.  Split-K workspaces come from the
caching allocator on the call's stream (registered with `_C` on first use), which makes them
part of a CUDA graph's private pool under capture.

fp32 GEMMs follow `cutegrad.get_float32_matmul_precision()`: "highest" (the default) runs in
fp32 FMA; "high" (also what `backends.cuda.matmul.allow_tf32 = True` selects) runs the fp32
operands on TF32 tensor cores (wgmma kind tf32, fp32 accumulation and output, every fused
epilogue), which read both operands K-major: an operand stored the other way (the weight in an
input gradient, both operands of a weight gradient) is first copied K-major, one copy kernel
each; "medium" rounds the operands to bfloat16 and runs the bfloat16 tensor-core GEMM with fp32
accumulation and output (PyTorch permits bfloat16 at "medium").
"""
from ... import dtypes as dt
from ..._gemm import DTYPES, EPILOGUES
from ...device import CUDA, device as _device
from ...dispatch import register
from ...ops.broadcast import broadcast_shapes
from ...tensor import _STRIDES, make, numel_of
from .. import precision
from .launch import (_GEMM_MAX_BATCH, _DeviceStorage, _allocator, _bstrides, _cast_new, _contig, _copy_into, _empty,
                     _fill, _lib, _ptr, _stream)

_CODE = {dt.bfloat16: DTYPES["bf16"], dt.float16: DTYPES["fp16"], dt.float32: DTYPES["fp32"]}
_TF32 = DTYPES["tf32"]
_NONE, _BIAS, _GELU_BWD = EPILOGUES["none"], EPILOGUES["bias"], EPILOGUES["gelu_bwd"]
_RESIDUAL, _BIAS_RESIDUAL, _BIAS_GELU_AUX = EPILOGUES["residual"], EPILOGUES["bias_residual"], EPILOGUES["bias_gelu_aux"]
_AUTO = 0
# A weight gradient whose dY rows are not 16-byte multiples (classifier heads: 10 or 36 outputs)
# is padded for the tensor-core path once it has at least this many rows (below, the SIMT GEMM is
# about as fast as the two extra copies).
_PAD_MIN_ROWS = 1024
_gemm_fn = None


def _gemm():
    """_C.gemm, after registering the caching allocator as the split-K workspace source."""
    global _gemm_fn
    if _gemm_fn is None:
        lib = _lib()
        lib.set_gemm_workspace_allocator(_workspace)
        _gemm_fn = lib.gemm
    return _gemm_fn


def _workspace(nbytes, device, stream):
    """(address, owner) of nbytes from the caching allocator on `stream`; dropping owner frees it
    in stream order after the split-K kernels already enqueued there."""
    alloc = _allocator(device)
    owner = _DeviceStorage(alloc.malloc(nbytes, stream), alloc, _device(device))
    return owner.data.ptr, owner


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


def _k_major(t, k_dim, stream):
    """t, or a copy of it with dimension k_dim innermost in memory (same shape, other strides)."""
    k_dim %= len(t._shape)
    if t._strides[k_dim] == 1 or t._shape[k_dim] <= 1:
        return t
    order = [d for d in range(len(t._shape)) if d != k_dim] + [k_dim]
    moved = _contig(make(t._storage, tuple(t._shape[d] for d in order), tuple(t._strides[d] for d in order),
                         t._offset, t._dtype), stream)
    strides = [0] * len(order)
    for pos, d in enumerate(order):
        strides[d] = moved._strides[pos]
    return make(moved._storage, t._shape, tuple(strides), moved._offset, t._dtype)


def _operands(a, b, a_k_dim, b_k_dim, stream):
    """(a, b, operand code) under the float32 matmul precision: unchanged for 16-bit operands and
    at "highest"; bfloat16 copies at "medium"; K-major fp32 operands with the tf32 code at "high"
    (TF32 wgmma reads both operands K-major; a_k_dim / b_k_dim name each one's K dimension)."""
    if a._dtype is not dt.float32:
        return a, b, _CODE[a._dtype]
    mode = precision.get_float32_matmul_precision()
    if mode == "medium":
        return _cast_new(a, dt.bfloat16, stream), _cast_new(b, dt.bfloat16, stream), _CODE[dt.bfloat16]
    if mode == "high":
        return _k_major(a, a_k_dim, stream), _k_major(b, b_k_dim, stream), _TF32
    return a, b, _CODE[dt.float32]


@register("matmul", CUDA)
def matmul(a, b, out_dtype):
    """(..., m, k) @ (..., k, n) with broadcast batch dims, through cutegrad._C.gemm."""
    if a._dtype not in _CODE:
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
    a, b, in_code = _operands(a, b, -1, -2, stream)
    gemm = _gemm()
    out_code = _CODE[out_dtype]
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

            gemm(_ptr(a), (1, mm, k), (mm * k, fold if mm > 1 else k, 1), _ptr(b), (1, k, n),
                 (k * n, b_sk, b_sn), _ptr(out), (1, mm, n), (mm * n, n, 1), in_code, out_code, _NONE, 0,
                 0, None, False, stream, _AUTO, 0, 0, dev.index)
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
             _ptr(out) + start * m * n * isz_o, (cnt, m, n), (m * n, n, 1), in_code, out_code, _NONE, 0,
             0, None, False, stream, _AUTO, 0, 0, dev.index)
    return out


def _expand_view(t, shape):
    return make(t._storage, shape, _bstrides(t, shape), t._offset, t._dtype)


# --- the fused linear family (ops/linalg.py) ---------------------------------------

def _rows(t, stream):
    """(t or a dense copy, row stride) with t's leading dims flattened into rows and a unit stride
    along the last dim."""
    k = t._shape[-1]
    if k > 1 and t._strides is _STRIDES.get(t._shape):  # dense (every kernel output): rows k apart
        return t, k
    if k > 1 and t._strides[-1] != 1:
        t = _contig(t, stream)
    rs = _collapse(t._shape[:-1], t._strides[:-1])
    if rs is None:
        t = _contig(t, stream)
        rs = t._shape[-1]
    return t, (rs if rs else t._shape[-1])


def _weight_strides(w, stream):
    """(w or a dense copy, (stride along in_features, stride along out_features)): one of the two is 1."""
    s_out, s_in = w._strides
    if s_in != 1 and s_out != 1 and w._shape[0] > 1 and w._shape[1] > 1:
        w = _contig(w, stream)
        s_out, s_in = w._strides
    return w, s_in, s_out


@register("linear", CUDA)
def linear(x, weight, bias, residual, gelu, out_dtype):
    """(act(x W^T + b) (+ residual), pre-activation or None) in one GEMM: the bias, GELU (with
    the pre-activation stored to aux) or residual run in its epilogue."""
    dev = x._storage.device
    stream = _stream(dev.index)
    in_f, out_f = x._shape[-1], weight._shape[0]
    out_shape = x._shape[:-1] + (out_f,)
    out = _empty(out_shape, out_dtype, dev, stream)
    preact = _empty(out_shape, out_dtype, dev, stream) if gelu else None
    rows = numel_of(x._shape[:-1])
    if not (rows and out_f):
        return out, preact
    if gelu:
        if bias is None:  # the GELU epilogue that stores the pre-activation adds a bias: give it zeros
            bias = _empty((out_f,), out_dtype, dev, stream)
            _fill(bias, 0.0, stream)
        epilogue = _BIAS_GELU_AUX
    elif residual is not None:
        epilogue = _BIAS_RESIDUAL if bias is not None else _RESIDUAL
    else:
        epilogue = _BIAS if bias is not None else _NONE
    x, w, in_code = _operands(x, weight, -1, 1, stream)  # w is B^T: K runs along in_features
    x, x_ld = _rows(x, stream)
    w, w_sk, w_sn = _weight_strides(w, stream)
    aux, aux_strides = 0, None
    if gelu:
        aux, aux_strides = _ptr(preact), (rows * out_f, out_f, 1)
    elif residual is not None:
        residual, r_ld = _rows(residual, stream)
        aux, aux_strides = _ptr(residual), (rows * r_ld, r_ld, 1)
    if bias is not None and bias._strides[0] != 1 and out_f > 1:
        bias = _contig(bias, stream)
    _gemm()(_ptr(x), (1, rows, in_f), (rows * x_ld, x_ld, 1), _ptr(w), (1, in_f, out_f), (0, w_sk, w_sn),
            _ptr(out), (1, rows, out_f), (rows * out_f, out_f, 1), in_code, _CODE[out_dtype], epilogue,
            _ptr(bias) if bias is not None else 0, aux, aux_strides, False, stream, _AUTO, 0, 0, dev.index)
    return out, preact


@register("linear_input_grad", CUDA)
def linear_input_grad(g, weight, preact):
    """g W, times gelu_tanh'(preact) in the epilogue when preact is given."""
    dev = g._storage.device
    stream = _stream(dev.index)
    out_f, in_f = weight._shape
    out = _empty(g._shape[:-1] + (in_f,), g._dtype, dev, stream)
    rows = numel_of(g._shape[:-1])
    if not (rows and in_f):
        return out
    epilogue = _GELU_BWD if preact is not None else _NONE
    g, w, in_code = _operands(g, weight, -1, 0, stream)  # B = W: K runs along out_features
    g, g_ld = _rows(g, stream)
    w, w_sk, w_sn = _weight_strides(w, stream)  # N runs along in_features
    aux, aux_strides = 0, None
    if preact is not None:
        preact, p_ld = _rows(preact, stream)
        aux, aux_strides = _ptr(preact), (rows * p_ld, p_ld, 1)
    _gemm()(_ptr(g), (1, rows, out_f), (rows * g_ld, g_ld, 1), _ptr(w), (1, out_f, in_f), (0, w_sn, w_sk),
            _ptr(out), (1, rows, in_f), (rows * in_f, in_f, 1), in_code, _CODE[out._dtype], epilogue, 0, aux,
            aux_strides, False, stream, _AUTO, 0, 0, dev.index)
    return out


def _padded_head(g, out, accumulate, stream):
    """(g', d) for a weight gradient whose dY (rows, out_features) has rows that are not 16-byte
    multiples (a 10- or 36-wide head), which TMA cannot read as the M-major A = dY^T: g' is dY
    copied into rows padded to 16 bytes and d an output with as many rows (holding `out` when
    accumulating).  The padding columns are never written: they only feed the rows of d past
    out_features, which are dropped.  Returns (g, out) unchanged when no padding is needed."""
    rows, out_f = g._shape
    per16 = 16 // g._dtype.itemsize
    if g._strides[1] == 1 and g._strides[0] % per16 == 0 and out_f % per16 == 0:
        return g, out
    m_pad = -(-out_f // per16) * per16
    padded = _empty((rows, m_pad), g._dtype, g._storage.device, stream)
    _copy_into(make(padded._storage, g._shape, padded._strides, 0, g._dtype), g, stream)
    d = _empty((m_pad, out._shape[1]), out._dtype, out._storage.device, stream)
    if accumulate:
        _copy_into(make(d._storage, out._shape, d._strides, 0, d._dtype), out, stream)
    return padded, d


@register("linear_weight_grad", CUDA)
def linear_weight_grad(g, x, out_dtype, into):
    """g^T x over all rows: (out_features, in_features) in out_dtype, no transposed copies (except
    the K-major operand copies of TF32); with `into`, accumulated into it by the GEMM (beta = 1)."""
    dev = g._storage.device
    stream = _stream(dev.index)
    out_f, in_f = g._shape[-1], x._shape[-1]
    accumulate = into is not None
    out = into if accumulate else _empty((out_f, in_f), out_dtype, dev, stream)
    rows = numel_of(g._shape[:-1])
    if not (out_f and in_f):
        return out
    if rows == 0:
        if not accumulate:
            _fill(out, 0.0, stream)
        return out
    g, g_ld = _rows(g, stream)
    x, x_ld = _rows(x, stream)
    g = make(g._storage, (rows, out_f), (g_ld, 1), g._offset, g._dtype)
    x = make(x._storage, (rows, in_f), (x_ld, 1), x._offset, x._dtype)
    g, x, in_code = _operands(g, x, 0, 0, stream)  # K runs along the rows of both
    d = out
    if in_code != _TF32 and g._dtype.itemsize == 2 and rows >= _PAD_MIN_ROWS and (x._strides[0] * 2) % 16 == 0 \
            and (in_f * 2) % 16 == 0:  # (otherwise X keeps this GEMM off the tensor cores anyway)
        g, d = _padded_head(g, out, accumulate, stream)
    m_pad = g._shape[1]
    (g_sr, g_sc), (x_sr, x_sc) = g._strides, x._strides
    _gemm()(_ptr(g), (1, m_pad, rows), (0, g_sc, g_sr), _ptr(x), (1, rows, in_f), (0, x_sr, x_sc), _ptr(d),
            (1, m_pad, in_f), (m_pad * in_f, d._strides[0], 1), in_code, _CODE[out._dtype], _NONE, 0, 0, None,
            accumulate, stream, _AUTO, 0, 0, dev.index)
    if d is not out:
        _copy_into(out, make(d._storage, out._shape, d._strides, d._offset, d._dtype), stream)
    if accumulate:
        out._storage.version += 1
    return out
