"""Neural-network ops: softmax family, losses, normalisation, embedding,
dropout (attention is ops/attention.py). Forwards go to kernels (fused on the GPU); backwards are
written in ops, so they run on every backend and differentiate again.
"""
import math

from .. import dtypes as dt
from ..dispatch import kernel
from ..tensor import Tensor, numel_of
from ..autograd import grad_mode
from ..autograd.engine import Node, attach
from ..autocast import gate as _AC, fp32 as _ac_fp32, wants_fp32 as _ac_wants_fp32
from . import pointwise as P
from . import reduction as R
from . import shape as S
from .linalg import matmul

_K_SOFTMAX = kernel("softmax").impl
# Where a backend has them (CUDA): softmax with the causal mask applied in the
# kernel (attention builds no mask tensor) and the fused softmax backward.
_K_SOFTMAX_CAUSAL = kernel("softmax_causal").impl
_K_SOFTMAX_BWD = kernel("softmax_backward").impl
_K_LAYER_NORM = kernel("layer_norm").impl
_K_RMS_NORM = kernel("rms_norm").impl
_K_DROPOUT_MASK = kernel("bernoulli_scaled").impl
# Fused norm backwards where a backend has them (CUDA); the composite in ops
# below serves the other backends and create_graph.
_K_LN_BWD = kernel("layer_norm_backward").impl
_K_RMS_BWD = kernel("rms_norm_backward").impl
_HALF = (dt.float16, dt.bfloat16)


def _f32(t):
    return t.to(dt.float32) if t is not None else None
_state = grad_mode.state


def _float_input(x, opname):
    if not isinstance(x, Tensor):
        raise TypeError(f"{opname}(): argument 'input' must be Tensor, not {type(x).__name__}")
    if not x._dtype.is_floating_point:
        raise RuntimeError(f"{opname}(): expected a floating point input, got {x._dtype}")


class SoftmaxBackward(Node):
    __slots__ = ("dim", "log")

    def backward(self, g):
        (y,) = self.saved_tensors
        fused = _K_SOFTMAX_BWD[y._storage.device.backend]
        if not _state.enabled and not getattr(fused, "missing", False):
            return (fused(y, g, self.dim, self.log),)
        # the composite: other backends, and create_graph (the kernel is not differentiable)
        if self.log:
            return (P.sub(g, P.mul(P.exp(y), R.sum(g, self.dim, keepdim=True))),)
        return (P.mul(y, P.sub(g, R.sum(P.mul(g, y), self.dim, keepdim=True))),)


def _softmax(x, dim, dtype, log, opname):
    if _AC.armed and dtype is None:
        (x,) = _ac_fp32(x)
    if dtype is not None:
        x = x.to(dtype)
    _float_input(x, opname)
    if dim is None:
        raise TypeError(f"{opname}() missing required argument 'dim'")
    d = x._wrap_dim(dim)
    if not x._shape:
        d = 0
        x1 = S.reshape(x, (1,))
        return S.reshape(_softmax(x1, 0, None, log, opname), ())
    out = _K_SOFTMAX[x._storage.device.backend](x, d, log)
    if _state.enabled and x._requires_grad:
        node = SoftmaxBackward()
        node.dim, node.log = d, log
        node.save_with_output(out)
        attach(out, node, (x,))
    return out


def softmax(input, dim=None, dtype=None):
    return _softmax(input, dim, dtype, False, "softmax")


def log_softmax(input, dim=None, dtype=None):
    return _softmax(input, dim, dtype, True, "log_softmax")


def _reduce_loss(loss, reduction, denom=None):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return R.sum(loss)
    if reduction == "mean":
        return P.div(R.sum(loss), denom) if denom is not None else R.mean(loss)
    raise ValueError(f"{reduction} is not a valid value for reduction; expected 'none', 'mean' or 'sum'")


