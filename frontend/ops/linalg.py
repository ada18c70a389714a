"""matmul (batched, broadcast), bmm, and the fused linear family (linear, linear_gelu,
linear_residual, mlp_gelu)."""
import math

from .. import dtypes as dt
from ..dispatch import kernel
from ..tensor import Tensor
from ..autograd import grad_mode
from ..autograd.engine import AccumulateGrad, Node, attach
from ..autocast import gate as _AC, lower as _lower
from .broadcast import broadcast_shapes, sum_to
from .conversion import CastBackward  # the backward's per-edge tests: imported once, not per call
from . import grad_column_sums
from .shape import unsqueeze, squeeze, transpose, reshape

_K_MATMUL = kernel("matmul").impl
_state = grad_mode.state


class MatmulBackward(Node):
    __slots__ = ("a_shape", "b_shape")

    def backward(self, g):
        a, b = self.saved_tensors
        ga = gb = None
        if self.next_functions[0] is not None:
            ga = sum_to(_matmul2(g, transpose(b, -1, -2)), self.a_shape)
        if self.next_functions[1] is not None:
            if len(self.b_shape) == 2:
                gb = _shared_b_grad(a, b, g)
            else:
                gb = sum_to(_matmul2(transpose(a, -1, -2), g), self.b_shape)
        return (ga, gb)


def _shared_b_grad(a, b, g):
    """Gradient of a 2-D b shared by every batch entry of a (a linear layer's weight).

    The batch folds into K: one (k, P) @ (P, n) GEMM over all P rows, instead
    of a batched product of P/m slices summed afterwards (P/m times more
    output written and reduced).  When b is a column-major view (the
    transposed weight of `linear`), the product is formed as (g^T a)^T so the
    gradient reaching the weight is contiguous and needs no transposed copy.
    """
    rows = math.prod(a._shape[:-1])  # explicit: -1 cannot be inferred when K or N is 0
    a2 = reshape(a, rows, a._shape[-1])
    g2 = reshape(g, rows, g._shape[-1])
    if b._strides[0] == 1 and b._strides[1] != 1 and b._shape[0] > 1 and b._shape[1] > 1:
        return transpose(_matmul2(transpose(g2, 0, 1), a2), 0, 1)
    return _matmul2(transpose(a2, 0, 1), g2)


def _check(a, b, opname):
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{opname}(): expected Tensor arguments, got {type(a).__name__} and {type(b).__name__}")
    if a._storage.device is not b._storage.device:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{a.device} and {b.device}!")
    if a._dtype is not b._dtype:
        raise RuntimeError(f"{opname}: expected both operands to have the same dtype, but got {a._dtype} and {b._dtype}")
    if a._dtype.category != dt.FLOAT:
        raise RuntimeError(f"{opname}: \"matmul\" not implemented for '{a._dtype}' (floating point dtypes only)")


def _matmul2(a, b):
    """a: (..., m, k), b: (..., k, n), both at least 2-D."""
    if a._shape[-1] != b._shape[-2]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({'x'.join(map(str, a._shape))} and "
                           f"{'x'.join(map(str, b._shape))})")
    if len(a._shape) > 2 or len(b._shape) > 2:
        broadcast_shapes(a._shape[:-2], b._shape[:-2])
    out = _K_MATMUL[a._storage.device.backend](a, b, a._dtype)
    if _state.enabled and (a._requires_grad or b._requires_grad):
        node = MatmulBackward()
        node.a_shape, node.b_shape = a._shape, b._shape
        node.save(a, b)
        attach(out, node, (a, b))
    return out


