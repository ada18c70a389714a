"""Fused residual add + normalisation, the ops a model opts into (as with
TransformerEngine's and apex's fused layers):

    normed, new_residual = add_layer_norm(x, residual, weight, bias, eps)
    normed, new_residual = add_rms_norm(x, residual, weight, eps)

with new_residual = x + residual (x itself when residual is None) and normed =
layer_norm / rms_norm of new_residual over the last dimension.  A pre-norm
transformer block threads (branch output, residual) pairs through these, so
each residual add costs no kernel of its own, in the forward or the backward.

Numerics: the norm runs in float32 (float64 for float64 tensors) whatever the
input dtypes, the new residual has the promoted dtype of x and residual, and
normed is rounded once to `out_dtype`: by default the autocast dtype inside an
autocast region on the tensors' device (the next GEMM reads it with no cast),
else the new residual's dtype.  The values equal the unfused ops': autocast's
layer_norm returns float32 that the next linear casts to the same 16-bit
numbers.

Autograd: one node computes the gradients of x, residual, weight and bias
from both output gradients at once (on CUDA one kernel adds the residual's
incoming gradient into the norm's dx).  The engine gives a node one output, so
each output gets a small forwarding node that hands its gradient to the
shared node as a `_OutputGrads` (which the engine's buffer sums field-wise).

Residual dropout: with dropout_p = p > 0 the new residual is
residual + dropout(x, p), the branch's dropout of a pre-norm block (attention
projection, MLP) done in the same pass.  The mask is exactly the one
ops.dropout would draw for x from the same generator state (CUDA: the fused
dropout kernel's Philox values, numel(x) of them reserved from the generator,
graph replays drawing fresh ones; CPU: bernoulli_scaled's NumPy draw), and the
values equal ops.dropout followed by the add+norm.  The node keeps only the
Philox state (the CPU: the mask) and the backward regenerates the mask while
computing x's gradient, dx * mask / (1 - p), in the same kernel (CUDA).

Bias gradient of the branch: when x is a Linear's output (the attention
projection, the MLP's second Linear) that Linear's bias gradient is dx summed
over the rows.  The CUDA kernels reduce it with dweight and dbias (no launch of
its own), the composite backward with one sum; it is recorded for that dx
tensor (ops/grad_column_sums.py) only when the node receiving dx takes it.
"""
from .. import dtypes as dt
from . import grad_column_sums
from ..autocast import gate as _AC, state as _ac_state
from ..autograd import grad_mode
from ..autograd.engine import Node, attach, edge
from ..dispatch import kernel
from ..tensor import Tensor, make
from . import pointwise as P
from . import reduction as R
from .nn import _FINFO_EPS, _float_input

_K_ADD_NORM = kernel("add_norm").impl
# CUDA only: the fused backward; other backends and create_graph use the composite below.
_K_ADD_NORM_BWD = kernel("add_norm_backward").impl
_K_ADD_DROPOUT_NORM = kernel("add_dropout_norm").impl
_K_ADD_DROPOUT_NORM_BWD = kernel("add_dropout_norm_backward").impl  # CUDA only
_K_DROPOUT_BWD = kernel("dropout_fused_backward").impl  # CUDA only: the mask regenerated from its Philox state
_state = grad_mode.state


class _OutputGrads:
    """Gradients of the two outputs of an add+norm, summed field-wise by the engine."""
    __slots__ = ("dy", "dres")

    def __init__(self, dy, dres):
        self.dy, self.dres = dy, dres

    def __add__(self, other):
        return _OutputGrads(_sum(self.dy, other.dy), _sum(self.dres, other.dres))


def _sum(a, b):
    return b if a is None else (a if b is None else P.add(a, b))


class _NormedGrad(Node):
    """grad_fn of `normed`: forwards its gradient to the shared AddNormBackward."""
    __slots__ = ()

    def backward(self, g):
        return (_OutputGrads(g, None),)


class _ResidualGrad(Node):
    """grad_fn of `new_residual`: forwards its gradient to the shared AddNormBackward."""
    __slots__ = ()

    def backward(self, g):
        return (_OutputGrads(None, g),)