def _class_dim_last(x):
    """(N, C, d1, ...) -> (N*d1*..., C); (C,) -> (1, C)."""
    if len(x._shape) == 1:
        return S.reshape(x, (1, x._shape[0]))
    if len(x._shape) == 2:
        return x
    return S.reshape(S.movedim(x, 1, -1), (-1, x._shape[1]))


def nll_loss(input, target, weight=None, ignore_index=-100, reduction="mean"):
    if _AC.armed:
        input, target, weight = _ac_fp32(input, target, weight)
    return _nll(input, target, weight, ignore_index, reduction, 0.0, logp_given=True)


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    _float_input(input, "cross_entropy")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    # Under autocast the loss is float32 (an fp32-list op). The fused kernel
    # reads 16-bit logits and accumulates in float32 itself, so only the
    # composite path pays for an upcast copy of the logits.
    autocast_fp32 = bool(_AC.armed) and _ac_wants_fp32(input)
    return _nll(input, target, weight, ignore_index, reduction, label_smoothing, False, autocast_fp32)


def _nll(input, target, weight, ignore_index, reduction, eps, logp_given, autocast_fp32=False):
    opname = "nll_loss" if logp_given else "cross_entropy"
    if not isinstance(target, Tensor):
        raise TypeError(f"{opname}(): argument 'target' must be Tensor, not {type(target).__name__}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction; expected 'none', 'mean' or 'sum'")
    if not input._shape:
        raise RuntimeError(f"{opname}: input must have at least 1 dimension (classes), got a 0-d tensor")
    n_classes = input._shape[0] if len(input._shape) == 1 else input._shape[1]
    if weight is not None and weight._shape != (n_classes,):
        raise RuntimeError(f"{opname}: weight tensor should be defined either for all {n_classes} classes or no "
                           f"classes but got weight tensor of shape: {list(weight._shape)}")
    if target._dtype.is_floating_point:
        if target._shape != input._shape:
            raise RuntimeError(f"{opname}: probability targets must have the input's shape {list(input._shape)}, "
                               f"got {list(target._shape)}")
        if autocast_fp32:
            input, target, weight = _ac_fp32(input, target, weight)
        logits = _class_dim_last(input)
        logp = logits if logp_given else log_softmax(logits, 1)
        probs = _class_dim_last(target)
        if eps:
            probs = P.add(P.mul(probs, 1.0 - eps), eps / n_classes)
        wl = P.mul(logp, weight) if weight is not None else logp
        loss = P.neg(R.sum(P.mul(wl, probs), 1))
        out_shape = _per_item_shape(input)
        loss = S.reshape(loss, out_shape)
        if reduction == "mean":
            return P.div(R.sum(loss), numel_of(out_shape) if out_shape else 1)
        return _reduce_loss(loss, reduction)
    if target._dtype.category != dt.INT:
        raise RuntimeError(f"{opname}: expected target of integer dtype (class indices) or floating point dtype "
                           f"(probabilities), got {target._dtype}")
    expected = _per_item_shape(input)
    if target._shape != expected:
        raise RuntimeError(f"{opname}: expected target of shape {list(expected)} for input of shape "
                           f"{list(input._shape)}, got {list(target._shape)}")
    if (not logp_given and weight is None and n_classes and input._dtype in _CE_FUSED_DTYPES
            and not getattr(_K_CE_ROWS[input._storage.device.backend], "missing", False)):
        return _fused_cross_entropy(input, target, n_classes, ignore_index, reduction, eps,
                                    dt.float32 if autocast_fp32 else input._dtype)
    if autocast_fp32:
        input, weight = _ac_fp32(input, weight)
    logits = _class_dim_last(input)
    logp = logits if logp_given else log_softmax(logits, 1)
    t = S.reshape(target, (-1,))
    valid = P.ne(t, ignore_index)
    _check_targets(t, ignore_index, n_classes, opname)
    safe_t = P.where(valid, t, 0)
    picked = S.reshape(_gather_rows(logp, safe_t), (-1,))
    validf = valid.to(logp._dtype)
    if weight is not None:
        w_t = P.mul(_index_rows(weight, safe_t), validf)
    else:
        w_t = validf
    loss = P.neg(P.mul(picked, w_t))
    if eps:
        wl = P.mul(logp, weight) if weight is not None else logp
        smooth = P.mul(P.neg(R.sum(wl, 1)), validf)
        loss = P.add(P.mul(loss, 1.0 - eps), P.mul(smooth, eps / n_classes))
    loss = S.reshape(loss, expected)
    if reduction == "mean":
        return P.div(R.sum(loss), R.sum(w_t))
    return _reduce_loss(loss, reduction)