def matmul(a, b):
    if _AC.armed:
        a, b = _lower(a, b)
    _check(a, b, "matmul")
    if len(a._shape) >= 2 and len(b._shape) >= 2:
        return _matmul2(a, b)
    if not a._shape or not b._shape:
        raise RuntimeError(f"both arguments to matmul need to be at least 1D, but they are {len(a._shape)}D and "
                           f"{len(b._shape)}D")
    a1 = len(a._shape) == 1
    b1 = len(b._shape) == 1
    if a1 and b1 and a._shape[0] != b._shape[0]:
        raise RuntimeError(f"inconsistent tensor size, expected tensor [{a._shape[0]}] and src [{b._shape[0]}] to have "
                           f"the same number of elements, but got {a._shape[0]} and {b._shape[0]} elements respectively")
    aa = unsqueeze(a, 0) if a1 else a
    bb = unsqueeze(b, 1) if b1 else b
    out = _matmul2(aa, bb)
    if a1:
        out = squeeze(out, -2)
    if b1:
        out = squeeze(out, -1)
    return out


def mm(a, b):
    if _AC.armed:
        a, b = _lower(a, b)
    _check(a, b, "mm")
    if len(a._shape) != 2 or len(b._shape) != 2:
        raise RuntimeError(f"mm: expected 2D tensors, got {len(a._shape)}D and {len(b._shape)}D")
    return _matmul2(a, b)


def bmm(a, b):
    if _AC.armed:
        a, b = _lower(a, b)
    _check(a, b, "bmm")
    if len(a._shape) != 3 or len(b._shape) != 3:
        raise RuntimeError(f"batch1 must be a 3D tensor and batch2 must be a 3D tensor, got {len(a._shape)}D and "
                           f"{len(b._shape)}D")
    if a._shape[0] != b._shape[0]:
        raise RuntimeError(f"bmm: batch sizes differ: {a._shape[0]} vs {b._shape[0]}")
    return _matmul2(a, b)


# --- the fused linear family ----------------------------------------------------
#
# One autograd node per call.  The forward is one GEMM whose epilogue adds the
# bias, applies tanh-GELU (writing the pre-activation the backward needs) or
# adds a residual; the backward is the input-gradient GEMM, the weight-gradient
# GEMM (written in fp32 when the weight is an autocast copy of an fp32
# parameter, so its cast back costs nothing) and one reduction for the bias.
# `mlp_gelu` chains two of them in one node so that the second layer's
# input-gradient GEMM applies the GELU backward in its epilogue.

_K_LINEAR = kernel("linear").impl
_K_LINEAR_DGRAD = kernel("linear_input_grad").impl
_K_LINEAR_WGRAD = kernel("linear_weight_grad").impl


def _check_linear(x, weight, bias, residual, opname, in_shape=None):
    """Validate a linear layer's arguments; in_shape stands for x's shape when x is the hidden
    activation of mlp_gelu, which does not exist yet."""
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{opname}(): expected Tensor input and weight, got {type(x).__name__} and "
                        f"{type(weight).__name__}")
    shape = x._shape if in_shape is None else in_shape
    if len(weight._shape) != 2:
        raise RuntimeError(f"{opname}: weight must be 2-D (out_features, in_features), got shape {list(weight._shape)}")
    if not shape or shape[-1:] != weight._shape[1:]:
        raise RuntimeError(f"{opname}: input's last dimension {shape[-1] if shape else None} does not match "
                           f"weight's in_features {weight._shape[1]} (input {list(shape)}, weight "
                           f"{list(weight._shape)})")
    dev = x._storage.device
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{opname}(): {name} must be a Tensor or None, got {type(t).__name__}")
        if t._storage.device is not dev:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{x.device} and {t.device}! ({opname}: input and {name})")
    if weight._dtype is not x._dtype:
        raise RuntimeError(f"{opname}: expected input and weight to have the same dtype, but got {x._dtype} and "
                           f"{weight._dtype}")
    if x._dtype.category != dt.FLOAT:
        raise RuntimeError(f"{opname}: not implemented for '{x._dtype}' (floating point dtypes only)")
    if bias is not None and bias._shape != weight._shape[:1]:
        raise RuntimeError(f"{opname}: bias must have shape [{weight._shape[0]}] (out_features), got "
                           f"{list(bias._shape)}")
    if residual is not None:
        out_shape = shape[:-1] + weight._shape[:1]
        if residual._shape != out_shape:
            raise RuntimeError(f"{opname}: residual must have the output's shape {list(out_shape)}, got "
                               f"{list(residual._shape)}")
        if residual._dtype.category != dt.FLOAT:
            raise RuntimeError(f"{opname}: residual must be floating point, got {residual._dtype}")