class AddNormBackward(Node):
    __slots__ = ("rms", "eps", "has_res", "has_w", "has_b", "dtypes", "keep", "rng_state")

    def backward(self, grads):
        s, w, mean, rstd = self.saved_tensors
        dy, dres = grads.dy, grads.dres
        x_dtype, res_dtype = self.dtypes[0], self.dtypes[1] if self.has_res else None
        if dy is None:  # only the residual output was used: its gradient passes through the add
            ds = dres
            dw = db = None
        else:
            backend = s._storage.device.backend
            fused = _K_ADD_NORM_BWD[backend] if self.keep == 1.0 else _K_ADD_DROPOUT_NORM_BWD[backend]
            if not _state.enabled and not getattr(fused, "missing", False):
                drop = () if self.keep == 1.0 else (self.keep, self.rng_state)
                dx, dr, dw, db, dx_sum = fused(dy, dres, s, w, mean, rstd, self.rms, x_dtype, res_dtype, self.has_w,
                                               self.has_b, *drop)
                if dx_sum is not None and grad_column_sums.wants_column_sum(self.next_functions[0]):
                    grad_column_sums.record(dx, dx_sum)
                return self._pack(dx, dr, dw, db)
            ds, dw, db = _composite_backward(dy, s, w, mean, rstd, self.rms, self.eps, self.has_w, self.has_b)
            if dres is not None:
                ds = P.add(ds, dres)
        dx = ds.to(x_dtype)
        dr = ds.to(res_dtype) if self.has_res else None
        if self.keep != 1.0:
            dx = self._through_dropout(dx)
        if dy is not None and not _state.enabled and grad_column_sums.wants_column_sum(self.next_functions[0]):
            # The composite's counterpart of the kernels' dx sum (the CPU backend's float64 reference).
            work = dt.float64 if dx._dtype is dt.float64 else dt.float32
            grad_column_sums.record(dx, R.sum(dx, tuple(range(len(dx._shape) - 1)), dtype=work))
        return self._pack(dx, dr, dw, db)

    def _through_dropout(self, dx):
        """dx * mask / keep, the forward's mask (CPU: the saved mask; CUDA: regenerated)."""
        if isinstance(self.rng_state, Tensor):
            return P.mul(dx, self.rng_state)
        apply_mask = _K_DROPOUT_BWD[dx._storage.device.backend]
        if not _state.enabled:
            return apply_mask(dx, self.keep, self.rng_state)
        from .creation import ones  # create_graph: a differentiable multiply by the regenerated mask
        return P.mul(dx, apply_mask(ones(dx._shape, dtype=dx._dtype, device=dx._storage.device), self.keep,
                                    self.rng_state))

    def _pack(self, dx, dr, dw, db):
        out = [dx]
        if self.has_res:
            out.append(dr)
        if self.has_w:
            out.append(dw)
        if self.has_b:
            out.append(db)
        return tuple(out)


def _composite_backward(dy, s, w, mean, rstd, rms, eps, has_w, has_b):
    """(ds, dweight, dbias) in ops: float32 for 16-bit s, differentiable (create_graph)."""
    work = dt.float64 if s._dtype is dt.float64 else dt.float32
    s, g = s.to(work), dy.to(work)
    if _state.enabled:
        # create_graph: the statistics depend on s too, so recompute them in differentiable ops.
        if rms:
            rstd = P.rsqrt(P.add(R.mean(P.mul(s, s), -1, keepdim=True), eps))
        else:
            mean = R.mean(s, -1, keepdim=True)
            centered = P.sub(s, mean)
            rstd = P.rsqrt(P.add(R.mean(P.mul(centered, centered), -1, keepdim=True), eps))
    xhat = P.mul(s, rstd.to(work)) if rms else P.mul(P.sub(s, mean.to(work)), rstd.to(work))
    gw = P.mul(g, w.to(work)) if w is not None else g
    inner = P.mul(xhat, R.mean(P.mul(gw, xhat), -1, keepdim=True))
    if not rms:
        inner = P.add(inner, R.mean(gw, -1, keepdim=True))
    ds = P.mul(rstd.to(work), P.sub(gw, inner))
    batch = tuple(range(len(s._shape) - 1))
    dw = R.sum(P.mul(g, xhat), batch).to(w._dtype) if has_w else None
    db = R.sum(g, batch).to(w._dtype if w is not None else s._dtype) if has_b else None
    return ds, dw, db