def _check_targets(t, ignore_index, n_classes, opname):
    tv = t._host_array()
    bad = tv[(tv != ignore_index) & ((tv < 0) | (tv >= n_classes))]
    if bad.size:
        raise IndexError(f"{opname}: Target {int(bad[0])} is out of bounds for {n_classes} classes.")


# Fused cross-entropy where a backend has the row kernels (CUDA): one forward
# launch writes each row's loss and logsumexp, one backward launch writes the
# logits' gradient; no (rows, classes) log-probability tensor is stored.
_K_CE_ROWS = kernel("cross_entropy_rows").impl
_K_CE_ROWS_BWD = kernel("cross_entropy_rows_backward").impl
_CE_FUSED_DTYPES = (dt.float32, dt.bfloat16, dt.float16)


class CrossEntropyBackward(Node):
    __slots__ = ("ignore_index", "eps", "reduction", "count")

    def backward(self, g):
        x, t, lse = self.saved_tensors
        x2 = _class_dim_last(x)
        rows = x2._shape[0]
        if g._dtype in _HALF:  # the row weights go to the kernel in float32 (1/count would round in 16 bits)
            g = g.to(dt.float32)
        if self.reduction == "none":
            g_rows = S.reshape(g, (rows,))
        else:
            if self.reduction == "mean":
                g = P.div(g, self.count)
            g_rows = S.expand(S.reshape(g, (1,)), (rows,))
        if not _state.enabled:
            dx2 = _K_CE_ROWS_BWD[x._storage.device.backend](x2, t, lse, g_rows, self.ignore_index, self.eps)
        else:  # create_graph: the kernel is not differentiable; the same formula in ops is
            dx2 = _cross_entropy_rows_grad(x2, t, g_rows, self.ignore_index, self.eps)
        return (_rows_to_input_shape(dx2, x._shape),)


def _cross_entropy_rows_grad(x2, t, g_rows, ignore_index, eps):
    """g_rows[i] * (softmax(x2[i]) - (1 - eps) onehot(t[i]) - eps / classes), 0 on ignored rows."""
    from .creation import arange
    n_classes = x2._shape[1]
    xf = x2.to(dt.float32) if x2._dtype in _HALF else x2
    hit = P.eq(S.unsqueeze(t, 1), S.unsqueeze(arange(n_classes, device=x2._storage.device), 0))
    d = P.sub(P.sub(softmax(xf, 1), P.mul(hit.to(xf._dtype), 1.0 - eps)), eps / n_classes)
    w = P.mul(g_rows.to(xf._dtype), P.ne(t, ignore_index).to(xf._dtype))
    return P.mul(d, S.unsqueeze(w, 1)).to(x2._dtype)


def _rows_to_input_shape(d2, shape):
    """Inverse of _class_dim_last: (rows, C) back to (C,), (N, C) or (N, C, d1, ...)."""
    if len(shape) == 1:
        return S.reshape(d2, shape)
    if len(shape) == 2:
        return d2
    return S.movedim(S.reshape(d2, (shape[0],) + shape[2:] + (shape[1],)), -1, 1)