def _lower_linear(x, weight, bias, residual):
    """Autocast: the GEMM operands (and a bias without a residual) take the autocast dtype; a
    residual keeps its dtype, which is then the output's (an fp32 residual stream stays fp32)."""
    if not _AC.armed:
        return x, weight, bias
    if residual is None:
        return tuple(_lower(x, weight, bias))
    x, weight = _lower(x, weight)
    return x, weight, bias


def _out_dtype(x, bias, residual):
    out = residual._dtype if residual is not None else x._dtype
    if bias is not None and bias._dtype is not out:
        from .conversion import to_dtype
        bias = to_dtype(bias, out)
    return out, bias


def _grad_dtype(edge, default):
    """dtype for the gradient flowing into `edge`: fp32 when the input is an autocast copy of an
    fp32 tensor (the cast's backward then costs nothing), else `default`."""
    if isinstance(edge, CastBackward) and edge.src_dtype is dt.float32:
        return dt.float32
    return default


def _accumulation_target(edge, dtype, like):
    """The existing `.grad` the weight-gradient GEMM can add into (beta = 1, no add kernel), or None.

    Only while the engine marks a backward as accumulating into leaves
    (`grad_mode.state.accumulate_into_leaves`: backward() without inputs=, so every reached
    leaf's gradient is summed into .grad), and only where nothing can observe the gradient on its
    way: no hooks on the leaf's AccumulateGrad nor on the autocast cast before it, and a dense
    .grad of the right dtype on the same device that records no history."""
    if not getattr(_state, "accumulate_into_leaves", False):
        return None
    if isinstance(edge, CastBackward):
        if edge._pre_hooks or edge.src_dtype is not dt.float32:
            return None
        edge = edge.next_functions[0]
    if not isinstance(edge, AccumulateGrad) or edge._pre_hooks:
        return None
    leaf = edge.variable
    grad = leaf.grad
    if (grad is None or grad._dtype is not dtype or grad._shape != leaf._shape or not grad.is_contiguous()
            or grad._requires_grad or grad._storage.device is not like._storage.device):
        return None
    return grad


def _to(t, dtype):
    if dtype is None or t._dtype is dtype:
        return t
    from .conversion import to_dtype
    return to_dtype(t, dtype)


def _gemm_grads(g, x, weight, bias, edges, preact_of_x=None):
    """(d input, d weight, d bias) of y = x W^T + b from dy = g (in the GEMM dtype), recording
    nothing; each is computed where its entry of `edges` is not None.  preact_of_x: x is
    gelu_tanh(preact_of_x), and the input gradient is taken with respect to preact_of_x (the
    GELU backward runs in the input-gradient GEMM's epilogue)."""
    backend = g._storage.device.backend
    gx = gw = gb = None
    if edges[0] is not None:
        gx = _K_LINEAR_DGRAD[backend](g, weight, preact_of_x)
    if edges[1] is not None:
        dtype = _grad_dtype(edges[1], weight._dtype)
        into = _accumulation_target(edges[1], dtype, g)
        gw = _K_LINEAR_WGRAD[backend](g, x, dtype, into)
        if into is not None:
            gw = None  # already added into .grad by the GEMM: nothing more flows to the leaf
    if edges[2] is not None:
        gb = _bias_grad(g, _grad_dtype(edges[2], bias._dtype))
    return gx, gw, gb


_K_COLUMN_SUM = kernel("column_sum").impl


