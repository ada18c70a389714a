"""LayerNorm and RMSNorm forward and backward, plain and with the residual add fused
in (ops/fused_norms.py): the CuTeDSL kernels (kernels/cute/norms.py) where a
specialization takes the call (last-dimension norms of a specialized row length,
float32 weight and bias), else the CUDA C++ kernels (kernels/cuda/norms.cu).
Either way the weight and bias gradients reduce in two fixed-order stages, no atomics.
The CuTeDSL backward also sums dx over its rows in the same two stages: when x is a
Linear's output, that is the Linear's bias gradient (ops/fused_norms.py).
"""
from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import register
from ...tensor import _STRIDES, contiguous_strides, make, numel_of
from . import launch as _launch
from .launch import _cast_new, _contig, _empty, _lib, _ptr, _stream, _stream_tls
from .dropout import _apply as _apply_dropout
from .random import _philox
from .reduction import _split_workspace_bytes


def _param_ptr(p, stream):
    if p is None:
        return 0, 0, None
    p = _contig(p, stream)
    return _ptr(p), p._dtype.index, p  # the tensor is returned to keep a contiguous copy alive


def _norm(x, nd, weight, bias, eps, rms):
    """The CUDA C++ norm kernel (callers try the CuTeDSL one first where nd == 1)."""
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape
    n = numel_of(shape[len(shape) - nd:])
    rows = numel_of(shape[:len(shape) - nd])
    stat = dt.float64 if x._dtype is dt.float64 else dt.float32
    stat_shape = shape[:len(shape) - nd] + (1,) * nd
    y = _empty(shape, x._dtype, dev, stream)
    if rms:
        mean, rstd = None, _empty(stat_shape, stat, dev, stream)
    else:  # one allocation for both statistics: mean in its first `rows` elements, rstd after them
        stats = _empty((2 * rows,), stat, dev, stream)
        strides = contiguous_strides(stat_shape)
        mean = make(stats._storage, stat_shape, strides, 0, stat)
        rstd = make(stats._storage, stat_shape, strides, rows, stat)
    wp, wd, _w = _param_ptr(weight, stream)
    bp, bd, _b = _param_ptr(bias, stream)
    _lib().norm(_ptr(x), _ptr(y), x._dtype.index, rows, n, wp, wd, bp, bd, 0 if rms else _ptr(mean), _ptr(rstd),
                stat.index, float(eps), rms, stream)
    return y, mean, rstd


def _dense_rows(x):
    """x, or a contiguous copy of a strided x (the CuTeDSL kernels read dense rows)."""
    return x if x._strides is _STRIDES.get(x._shape) else _contig(x, _stream(x._storage.device.index))


@register("layer_norm", CUDA)
def layer_norm(x, nd, weight, bias, eps):
    if nd == 1:  # the common case straight to the CuTeDSL kernel
        done = _cute_forward(x if x._strides is _STRIDES.get(x._shape) else _dense_rows(x),
                             None, weight, bias, eps, False, x._dtype)
        if done is not None:
            return done[0], done[2], done[3]
    return _norm(x, nd, weight, bias, eps, False)


@register("rms_norm", CUDA)
def rms_norm(x, nd, weight, eps):
    if nd == 1:
        done = _cute_forward(_dense_rows(x), None, weight, None, eps, True, x._dtype)
        if done is not None:
            return done[0], done[3]
    y, _, rstd = _norm(x, nd, weight, None, eps, True)
    return y, rstd


def _norm_backward(dy, x, weight, mean, rstd, nd, want_dweight, want_dbias, rms, cute=True):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    if cute and nd == 1 and want_dweight:
        done = _cute_backward(_contig(dy, stream), None, x, weight, mean, rstd, rms, x._dtype, None, want_dbias)
        if done is not None:
            return done[0], done[2], done[3]
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


# ---- fused residual add + norm (ops.add_layer_norm / add_rms_norm) -------------------------------
# The CuTeDSL kernels (kernels/cute/norms.py) take contiguous rows whose length
# has a specialization, float32 weight/bias and the dtype combinations listed
# there; _C.cute_norm* return "" when they cannot take a call, and these
# functions then compose the CUDA C++ kernels (an add, the norm, a cast).
_CUTE_DTYPE = {dt.bfloat16: 1, dt.float32: 2}  # kNormBF16, kNormF32 of kernels/cuda/norm_cute_args.h
_CTAS_PER_SM = 2
_NUM_SMS = 132  # H100 SXM / H200; more CTAs than rows blocks only add zero partials
_CUTE_THREADS = 128