def _fused_cross_entropy(input, target, n_classes, ignore_index, reduction, eps, out_dtype):
    if target._storage.device is not input._storage.device:
        raise RuntimeError(f"cross_entropy: Expected all tensors to be on the same device, but found at least two "
                           f"devices, {input.device} and {target.device}!")
    t = S.reshape(target, (-1,))
    if t._storage.device.type == "cpu":
        _check_targets(t, ignore_index, n_classes, "cross_entropy")
    # On a device the targets are not read back (that would be a host sync per
    # step, and illegal under graph capture): an out-of-range target makes
    # the kernel write NaN for its row, so the loss is NaN.
    x2 = _class_dim_last(input.detach())
    loss_rows, lse = _K_CE_ROWS[input._storage.device.backend](x2, t, ignore_index, eps)
    count = None
    if reduction == "none":
        out = S.reshape(loss_rows, _per_item_shape(input))
    elif reduction == "sum":
        out = R.sum(loss_rows)
    else:  # torch's mean: over the targets that are not ignored (NaN when all are)
        count = R.sum(P.ne(t, ignore_index))
        out = P.div(R.sum(loss_rows), count)
    if out._dtype is not out_dtype:
        out = out.to(out_dtype)
    if _state.enabled and input._requires_grad:
        node = CrossEntropyBackward()
        node.ignore_index, node.eps, node.reduction, node.count = ignore_index, eps, reduction, count
        node.save(input, t, lse)
        attach(out, node, (input,))
    return out


def _per_item_shape(input):
    if len(input._shape) == 1:
        return ()
    return (input._shape[0],) + input._shape[2:]


def _gather_rows(logp, t):
    from .indexing import gather
    return gather(logp, 1, S.unsqueeze(t, 1))


def _index_rows(weight, t):
    from .indexing import index_select
    return index_select(weight, 0, t)


def mse_loss(input, target, reduction="mean"):
    if _AC.armed:
        input, target = _ac_fp32(input, target)
    if input._shape != target._shape:
        from .broadcast import broadcast_shapes
        broadcast_shapes(input._shape, target._shape)
    d = P.sub(input, target)
    return _reduce_loss(P.mul(d, d), reduction)


def _norm_shape(x, normalized_shape, opname):
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(normalized_shape)
    nd = len(normalized_shape)
    if nd == 0 or x._shape[len(x._shape) - nd:] != normalized_shape or len(x._shape) < nd:
        raise RuntimeError(f"{opname}: Given normalized_shape={list(normalized_shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, normalized_shape))}], but got input of size {list(x._shape)}")
    return normalized_shape, nd


def _param_check(p, shape, what, opname):
    if p is not None and p._shape != shape:
        raise RuntimeError(f"{opname}: {what} of shape {list(p._shape)} does not match normalized_shape {list(shape)}")