def _bias_grad(g, dtype):
    """g summed over every dim but the last, as dtype: no launch where the backward that produced g
    recorded that sum for g itself (the add+norm backward, ops/grad_column_sums.py), one where the
    backend has "column_sum" (CUDA; it answers None where it cannot), else a reduction."""
    known = grad_column_sums.take(g)
    if known is not None:
        return _to(known, dtype)
    impl = _K_COLUMN_SUM[g._storage.device.backend]
    if not getattr(impl, "missing", False) and g.is_contiguous() and g._shape:
        gb = impl(g, dtype)
        if gb is not None:
            return gb
    from .reduction import sum as _sum
    return _sum(g, tuple(range(len(g._shape) - 1)), dtype=dtype)


def _composite_grads(g, x, weight, bias, gelu):
    """The same gradients from differentiable ops (create_graph: the gradient is differentiated
    again).  The pre-activation is recomputed from recorded ops so second derivatives reach
    x, weight and bias through it."""
    from .pointwise import _act_backward, add
    from .reduction import sum as _sum
    from . import codes as C
    gz = _to(g, x._dtype)
    if gelu:
        z = matmul(x, transpose(weight, 0, 1))
        if bias is not None:
            z = add(z, bias)
        gz = _act_backward(C.GELU_TANH, gz, z)
    gx = matmul(gz, weight)
    rows = math.prod(x._shape[:-1])
    gw = matmul(transpose(reshape(gz, rows, gz._shape[-1]), 0, 1), reshape(x, rows, x._shape[-1]))
    gb = _sum(gz, tuple(range(len(gz._shape) - 1))) if bias is not None else None
    return gx, gw, gb


class LinearBackward(Node):
    """y = act(x W^T + b) (+ residual): one node for the whole fused forward.
    Saved: x, weight, bias, and the pre-activation when act is GELU."""
    __slots__ = ("gelu", "has_residual")

    @property
    def takes_column_sum(self):
        """The bias gradient is the column sum of the incoming gradient (ops/grad_column_sums.py)."""
        return not self.gelu and self.next_functions[2] is not None

    def backward(self, g):
        x, weight, bias, preact = self.saved_tensors
        edges = self.next_functions
        g_res = g if self.has_residual else None
        if _state.enabled:
            gx, gw, gb = _composite_grads(g, x, weight, bias, self.gelu)
            return (gx, gw, gb, g_res)
        gz = _to(g, x._dtype)
        if self.gelu:
            from .pointwise import _act_backward
            from . import codes as C
            gz = _act_backward(C.GELU_TANH, gz, preact)
        gx, gw, gb = _gemm_grads(gz, x, weight, bias, edges)
        return (gx, gw, gb, g_res)


class MlpGeluBackward(Node):
    """y = fc2(gelu_tanh(fc1(x))) (+ residual) as one node.  Saved: x, w1, b1, the fc1
    pre-activation z, h = gelu(z), w2, b2."""
    __slots__ = ("has_residual",)

    @property
    def takes_column_sum(self):
        """fc2's bias gradient is the column sum of the incoming gradient (ops/grad_column_sums.py)."""
        return self.next_functions[4] is not None

    def backward(self, g):
        x, w1, b1, z, h, w2, b2 = self.saved_tensors
        e_x, e_w1, e_b1, e_w2, e_b2 = self.next_functions[:5]
        g_res = g if self.has_residual else None
        if _state.enabled:
            from .pointwise import _act_backward, add, gelu
            from . import codes as C
            z = matmul(x, transpose(w1, 0, 1))  # recorded, so second derivatives reach x, w1, b1
            if b1 is not None:
                z = add(z, b1)
            gh, gw2, gb2 = _composite_grads(g, gelu(z, approximate="tanh"), w2, b2, False)
            gz = _act_backward(C.GELU_TANH, gh, z)
            gx, gw1, gb1 = _composite_grads(gz, x, w1, b1, False)
            return (gx, gw1, gb1, gw2, gb2, g_res)
        g2 = _to(g, x._dtype)
        need_z = e_x is not None or e_w1 is not None or e_b1 is not None
        gz, gw2, gb2 = _gemm_grads(g2, h, w2, b2, (True if need_z else None, e_w2, e_b2), preact_of_x=z)
        gx, gw1, gb1 = _gemm_grads(gz, x, w1, b1, (e_x, e_w1, e_b1)) if need_z else (None, None, None)
        return (gx, gw1, gb1, gw2, gb2, g_res)


