"""matmul and the fused linear family on CUDA: the AOT CuTeDSL GEMM (kernels/cute/gemm.py)
where it applies, the SIMT GEMM (kernels/cuda/gemm_fallback.cu) otherwise.

Every call is one `_C.gemm` with integer codes (cutegrad._gemm) and the device index, so the
native side parses no strings and asks the runtime nothing.  Split-K workspaces come from the
caching allocator on the call's stream (registered with `_C` on first use), which makes them
part of a CUDA graph's private pool under capture.

fp32 GEMMs follow `cutegrad.get_float32_matmul_precision()`: "highest" (the default) runs in
fp32 FMA; "medium" rounds the operands to bfloat16 and runs the tensor-core GEMM with fp32
accumulation and output; "high" (also what `backends.cuda.matmul.allow_tf32 = True` selects)
writes each operand as the sum of two bfloat16 numbers, x = hi + lo, and sums three tensor-core
products, lo*hi + hi*lo + hi*hi, into the fp32 output (about 16 mantissa bits: PyTorch's
definition of "high" allows exactly this).  The DSL release we build with has no TF32
warpgroup MMA.  At "high", epilogues other than none and bias (the bias rides on the last
product through the residual epilogue, reading the partial sum from D itself) run in fp32.
"""
from ... import dtypes as dt
from ..._gemm import DTYPES, EPILOGUES
from ...device import CUDA, device as _device
from ...dispatch import register
from ...ops.broadcast import broadcast_shapes
from ...tensor import make, numel_of
from ...ops import codes as C
from .. import precision
from .pointwise import binary
from .launch import (_GEMM_MAX_BATCH, _DeviceStorage, _allocator, _bstrides, _cast_new, _contig, _empty, _fill,
                     _lib, _ptr, _stream)

_CODE = {dt.bfloat16: DTYPES["bf16"], dt.float16: DTYPES["fp16"], dt.float32: DTYPES["fp32"]}
_NONE, _BIAS, _GELU_BWD = EPILOGUES["none"], EPILOGUES["bias"], EPILOGUES["gelu_bwd"]
_RESIDUAL, _BIAS_RESIDUAL, _BIAS_GELU_AUX = EPILOGUES["residual"], EPILOGUES["bias_residual"], EPILOGUES["bias_gelu_aux"]
_AUTO = 0
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


def _bf16_split(x, stream):
    """(hi, lo): bfloat16 tensors with hi + lo = x to about 16 mantissa bits (two kernels)."""
    hi = _cast_new(x, dt.bfloat16, stream)
    return hi, binary(C.SUB, x, hi, dt.float32, dt.bfloat16)


def _products(a, b, epilogue, stream):
    """The operand pairs whose GEMM products sum to a @ b under the float32 matmul precision:
    [(a, b)] normally; bfloat16 copies for "medium"; for "high" with a none or bias epilogue,
    the three products of the bfloat16 split (the largest last, where the epilogue runs)."""
    if a._dtype is not dt.float32:
        return ((a, b),)
    mode = precision.get_float32_matmul_precision()
    if mode == "medium":
        return ((_cast_new(a, dt.bfloat16, stream), _cast_new(b, dt.bfloat16, stream)),)
    if mode == "high" and epilogue in (_NONE, _BIAS):
        a_hi, a_lo = _bf16_split(a, stream)
        b_hi, b_lo = _bf16_split(b, stream)
        return ((a_lo, b_hi), (a_hi, b_lo), (a_hi, b_hi))
    return ((a, b),)


def _sum_products(pairs, launch, epilogue, bias, aux, aux_strides, accumulate, d_ptr, d_strides):
    """Launch one GEMM per operand pair into D: the first with the caller's accumulate flag, the
    rest accumulating; the epilogue on the last (a bias there reads the partial sum as a
    residual, aux = D itself, since no accumulate + bias kernel exists)."""
    last = len(pairs) - 1
    for i, (a, b) in enumerate(pairs):
        if i < last:
            launch(a, b, _NONE, 0, 0, None, accumulate or i > 0)
        elif last and epilogue == _BIAS:
            launch(a, b, _BIAS_RESIDUAL, bias, d_ptr, d_strides, False)
        else:
            launch(a, b, epilogue, bias, aux, aux_strides, accumulate or i > 0)


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
    # The bfloat16 products of an fp32 GEMM are dense copies with one layout; a broadcast batch
    # would need each copy expanded, so those stay in fp32.
    same_batch = len(b._shape) == 2 or a._shape[:-2] == b._shape[:-2]
    pairs = _products(a, b, _NONE, stream) if same_batch else ((a, b),)
    a, b = pairs[0]
    gemm = _gemm()
    in_code, out_code = _CODE[a._dtype], _CODE[out_dtype]
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

            def launch(pa, pb, epilogue, bias, aux, aux_strides, accumulate):
                gemm(_ptr(pa), (1, mm, k), (mm * k, fold if mm > 1 else k, 1), _ptr(pb), (1, k, n),
                     (k * n, b_sk, b_sn), _ptr(out), (1, mm, n), (mm * n, n, 1), in_code, out_code, epilogue, bias,
                     aux, aux_strides, accumulate, stream, _AUTO, 0, 0, dev.index)
            _sum_products(pairs if len(pairs) > 1 else ((a, b),), launch, _NONE, 0, 0, None, False, 0, None)
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
    if len(pairs) == 1:
        pairs = ((a, b),)
    isz_a, isz_b, isz_o = a._dtype.itemsize, b._dtype.itemsize, out_dtype.itemsize
    for start in range(0, nb, _GEMM_MAX_BATCH):
        cnt = min(_GEMM_MAX_BATCH, nb - start)

        def launch(pa, pb, epilogue, bias, aux, aux_strides, accumulate, start=start, cnt=cnt):
            gemm(_ptr(pa) + start * a_batch_stride * isz_a, (cnt, m, k), (a_batch_stride, a_sm, a_sk),
                 _ptr(pb) + start * b_batch_stride * isz_b, (cnt, k, n), (b_batch_stride, b_sk, b_sn),
                 _ptr(out) + start * m * n * isz_o, (cnt, m, n), (m * n, n, 1), in_code, out_code, epilogue, bias,
                 aux, aux_strides, accumulate, stream, _AUTO, 0, 0, dev.index)
        _sum_products(pairs, launch, _NONE, 0, 0, None, False, 0, None)
    return out