class LayerNormBackward(Node):
    __slots__ = ("nd", "has_w", "has_b", "eps", "dtypes")

    def backward(self, g):
        x, w, mean, rstd = self.saved_tensors
        fused = _K_LN_BWD[x._storage.device.backend]
        if not _state.enabled and not getattr(fused, "missing", False):
            dx, dw, db = fused(g, x, self.nd, w, mean, rstd, self.has_w, self.has_b)
            return (dx,) + ((dw,) if self.has_w else ()) + ((db,) if self.has_b else ())
        half = x._dtype in _HALF
        if half:  # the composite cancels badly in 16-bit: compute it in float32
            g, x, w = _f32(g), _f32(x), _f32(w)
        axes = tuple(range(len(x._shape) - self.nd, len(x._shape)))
        batch_axes = tuple(range(len(x._shape) - self.nd))
        if _state.enabled:
            # create_graph: the statistics depend on x too, so recompute them
            # in differentiable ops instead of using the saved constants.
            mean = R.mean(x, axes, keepdim=True)
            centered = P.sub(x, mean)
            rstd = P.rsqrt(P.add(R.mean(P.mul(centered, centered), axes, keepdim=True), self.eps))
        xhat = P.mul(P.sub(x, mean.to(x._dtype)), rstd.to(x._dtype))
        gw = P.mul(g, w) if w is not None else g
        dx = P.mul(rstd.to(x._dtype), P.sub(P.sub(gw, R.mean(gw, axes, keepdim=True)),
                                            P.mul(xhat, R.mean(P.mul(gw, xhat), axes, keepdim=True))))
        out = [dx]
        if self.has_w:
            out.append(R.sum(P.mul(g, xhat), batch_axes) if batch_axes else P.mul(g, xhat))
        if self.has_b:
            out.append(R.sum(g, batch_axes) if batch_axes else g)
        return tuple(out) if not half else tuple(t.to(d) for t, d in zip(out, self.dtypes))


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    if _AC.armed:
        input, weight, bias = _ac_fp32(input, weight, bias)
    x = input
    if not isinstance(x, Tensor) or not x._dtype.is_floating_point:
        _float_input(x, "layer_norm")
    # The checks' common case inline (a tuple that matches x, parameters of that shape);
    # anything else goes through the helpers, which normalise or raise.
    nd = len(normalized_shape) if normalized_shape.__class__ is tuple else 0
    if nd and x._shape[len(x._shape) - nd:] == normalized_shape and len(x._shape) >= nd:
        shape = normalized_shape
    else:
        shape, nd = _norm_shape(x, normalized_shape, "layer_norm")
    if weight is not None and weight._shape != shape:
        _param_check(weight, shape, "weight", "layer_norm")
    if bias is not None and bias._shape != shape:
        _param_check(bias, shape, "bias", "layer_norm")
    y, mean, rstd = _K_LAYER_NORM[x._storage.device.backend](x, nd, weight, bias, eps)
    if _state.enabled and (x._requires_grad or (weight is not None and weight._requires_grad) or
                           (bias is not None and bias._requires_grad)):
        ins = [x] + [p for p in (weight, bias) if p is not None]
        node = LayerNormBackward()
        node.nd, node.has_w, node.has_b, node.eps = nd, weight is not None, bias is not None, eps
        node.dtypes = (x._dtype,) + ((weight._dtype,) if weight is not None else ()) + \
            ((bias._dtype,) if bias is not None else ())
        node.save(x, weight, mean, rstd)
        attach(y, node, ins)
    return y


# torch.finfo(dtype).eps: rms_norm's default epsilon
_FINFO_EPS = {dt.float16: 2.0 ** -10, dt.bfloat16: 2.0 ** -7, dt.float32: 2.0 ** -23, dt.float64: 2.0 ** -52}


class RMSNormBackward(Node):
    __slots__ = ("nd", "has_w", "eps", "dtypes")

    def backward(self, g):
        x, w, rstd = self.saved_tensors
        fused = _K_RMS_BWD[x._storage.device.backend]
        if not _state.enabled and not getattr(fused, "missing", False):
            dx, dw = fused(g, x, self.nd, w, rstd, self.has_w)
            return (dx,) + ((dw,) if self.has_w else ())
        half = x._dtype in _HALF
        if half:  # the composite cancels badly in 16-bit: compute it in float32
            g, x, w = _f32(g), _f32(x), _f32(w)
        axes = tuple(range(len(x._shape) - self.nd, len(x._shape)))
        batch_axes = tuple(range(len(x._shape) - self.nd))
        if _state.enabled:  # create_graph: rstd depends on x (see LayerNormBackward)
            rstd = P.rsqrt(P.add(R.mean(P.mul(x, x), axes, keepdim=True), self.eps))
        r = rstd.to(x._dtype)
        xhat = P.mul(x, r)
        gw = P.mul(g, w) if w is not None else g
        dx = P.mul(r, P.sub(gw, P.mul(xhat, R.mean(P.mul(gw, xhat), axes, keepdim=True))))
        out = [dx]
        if self.has_w:
            out.append(R.sum(P.mul(g, xhat), batch_axes) if batch_axes else P.mul(g, xhat))
        return tuple(out) if not half else tuple(t.to(d) for t, d in zip(out, self.dtypes))