def linear(input, weight, bias=None):
    """input @ weight.T + bias (weight: (out_features, in_features)): one GEMM with the bias in its
    epilogue, one autograd node."""
    return _fused_linear(input, weight, bias, False, None, "linear")


def linear_gelu(input, weight, bias=None):
    """gelu(input @ weight.T + bias, approximate="tanh") in one GEMM (the pre-activation is kept
    for the backward by the same epilogue) and one autograd node."""
    return _fused_linear(input, weight, bias, True, None, "linear_gelu")


def linear_residual(input, weight, bias, residual):
    """residual + input @ weight.T + bias, the residual added in the GEMM's epilogue.  The output
    has the residual's dtype (under autocast the GEMM runs in the autocast dtype and an fp32
    residual stream stays fp32)."""
    return _fused_linear(input, weight, bias, False, residual, "linear_residual")


def _fused_linear(x, weight, bias, gelu, residual, opname):
    x, weight, bias = _lower_linear(x, weight, bias, residual)
    _check_linear(x, weight, bias, residual, opname)
    out_dtype, bias = _out_dtype(x, bias, residual)
    out, preact = _K_LINEAR[x._storage.device.backend](x, weight, bias, residual, gelu, out_dtype)
    if _state.enabled and (x._requires_grad or weight._requires_grad or (bias is not None and bias._requires_grad)
                           or (residual is not None and residual._requires_grad)):
        node = LinearBackward()
        node.gelu, node.has_residual = gelu, residual is not None
        node.save(x, weight, bias, preact)
        attach(out, node, (x, weight, bias, residual))
    return out


def mlp_gelu(input, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual=None):
    """fc2(gelu_tanh(fc1(input))) (+ residual): a transformer MLP in two GEMMs and one autograd
    node.  fc1's epilogue adds its bias, applies GELU and keeps the pre-activation; fc2's adds
    its bias (and the residual).  In the backward, fc2's input-gradient GEMM applies the GELU
    backward in its epilogue, so the activation costs no kernel of its own either way."""
    x, w1, b1, w2, b2 = input, fc1_weight, fc1_bias, fc2_weight, fc2_bias
    if _AC.armed:
        x, w1, b1, w2 = _lower(x, w1, b1, w2)
        if residual is None:
            (b2,) = _lower(b2)
    _check_linear(x, w1, b1, None, "mlp_gelu")
    _check_linear(x, w2, b2, residual, "mlp_gelu", in_shape=x._shape[:-1] + w1._shape[:1])
    out_dtype, b2 = _out_dtype(x, b2, residual)
    backend = x._storage.device.backend
    h, z = _K_LINEAR[backend](x, w1, b1, None, True, x._dtype)
    out, _ = _K_LINEAR[backend](h, w2, b2, residual, False, out_dtype)
    if _state.enabled and any(t is not None and t._requires_grad for t in (x, w1, b1, w2, b2, residual)):
        node = MlpGeluBackward()
        node.has_residual = residual is not None
        node.save(x, w1, b1, z, h, w2, b2)
        attach(out, node, (x, w1, b1, w2, b2, residual))
    return out


def outer(a, b):
    """Outer product of two 1-D tensors."""
    from .pointwise import mul
    if len(a._shape) != 1 or len(b._shape) != 1:
        raise RuntimeError(f"outer: expected 1-D tensors, got {len(a._shape)}-D and {len(b._shape)}-D")
    return mul(unsqueeze(a, 1), unsqueeze(b, 0))