def _expand_view(t, shape):
    return make(t._storage, shape, _bstrides(t, shape), t._offset, t._dtype)


# --- the fused linear family (ops/linalg.py) ---------------------------------------

def _rows(t, stream):
    """(t or a dense copy, row stride) with t's leading dims flattened into rows and a unit stride
    along the last dim."""
    if t._shape[-1] > 1 and t._strides[-1] != 1:
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
    pairs = _products(x, weight, epilogue, stream)
    x, w = pairs[0]
    x, x_ld = _rows(x, stream)
    w, w_sk, w_sn = _weight_strides(w, stream)
    if len(pairs) == 1:
        pairs = ((x, w),)
    aux, aux_strides = 0, None
    if gelu:
        aux, aux_strides = _ptr(preact), (rows * out_f, out_f, 1)
    elif residual is not None:
        residual, r_ld = _rows(residual, stream)
        aux, aux_strides = _ptr(residual), (rows * r_ld, r_ld, 1)
    if bias is not None and bias._strides[0] != 1 and out_f > 1:
        bias = _contig(bias, stream)
    in_code, out_code, gemm = _CODE[x._dtype], _CODE[out_dtype], _gemm()

    def launch(px, pw, epilogue, bias_ptr, aux, aux_strides, accumulate):
        gemm(_ptr(px), (1, rows, in_f), (rows * x_ld, x_ld, 1), _ptr(pw), (1, in_f, out_f), (0, w_sk, w_sn),
             _ptr(out), (1, rows, out_f), (rows * out_f, out_f, 1), in_code, out_code, epilogue, bias_ptr, aux,
             aux_strides, accumulate, stream, _AUTO, 0, 0, dev.index)
    _sum_products(pairs, launch, epilogue, _ptr(bias) if bias is not None else 0, aux, aux_strides, False,
                  _ptr(out), (rows * out_f, out_f, 1))
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
    pairs = _products(g, weight, epilogue, stream)
    g, w = pairs[0]
    g, g_ld = _rows(g, stream)
    w, w_sk, w_sn = _weight_strides(w, stream)  # B = W: K runs along out_features, N along in_features
    if len(pairs) == 1:
        pairs = ((g, w),)
    aux, aux_strides = 0, None
    if preact is not None:
        preact, p_ld = _rows(preact, stream)
        aux, aux_strides = _ptr(preact), (rows * p_ld, p_ld, 1)
    in_code, out_code, gemm = _CODE[g._dtype], _CODE[out._dtype], _gemm()

    def launch(pg, pw, epilogue, bias, aux, aux_strides, accumulate):
        gemm(_ptr(pg), (1, rows, out_f), (rows * g_ld, g_ld, 1), _ptr(pw), (1, out_f, in_f), (0, w_sn, w_sk),
             _ptr(out), (1, rows, in_f), (rows * in_f, in_f, 1), in_code, out_code, epilogue, bias, aux,
             aux_strides, accumulate, stream, _AUTO, 0, 0, dev.index)
    _sum_products(pairs, launch, epilogue, 0, aux, aux_strides, False, 0, None)
    return out


@register("linear_weight_grad", CUDA)
def linear_weight_grad(g, x, out_dtype, into):
    """g^T x over all rows: (out_features, in_features) in out_dtype, no transposed copies; with
    `into`, accumulated into it by the GEMM (beta = 1)."""
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
    pairs = _products(g, x, _NONE, stream)
    g, x = pairs[0]
    g, g_ld = _rows(g, stream)
    x, x_ld = _rows(x, stream)
    if len(pairs) == 1:
        pairs = ((g, x),)
    in_code, out_code, gemm = _CODE[g._dtype], _CODE[out._dtype], _gemm()

    def launch(pg, px, epilogue, bias, aux, aux_strides, acc):
        gemm(_ptr(pg), (1, out_f, rows), (rows * g_ld, 1, g_ld), _ptr(px), (1, rows, in_f), (rows * x_ld, x_ld, 1),
             _ptr(out), (1, out_f, in_f), (out_f * in_f, out._strides[0], 1), in_code, out_code, epilogue, bias,
             aux, aux_strides, acc, stream, _AUTO, 0, 0, dev.index)
    _sum_products(pairs, launch, _NONE, 0, 0, None, accumulate, 0, None)
    if accumulate:
        out._storage.version += 1
    return out
