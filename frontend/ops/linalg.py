"""matmul (batched, broadcast), bmm, linear."""
import math

from .. import dtypes as dt
from ..dispatch import kernel
from ..tensor import Tensor
from ..autograd import grad_mode
from ..autograd.engine import Node, attach
from ..autocast import gate as _AC, lower as _lower
from .broadcast import broadcast_shapes, sum_to
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


def linear(input, weight, bias=None):
    """input @ weight.T + bias (weight: (out_features, in_features))."""
    if _AC.armed:
        input, weight, bias = _lower(input, weight, bias)
    x = input
    from .pointwise import add
    if len(weight._shape) != 2:
        raise RuntimeError(f"linear: weight must be 2-D (out_features, in_features), got shape {list(weight._shape)}")
    if x._shape[-1:] != weight._shape[1:]:
        raise RuntimeError(f"linear: input's last dimension {x._shape[-1] if x._shape else None} does not match "
                           f"weight's in_features {weight._shape[1]} (input {list(x._shape)}, weight "
                           f"{list(weight._shape)})")
    out = matmul(x, transpose(weight, 0, 1))
    if bias is not None:
        out = add(out, bias)
    return out


def outer(a, b):
    """Outer product of two 1-D tensors."""
    from .pointwise import mul
    if len(a._shape) != 1 or len(b._shape) != 1:
        raise RuntimeError(f"outer: expected 1-D tensors, got {len(a._shape)}-D and {len(b._shape)}-D")
    return mul(unsqueeze(a, 1), unsqueeze(b, 0))