def rms_norm(input, normalized_shape, weight=None, eps=None):
    x = input
    _float_input(x, "rms_norm")
    shape, nd = _norm_shape(x, normalized_shape, "rms_norm")
    _param_check(weight, shape, "weight", "rms_norm")
    if eps is None:
        eps = _FINFO_EPS[x._dtype]
    y, rstd = _K_RMS_NORM[x._storage.device.backend](x, nd, weight, eps)
    ins = [x] + ([weight] if weight is not None else [])
    if _state.enabled and any(t._requires_grad for t in ins):
        node = RMSNormBackward()
        node.nd, node.has_w, node.eps = nd, weight is not None, eps
        node.dtypes = tuple(t._dtype for t in ins)
        node.save(x, weight, rstd)
        attach(y, node, ins)
    return y


def embedding(input, weight, padding_idx=None):
    from .indexing import index_select
    if not isinstance(input, Tensor) or input._dtype.category != dt.INT or input._dtype is dt.bool_:
        raise RuntimeError(f"embedding(): Expected tensor for argument #1 'indices' to have one of the following "
                           f"scalar types: Long, Int; but got {getattr(input, '_dtype', type(input).__name__)} instead")
    if len(weight._shape) != 2:
        raise RuntimeError(f"embedding(): 'weight' must be 2-D, got shape {list(weight._shape)}")
    flat = S.reshape(input, (-1,))
    out = index_select(weight, 0, flat)
    if padding_idx is not None:
        n = weight._shape[0]
        if padding_idx < 0:
            padding_idx += n
        if not 0 <= padding_idx < n:
            raise ValueError(f"embedding(): padding_idx must be within num_embeddings ({n})")
        keep = S.unsqueeze(P.ne(flat, padding_idx), 1)
        out = P.where(keep, out, S.unsqueeze(weight.detach()[padding_idx], 0))
    return S.reshape(out, input._shape + (weight._shape[1],))


def dropout(input, p=0.5, training=True, generator=None):
    x = input
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return P.mul(x, 0.0)
    from .fused_dropout import fused_dropout, takes_fused_dropout
    if takes_fused_dropout(x):
        return fused_dropout(x, p, generator)  # mask made and applied in one kernel each way
    dev = x._storage.device
    mask = _K_DROPOUT_MASK[dev.backend](x._shape, 1.0 - p, x._dtype, dev, generator)
    return P.mul(x, mask)


def _softmax_causal(scores):
    """softmax over the last dim with the top-left aligned causal mask of (L, Sk) applied in the kernel;
    its gradient is softmax's (the masked probabilities are exactly 0, so they pass no gradient)."""
    out = _K_SOFTMAX_CAUSAL[scores._storage.device.backend](scores)
    if _state.enabled and scores._requires_grad:
        node = SoftmaxBackward()
        node.dim, node.log = len(scores._shape) - 1, False
        node.save_with_output(out)
        attach(out, node, (scores,))
    return out


def _tril(m):
    from .creation import arange
    L, Sk = m._shape
    rows = S.unsqueeze(arange(L, device=m._storage.device), 1)
    cols = S.unsqueeze(arange(Sk, device=m._storage.device), 0)
    return P.logical_and(m, P.le(cols, rows))


def tril(x, diagonal=0):
    from .creation import arange
    rows = S.unsqueeze(arange(x._shape[-2], device=x._storage.device), 1)
    cols = S.unsqueeze(arange(x._shape[-1], device=x._storage.device), 0)
    return P.where(P.le(P.sub(cols, rows), diagonal), x, P.mul(x, 0) if x._dtype is not dt.bool_ else False)


def triu(x, diagonal=0):
    from .creation import arange
    rows = S.unsqueeze(arange(x._shape[-2], device=x._storage.device), 1)
    cols = S.unsqueeze(arange(x._shape[-1], device=x._storage.device), 0)
    return P.where(P.ge(P.sub(cols, rows), diagonal), x, P.mul(x, 0) if x._dtype is not dt.bool_ else False)