class _ForwardPlan:
    """What a CuTeDSL norm forward of one (shape, dtypes, kind) needs besides its tensors."""
    __slots__ = ("rows", "n", "strides", "s_dtype", "stat_shape", "stat_strides", "codes")


_FWD_PLANS = {}  # (shape, x dtype, residual dtype or None, out dtype, rms) -> _ForwardPlan, or False: no kernel


def _forward_plan(key):
    shape, x_dtype, res_dtype, out_dtype, rms = key
    rows = numel_of(shape[:-1])
    if not rows or out_dtype not in _CUTE_DTYPE or x_dtype not in _CUTE_DTYPE or \
            (res_dtype is not None and res_dtype not in _CUTE_DTYPE):
        plan = False
    else:
        plan = _ForwardPlan()
        plan.rows, plan.n, plan.strides = rows, shape[-1], contiguous_strides(shape)
        plan.s_dtype = dt.promote_types(x_dtype, res_dtype) if res_dtype is not None else x_dtype
        plan.stat_shape = shape[:-1] + (1,)
        plan.stat_strides = contiguous_strides(plan.stat_shape)
        plan.codes = (_CUTE_DTYPE[x_dtype], _CUTE_DTYPE[res_dtype] if res_dtype is not None else 0,
                      _CUTE_DTYPE[out_dtype])
    if len(_FWD_PLANS) < 1024:
        _FWD_PLANS[key] = plan
    return plan


_F32 = dt.float32


def _param_ready(p):
    """A float32 parameter the CuTeDSL kernels read as a dense row (its shape was checked by the op)."""
    return p._dtype is dt.float32 and (p._strides == (1,) or p.is_contiguous())


def _cute_forward(x, residual, weight, bias, eps, rms, out_dtype, drop=()):
    """(y, new residual, mean or None, rstd) from the CuTeDSL kernel, or None when it cannot take the call.

    drop: () or (keep, seed, seed_ptr, offset, offset_ptr), the residual dropout of x (see add_dropout_norm).

    Everything that depends only on the shape and dtypes comes from a plan kept per
    key; mean and rstd share one allocation (mean first, rstd `rows` elements on)."""
    shape = x._shape
    key = (shape, x._dtype, residual._dtype if residual is not None else None, out_dtype, rms)
    plan = _FWD_PLANS.get(key)
    if plan is None:
        plan = _forward_plan(key)
    # _param_ready's common case (a float32 row of stride 1) is tested inline.
    if not plan or weight is None or \
            not (weight._strides == (1,) and weight._dtype is _F32 or _param_ready(weight)) or \
            (not rms and (bias is None or
                          not (bias._strides == (1,) and bias._dtype is _F32 or _param_ready(bias)))) or \
            (x._strides is not plan.strides and not x.is_contiguous()) or \
            (residual is not None and residual._strides != plan.strides and not residual.is_contiguous()):
        return None
    dev = x._storage.device
    cur = _stream_tls.current  # _stream(dev.index), inlined
    cur = cur.get(dev.index) if cur is not None else None
    stream = cur.handle if cur is not None else 0
    rows = plan.rows
    y = _empty(shape, out_dtype, dev, stream)
    s = _empty(shape, plan.s_dtype, dev, stream) if residual is not None else x
    if rms:
        mean, rstd = None, _empty(plan.stat_shape, dt.float32, dev, stream)
        mean_p, rstd_p = 0, rstd._storage.data.ptr
    else:
        stats = _empty((2 * rows,), dt.float32, dev, stream)._storage
        mean = make(stats, plan.stat_shape, plan.stat_strides, 0, dt.float32)
        rstd = make(stats, plan.stat_shape, plan.stat_strides, rows, dt.float32)
        mean_p = stats.data.ptr
        rstd_p = mean_p + 4 * rows
    cx, cr, cy = plan.codes
    # _lib() and the _ptr of x, weight and bias inline: this runs once per norm of a step.
    ran = (_launch._native or _lib()).cute_norm(
        x._storage.data.ptr + x._offset * x._dtype.itemsize, _ptr(residual) if residual is not None else 0,
        s._storage.data.ptr if residual is not None else 0, y._storage.data.ptr,
        weight._storage.data.ptr + weight._offset * 4, 0 if rms else bias._storage.data.ptr + bias._offset * 4,
        mean_p, rstd_p, rows, plan.n, cx, cr, cy, rms, float(eps), stream, *drop)
    return (y, s, mean, rstd) if ran else None


class _BackwardPlan:
    """What a CuTeDSL norm backward of one (shape, dtypes, kind) needs besides its tensors."""
    __slots__ = ("rows", "n", "strides", "two", "ctas", "pb_offset", "pc_offset", "codes")


