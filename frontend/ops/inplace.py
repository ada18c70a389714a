"""In-place ops: every one computes its result out of place, writes it into
the destination's memory, bumps the storage's version counter, and moves the
destination's autograd history onto the result.

Writing into a view of a tensor that takes part in autograd rewrites the
history of the view's base with a CopySlices node (PyTorch's design): the
base's gradient passes through everywhere except the written region, whose
gradient goes to the value that was written.
"""
from ..dispatch import kernel
from ..tensor import Tensor
from ..autograd import grad_mode
from ..autograd.engine import Node, edge
from . import pointwise as P
from .broadcast import broadcast_shapes

_K_COPY = kernel("copy_").impl
_K_INDEX_PUT = kernel("index_put_").impl
_state = grad_mode.state


def _check_inplace(x, opname):
    if _state.enabled:
        if x.grad_fn is None and x._requires_grad:
            raise RuntimeError(f"{opname}: a leaf Variable that requires grad is being used in an in-place operation.")
        base = x._base
        if base is not None and base.grad_fn is None and base._requires_grad:
            raise RuntimeError(f"{opname}: a view of a leaf Variable that requires grad is being used in an "
                               f"in-place operation.")


class CopySlices(Node):
    """The base's gradient passes through except where the view was written;
    the written region's gradient goes to the written value. The region is
    (shape, strides, offset) relative to a contiguous base, or, for a base
    that is not contiguous, `positions`: the row-major index in the base of
    each element of the view."""
    __slots__ = ("shape", "strides", "offset", "positions")

    def backward(self, g):
        from .shape import as_strided, reshape
        from .conversion import clone, to_device
        from .creation import zeros
        from .indexing import index
        gb = clone(g).detach() if not _state.enabled else clone(g)
        zero = zeros((), dtype=g._dtype, device=g._storage.device)
        with grad_mode.no_grad():
            if self.positions is None:
                region = as_strided(gb.detach(), self.shape, self.strides, self.offset)
                g_written = clone(region)
                _K_COPY[region._storage.device.backend](region, zero)
            else:
                key = (to_device(self.positions, g._storage.device),)
                flat = reshape(gb.detach(), (-1,))
                g_written = reshape(index(flat, key), self.shape)
                _K_INDEX_PUT[flat._storage.device.backend](flat, key, zero, False)
        gb._storage.version += 1
        return (gb, g_written)


def _positions_in(base, x):
    """int64 tensor: the row-major index in base of each element of view x."""
    import numpy as np
    from .creation import tensor

    def storage_offsets(t):
        off = np.full(t._shape, t._offset, dtype=np.int64)
        for d, (n, st) in enumerate(zip(t._shape, t._strides)):
            off = off + (np.arange(n, dtype=np.int64) * st).reshape((n,) + (1,) * (len(t._shape) - d - 1))
        return off.reshape(-1)
    b = storage_offsets(base)
    order = np.argsort(b, kind="stable")
    return tensor(order[np.searchsorted(b[order], storage_offsets(x))])


class OverwrittenBackward(Node):
    """x's old value was overwritten by one that needs no gradient: the
    history before the write gets zeros (torch does the same)."""
    __slots__ = ()

    def backward(self, g):
        from .creation import zeros_like
        return (zeros_like(g),)


def _move_retained_grad(t, old_fn):
    """retain_grad() follows the tensor to its new history, as in torch
    (other hooks stay with the value they were registered on)."""
    if t._retains_grad and old_fn is not None and old_fn._pre_hooks and t.grad_fn is not old_fn:
        for hook in [h for h in old_fn._pre_hooks if getattr(h, "retains_grad_of", None) is not None]:
            if hook.retains_grad_of() is t:
                old_fn._pre_hooks.remove(hook)
                t.grad_fn.register_prehook(hook)


def _rebase_history(x, result):
    old_x_fn, old_base_fn = x.grad_fn, x._base.grad_fn if x._base is not None else None
    _rebase(x, result)
    _move_retained_grad(x, old_x_fn)
    if x._base is not None:
        _move_retained_grad(x._base, old_base_fn)