def _check(x, residual, weight, bias, opname):
    _float_input(x, opname)
    if residual is not None:
        _float_input(residual, opname)
        if residual._shape != x._shape:
            raise RuntimeError(f"{opname}: residual of shape {list(residual._shape)} does not match x of shape "
                               f"{list(x._shape)}")
        if residual._storage.device != x._storage.device:
            raise RuntimeError(f"{opname}: residual is on {residual.device}, x on {x.device}")
    if not x._shape:
        raise RuntimeError(f"{opname}: x must have at least one dimension")
    n = x._shape[-1]
    for p, what in ((weight, "weight"), (bias, "bias")):
        if p is None:
            continue
        if not isinstance(p, Tensor) or p._shape != (n,):
            raise RuntimeError(f"{opname}: {what} of shape {list(getattr(p, 'shape', []))} does not match the last "
                               f"dimension of x ({n})")
        if p._storage.device != x._storage.device:
            raise RuntimeError(f"{opname}: {what} is on {p.device}, x on {x.device}")


def _out_dtype(x, s_dtype, out_dtype):
    if out_dtype is not None:
        return out_dtype
    if _AC.armed and s_dtype is not dt.float64:
        autocast_dtype = _ac_state.dtypes[x._storage.device.backend]
        if autocast_dtype is not None:
            return autocast_dtype
    return s_dtype


def _add_norm(x, residual, weight, bias, eps, rms, out_dtype, opname, dropout_p=0.0, generator=None):
    _check(x, residual, weight, bias, opname)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{opname}: dropout probability has to be between 0 and 1, but got {dropout_p}")
    if dropout_p and residual is None:
        raise ValueError(f"{opname}: dropout_p applies to x before the residual add, so it needs a residual")
    if dropout_p == 1.0:  # everything dropped: no mask to draw (ops.dropout does the same)
        x, dropout_p = P.mul(x, 0.0), 0.0
    s_dtype = dt.promote_types(x._dtype, residual._dtype) if residual is not None else x._dtype
    out_dtype = _out_dtype(x, s_dtype, out_dtype)
    keep, rng_state = 1.0 - dropout_p, None
    if dropout_p:
        y, s, mean, rstd, rng_state = _K_ADD_DROPOUT_NORM[x._storage.device.backend](
            x, residual, weight, bias, eps, rms, out_dtype, keep, generator)
    else:
        y, s, mean, rstd = _K_ADD_NORM[x._storage.device.backend](x, residual, weight, bias, eps, rms, out_dtype)
    if s is x:  # no residual: the new residual is x, as its own tensor so its gradient reaches the fused node
        s = make(x._storage, x._shape, x._strides, x._offset, x._dtype)
    ins = [t for t in (x, residual, weight, bias) if t is not None]
    if _state.enabled and any(t._requires_grad for t in ins):
        node = AddNormBackward()
        node.rms, node.eps = rms, eps
        node.keep, node.rng_state = keep, rng_state
        node.has_res, node.has_w, node.has_b = residual is not None, weight is not None, bias is not None
        node.dtypes = tuple(t._dtype for t in (x, residual) if t is not None)
        node.save(s, weight, mean, rstd)
        node.next_functions = tuple(edge(t) for t in ins)
        for out, tap in ((y, _NormedGrad()), (s, _ResidualGrad())):
            attach(out, tap, ())
            tap.next_functions = (node,)
    return y, s


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, out_dtype=None, dropout_p=0.0, generator=None):
    """(layer_norm(x + residual), x + residual) over the last dimension, in one pass.

    residual may be None: (layer_norm(x), x).  out_dtype: the dtype of the
    normed output (default: the autocast dtype inside autocast, else that of
    x + residual).  dropout_p > 0 (needs a residual): x is replaced by
    dropout(x, dropout_p, generator=generator), fused in (see the module docstring)."""
    return _add_norm(x, residual, weight, bias, eps, False, out_dtype, "add_layer_norm", dropout_p, generator)


def add_rms_norm(x, residual, weight=None, eps=None, out_dtype=None, dropout_p=0.0, generator=None):
    """(rms_norm(x + residual), x + residual) over the last dimension, in one pass.

    eps=None: torch.finfo(dtype of x + residual).eps, as rms_norm.  dropout_p, generator: as
    add_layer_norm's."""
    if eps is None:
        _float_input(x, "add_rms_norm")
        s_dtype = dt.promote_types(x._dtype, residual._dtype) if isinstance(residual, Tensor) else x._dtype
        eps = _FINFO_EPS[s_dtype]
    return _add_norm(x, residual, weight, None, eps, True, out_dtype, "add_rms_norm", dropout_p, generator)