_BWD_PLANS = {}  # (shape, s dtype, dy dtype, dres dtype or None, x dtype, residual dtype, rms) -> plan or False


def _backward_plan(key):
    shape, s_dtype, dy_dtype, dres_dtype, x_dtype, res_dtype, rms = key
    rows = numel_of(shape[:-1])
    two = res_dtype is not None and x_dtype is not res_dtype  # ds is written in both dtypes
    if not rows or s_dtype not in _CUTE_DTYPE or dy_dtype not in _CUTE_DTYPE or \
            (dres_dtype is not None and dres_dtype is not s_dtype) or (two and x_dtype not in _CUTE_DTYPE):
        plan = False
    else:
        plan = _BackwardPlan()
        n = shape[-1]
        plan.rows, plan.n, plan.strides, plan.two = rows, n, contiguous_strides(shape), two
        slots = _CUTE_THREADS // _threads_per_row(n, s_dtype, dy_dtype, x_dtype if two else None)
        plan.ctas = max(1, min(_CTAS_PER_SM * _NUM_SMS, -(-rows // slots)))
        block = -(-plan.ctas * n // 4) * 4  # one set of partials, rounded up to 16 bytes
        plan.pb_offset = block  # dbias' partials follow dweight's (LayerNorm)
        plan.pc_offset = block if rms else 2 * block  # then dx's column-sum partials
        plan.codes = (_CUTE_DTYPE[s_dtype], _CUTE_DTYPE[dy_dtype], _CUTE_DTYPE[x_dtype] if two else 0)
    if len(_BWD_PLANS) < 1024:
        _BWD_PLANS[key] = plan
    return plan


def _dense(t, strides):
    return t._strides is strides or t.is_contiguous()


def _cute_backward(dy, dres, s, weight, mean, rstd, rms, x_dtype, res_dtype, want_dbias, drop=()):
    """(dx, dresidual or None, dweight, dbias or None, dx_sum) from the CuTeDSL kernels, or None when
    they cannot take the call.  dx_sum: dx summed over its rows, float32 (n,).  dbias partials are
    computed for LayerNorm whether or not a bias exists; the dweight, dbias and dx partials share
    one allocation.  drop: as _cute_forward's; only the kernels writing ds again in x's dtype apply it."""
    shape = s._shape
    key = (shape, s._dtype, dy._dtype, dres._dtype if dres is not None else None, x_dtype, res_dtype, rms)
    plan = _BWD_PLANS.get(key)
    if plan is None:
        plan = _backward_plan(key)
    strides = plan.strides if plan else None
    if not plan or (drop and not plan.two) or weight is None or not _param_ready(weight) or not _dense(s, strides) or \
            not _dense(dy, strides) or (dres is not None and not _dense(dres, strides)) or \
            (mean is not None and not mean.is_contiguous()) or not rstd.is_contiguous():
        return None
    dev = s._storage.device
    stream = _stream(dev.index)
    n, ctas, two = plan.n, plan.ctas, plan.two
    ds = _empty(shape, s._dtype, dev, stream)
    dx2 = _empty(shape, x_dtype, dev, stream) if two else None
    partials = _empty((plan.pc_offset + ctas * n,), dt.float32, dev, stream)
    pw = partials._storage.data.ptr
    pb = 0 if rms else pw + 4 * plan.pb_offset
    pc = pw + 4 * plan.pc_offset
    cs, cdy, cx2 = plan.codes
    ran = _lib().cute_norm_backward(_ptr(s), _ptr(dy), _ptr(dres) if dres is not None else 0, ds._storage.data.ptr,
                                    dx2._storage.data.ptr if two else 0, _ptr(weight), 0 if rms else _ptr(mean),
                                    _ptr(rstd), pw, pb, pc, ctas, plan.rows, n, cs, cdy, cx2, rms, stream, *drop)
    if not ran:
        return None
    dweight = _empty((n,), dt.float32, dev, stream)
    dbias = None if rms else _empty((n,), dt.float32, dev, stream)
    dx_sum = _empty((n,), dt.float32, dev, stream)
    _lib().cute_norm_finish(pw, pb, pc, dweight._storage.data.ptr, 0 if rms else dbias._storage.data.ptr,
                            dx_sum._storage.data.ptr, ctas, n, rms, stream)
    return (dx2 if two else ds), (None if res_dtype is None else ds), dweight, (dbias if want_dbias else None), dx_sum


@register("add_norm", CUDA)
def add_norm(x, residual, weight, bias, eps, rms, out_dtype):
    """(normed, new residual, mean or None, rstd) over the last dimension; see ops/fused_norms.py."""
    done = _cute_forward(x, residual, weight, bias, eps, rms, out_dtype)
    if done is not None:
        return done
    from ...ops import codes as C
    from .pointwise import binary
    s_dtype = dt.promote_types(x._dtype, residual._dtype) if residual is not None else x._dtype
    s = binary(C.ADD, x, residual, _work_dtype(s_dtype), s_dtype) if residual is not None else x
    y, mean, rstd = _norm(s, 1, weight, bias, eps, rms)
    return (y if y._dtype is out_dtype else _cast_new(y, out_dtype, _stream(x._storage.device.index))), s, mean, rstd


@register("add_norm_backward", CUDA)
def add_norm_backward(dy, dres, s, weight, mean, rstd, rms, x_dtype, res_dtype, want_dweight, want_dbias):
    """(dx, dresidual, dweight, dbias, dx_sum) of add_norm; dres (the new residual's gradient) may be None.

    dresidual is None without a residual; dweight/dbias None when not wanted; dx_sum is dx summed
    over every dim but the last (float32) where the CuTeDSL kernels ran, else None."""
    if want_dweight:
        done = _cute_backward(dy, dres, s, weight, mean, rstd, rms, x_dtype, res_dtype, want_dbias)
        if done is not None:
            return done
    stream = _stream(s._storage.device.index)
    ds, dweight, dbias = _norm_backward(dy, s, weight, mean, rstd, 1, want_dweight and weight is not None,
                                        want_dbias and not rms, rms)
    if dres is not None:
        from ...ops import codes as C
        from .pointwise import binary
        ds = binary(C.ADD, ds, dres, _work_dtype(ds._dtype), ds._dtype)
    dx = ds if ds._dtype is x_dtype else _cast_new(ds, x_dtype, stream)
    dresidual = None if res_dtype is None else (ds if ds._dtype is res_dtype else _cast_new(ds, res_dtype, stream))
    return dx, dresidual, dweight, dbias, None


# ---- fused residual dropout + add + norm (ops.add_layer_norm / add_rms_norm with dropout_p) --------
# The CuTeDSL kernels apply the dropout in the add (forward) and to x's gradient (backward) with
# the standalone dropout kernel's mask (kernels/cute/norms.py); where they cannot take a call, that
# kernel runs on its own with the same Philox state and the plain add+norm follows (or precedes).


@register("add_dropout_norm", CUDA)
def add_dropout_norm(x, residual, weight, bias, eps, rms, out_dtype, keep, generator):
    """add_norm of (dropout(x), residual) with keep probability keep < 1, and the rng_state
    (seed, seed_ptr, offset, offset_ptr) the mask came from: numel(x) Philox values reserved
    from the generator, as "dropout_fused" reserves for x."""
    dev = x._storage.device
    args = _philox(generator, dev, max(numel_of(x._shape), 1))
    rng_state = (args.seed, args.seed_ptr, args.offset, args.offset_ptr)
    done = _cute_forward(x, residual, weight, bias, eps, rms, out_dtype, (float(keep),) + rng_state)
    if done is None:
        done = add_norm(_apply_dropout(x, keep, rng_state), residual, weight, bias, eps, rms, out_dtype)
    return done + (rng_state,)


@register("add_dropout_norm_backward", CUDA)
def add_dropout_norm_backward(dy, dres, s, weight, mean, rstd, rms, x_dtype, res_dtype, want_dweight, want_dbias,
                              keep, rng_state):
    """add_norm_backward's (dx, dresidual, dweight, dbias, dx_sum) with dx (and dx_sum) through the
    forward's dropout: dx * mask / keep, the mask regenerated from the forward's rng_state."""
    if want_dweight:
        done = _cute_backward(dy, dres, s, weight, mean, rstd, rms, x_dtype, res_dtype, want_dbias,
                              (float(keep),) + tuple(rng_state))
        if done is not None:
            return done
    dx, dresidual, dweight, dbias, _ = add_norm_backward(dy, dres, s, weight, mean, rstd, rms, x_dtype, res_dtype,
                                                         want_dweight, want_dbias)
    return _apply_dropout(dx, keep, rng_state), dresidual, dweight, dbias, None


def _work_dtype(dtype):
    return dt.float64 if dtype is dt.float64 else dt.float32


def _threads_per_row(n, *dtypes):
    """Threads sharing a row in the CuTeDSL norms (row_tiling in kernels/cute/norms.py)."""
    vec = 8 if any(d is not None and d.itemsize == 2 for d in dtypes) else 4
    chunks, tpr = n // vec, 32
    while tpr > 1 and chunks % tpr:
        tpr //= 2
    return tpr