def _rebase(x, result):
    base = x._base
    if base is None:
        if result._requires_grad:
            fn = result.grad_fn
            if fn is None:  # result is a leaf (x.copy_(leaf)): route x's gradient to it
                from .conversion import IdentityBackward
                fn = IdentityBackward()
                fn.next_functions = (edge(result),)
        else:
            fn = OverwrittenBackward()
            fn.next_functions = (edge(x),)
        x.grad_fn = fn
        x._requires_grad = True
        return
    node = CopySlices()
    node.shape, node.strides, node.offset = x._shape, x._strides, x._offset - base._offset
    node.positions = None if base.is_contiguous() else _positions_in(base, x)
    node.next_functions = (edge(base), edge(result))
    base.grad_fn = node
    base._requires_grad = True
    x.grad_fn = _view_grad_fn(base, x, node.positions)
    x._base_fn = base.grad_fn
    x._requires_grad = True


def _view_grad_fn(base, x, positions):
    """A grad_fn taking view x's gradient into base's current history."""
    with grad_mode.enable_grad():
        if positions is None:
            from .shape import as_strided
            return as_strided(base, x._shape, x._strides, x._offset - base._offset).grad_fn
        from .shape import reshape
        from .indexing import index
        return reshape(index(reshape(base, (-1,)), (positions,)), x._shape).grad_fn


def refresh_view_history(x):
    """Re-derive view x's grad_fn from its base after the base's history was
    rewritten in place (the engine calls this when it finds x stale)."""
    base = x._base
    x.grad_fn = _view_grad_fn(base, x, None if base.is_contiguous() else _positions_in(base, x))
    x._base_fn = base.grad_fn
    return x.grad_fn


def _check_no_internal_overlap(x, opname):
    if 0 in x._strides and any(s == 0 and n > 1 for n, s in zip(x._shape, x._strides)):
        raise RuntimeError(f"{opname}: unsupported operation: more than one element of the written-to tensor "
                           f"refers to a single memory location (an expanded tensor of shape {list(x._shape)}). "
                           f"Please clone() the tensor before performing the operation.")


def write_(x, result, opname):
    """Store result (broadcastable to x) into x's memory: the in-place core."""
    _check_no_internal_overlap(x, opname)
    if result._shape != x._shape and broadcast_shapes(x._shape, result._shape) != x._shape:
        raise RuntimeError(f"{opname}: output with shape {list(x._shape)} doesn't match the broadcast "
                           f"shape {list(broadcast_shapes(x._shape, result._shape))}")
    base = x._base
    tracked = _state.enabled and (result._requires_grad or x._requires_grad or
                                  (base is not None and base._requires_grad))
    if tracked and result._requires_grad:
        if result._shape != x._shape:
            from .shape import expand
            result = expand(result, x._shape)
        if result._dtype is not x._dtype:
            from .conversion import to_dtype
            result = to_dtype(result, x._dtype)
        if result._storage.device is not x._storage.device:
            from .conversion import to_device
            result = to_device(result, x._storage.device)
    _K_COPY[x._storage.device.backend](x, result)
    x._storage.version += 1
    if tracked:
        _rebase_history(x, result)
    return x


def _source(x):
    """x's value to compute from: a clone when autograd may save it, since
    the write is about to overwrite x's memory."""
    if _state.enabled and (x._requires_grad or (x._base is not None and x._base._requires_grad)):
        from .conversion import clone
        return clone(x)
    return x


def _binary_inplace(fn, opname):
    def op(x, other, *args, **kwargs):
        _check_inplace(x, opname)
        result = fn(_source(x), other, *args, **kwargs)
        if result._dtype.category > x._dtype.category:
            raise RuntimeError(f"{opname}: result type {result._dtype} can't be cast to the desired output "
                               f"type {x._dtype}")
        return write_(x, result, opname)
    op.__name__ = opname
    return op


add_ = _binary_inplace(P.add, "add_")
sub_ = _binary_inplace(P.sub, "sub_")
mul_ = _binary_inplace(P.mul, "mul_")
div_ = _binary_inplace(P.div, "div_")
pow_ = _binary_inplace(P.pow, "pow_")
masked_fill_ = _binary_inplace(P.masked_fill, "masked_fill_")


def clamp_(x, min=None, max=None):
    _check_inplace(x, "clamp_")
    return write_(x, P.clamp(_source(x), min, max), "clamp_")


def _unary_inplace(fn, opname):
    def op(x):
        _check_inplace(x, opname)
        return write_(x, fn(_source(x)), opname)
    op.__name__ = opname
    return op


relu_ = _unary_inplace(P.relu, "relu_")
abs_ = _unary_inplace(P.abs, "abs_")
log_ = _unary_inplace(P.log, "log_")
rsqrt_ = _unary_inplace(P.rsqrt, "rsqrt_")
neg_ = _unary_inplace(P.neg, "neg_")
exp_ = _unary_inplace(P.exp, "exp_")
sqrt_ = _unary_inplace(P.sqrt, "sqrt_")
tanh_ = _unary_inplace(P.tanh, "tanh_")
sigmoid_ = _unary_inplace(P.sigmoid, "sigmoid_")


def lerp_(x, end, weight):
    _check_inplace(x, "lerp_")
    return write_(x, P.lerp(_source(x), end, weight), "lerp_")


def addcmul_(x, tensor1, tensor2, value=1):
    _check_inplace(x, "addcmul_")
    return write_(x, P.addcmul(_source(x), tensor1, tensor2, value), "addcmul_")


def addcdiv_(x, tensor1, tensor2, value=1):
    _check_inplace(x, "addcdiv_")
    return write_(x, P.addcdiv(_source(x), tensor1, tensor2, value), "addcdiv_")


def copy_(x, src, non_blocking=False):
    if not isinstance(src, Tensor):
        raise TypeError(f"copy_(): argument 'src' must be Tensor, not {type(src).__name__}")
    _check_inplace(x, "copy_")
    return write_(x, src, "copy_")


def fill_(x, value):
    _check_inplace(x, "fill_")
    if isinstance(value, Tensor):
        if value._shape:
            raise RuntimeError(f"fill_ only supports 0-dimension value tensor but got tensor with "
                               f"{len(value._shape)} dimensions.")
        return write_(x, value, "fill_")
    from .creation import full
    return write_(x, full((), value, dtype=x._dtype, device=x._storage.device), "fill_")


def zero_(x):
    return fill_(x, 0)


class IndexPutBackward(Node):
    __slots__ = ("key", "value_meta", "has_x", "accumulate")

    def backward(self, g):
        from .indexing import index
        out = []
        if self.has_x and self.accumulate:
            out.append(g)
        elif self.has_x:
            gx = g.clone()
            with grad_mode.no_grad():
                _K_INDEX_PUT[gx._storage.device.backend](gx, self.key, 0, False)
            out.append(gx)
        if self.value_meta is not None:
            out.append(P._grad_to(index(g, self.key), *self.value_meta))
        return tuple(out)


def index_put_(x, indices, values, accumulate=False):
    """x[indices] = values (or += with accumulate): indices is a tuple of index
    tensors, as in torch. Out-of-range indices raise before anything is written."""
    from .indexing import _normalize_key, _check_bounds
    if not isinstance(indices, (tuple, list)):
        raise TypeError(f"index_put_(): indices must be a tuple of tensors, got {type(indices).__name__}")
    key, _ = _normalize_key(x, tuple(indices))
    _check_bounds(x, key)
    if isinstance(values, Tensor) and values._dtype is not x._dtype:
        values = values.to(x._dtype)
    return _index_put(x, key, values, accumulate)


def _index_put(x, key, value, accumulate=False):
    """index_put_ for a key already normalized and bounds-checked."""
    _check_inplace(x, "index_put_")
    _check_no_internal_overlap(x, "index_put_")
    track = _state.enabled and (x._requires_grad or (isinstance(value, Tensor) and value._requires_grad))
    if track:
        from .conversion import clone
        src = clone(x)
        with grad_mode.no_grad():
            _K_INDEX_PUT[x._storage.device.backend](x, key, value, accumulate)
        x._storage.version += 1
        node = IndexPutBackward()
        node.key = key
        node.has_x = src._requires_grad
        node.accumulate = accumulate
        vt = isinstance(value, Tensor) and value._requires_grad
        node.value_meta = (value._shape, value._dtype) if vt else None
        ins = ([src] if node.has_x else []) + ([value] if vt else [])
        node.next_functions = tuple(edge(t) for t in ins)
        result = x.detach()
        result.grad_fn = node
        result._requires_grad = True
        _rebase_history(x, result)
        return x
    _K_INDEX_PUT[x._storage.device.backend](x, key, value, accumulate)
    x._storage.version += 1
    return x
