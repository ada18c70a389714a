"""Elementwise ops: arithmetic with broadcasting, comparisons, activations,
where/clamp/masked_fill, and the in-place variants. Each op's backward sits
next to its forward.
"""
import numbers

from .. import dtypes as dt
from ..dispatch import kernel
from ..tensor import Tensor
from ..autograd import grad_mode
from ..autograd.engine import Node
from . import codes as C
from .broadcast import broadcast_shapes, sum_to

_K_UNARY = kernel("unary").impl
_K_BINARY = kernel("binary").impl
_K_WHERE = kernel("where").impl
_K_CLAMP = kernel("clamp").impl
_K_ACT_BWD = kernel("act_backward").impl
_state = grad_mode.state


def _device_of(a, b):
    """Backend of a binary op's operands; 0-dim CPU tensors may join any device."""
    da = a._storage.device
    db = b._storage.device
    if da is db:
        return da
    if not b._shape and db.type == "cpu":
        return da
    if not a._shape and da.type == "cpu":
        return db
    raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, {da} and {db}!")


def _scalar_of(t, device):
    # A 0-dim CPU tensor beside a device tensor acts as a Python scalar.
    if isinstance(t, Tensor) and t._storage.device is not device:
        return t.item()
    return t


def _check_number(x, opname):
    if not isinstance(x, (int, float, bool, numbers.Real)):
        raise TypeError(f"{opname}(): expected a Tensor or a Python number, got {type(x).__name__}")


def _grad_to(g, t_shape, t_dtype):
    if g._shape == t_shape and g._dtype is t_dtype:  # the common case, without sum_to's frame
        return g
    g = sum_to(g, t_shape)
    if g._dtype is not t_dtype:
        from .conversion import to_dtype
        g = to_dtype(g, t_dtype)
    return g


class _BinaryNode(Node):
    __slots__ = ("a_meta", "b_meta", "a_scalar", "b_scalar")

    def __init__(self, a, b):
        if isinstance(a, Tensor):
            self.a_meta, self.a_scalar = (a._shape, a._dtype), None
        else:
            self.a_meta, self.a_scalar = None, a
        if isinstance(b, Tensor):
            self.b_meta, self.b_scalar = (b._shape, b._dtype), None
        else:
            self.b_meta, self.b_scalar = None, b

    def _wants(self):
        """(a's gradient is needed, b's is): the operand is a Tensor with an edge. The engine drops
        what a node returns for an input that needs no gradient (a None edge), so it is not computed."""
        edges = self.next_functions
        if self.a_meta is None:
            return False, edges[0] is not None
        return edges[0] is not None, self.b_meta is not None and edges[1] is not None

    def _pack(self, ga, gb):
        out = []
        if self.a_meta is not None:
            out.append(_grad_to(ga, *self.a_meta) if ga is not None else None)
        if self.b_meta is not None:
            out.append(_grad_to(gb, *self.b_meta) if gb is not None else None)
        return tuple(out)


class AddBackward(_BinaryNode):
    __slots__ = ()

    def backward(self, g):
        return self._pack(g, g)


class SubBackward(_BinaryNode):
    __slots__ = ()

    def backward(self, g):
        return self._pack(g, neg(g) if self._wants()[1] else None)


class MulBackward(_BinaryNode):
    __slots__ = ()

    def backward(self, g):
        a, b = self._operands()
        want_a, want_b = self._wants()
        return self._pack(mul(g, b) if want_a else None, mul(g, a) if want_b else None)

    def _operands(self):
        saved = self.saved_tensors
        it = iter(saved)
        a = next(it) if self.a_meta is not None else self.a_scalar
        b = next(it) if self.b_meta is not None else self.b_scalar
        return a, b


class DivBackward(MulBackward):
    __slots__ = ()

    def backward(self, g):
        a, b = self._operands()
        want_a, want_b = self._wants()
        ga = div(g, b) if want_a else None
        gb = neg(div(mul(g, a), mul(b, b))) if want_b else None
        return self._pack(ga, gb)


class PowBackward(MulBackward):
    __slots__ = ()

    def backward(self, g):
        a, b = self._operands()
        want_a, want_b = self._wants()
        ga = gb = None
        if want_a:
            bm1 = sub(b, 1) if isinstance(b, Tensor) else b - 1
            ga = mul(g, mul(pow(a, bm1), b))
        if want_b:
            # d/db a^b = a^b log(a), taken as 0 where a == 0 (torch's convention for b >= 0)
            if isinstance(a, Tensor):
                la = log(where(eq(a, 0), 1.0, a))
            else:
                la = __import__("math").log(a) if a > 0 else 0.0
            gb = mul(g, mul(pow(a, b), la))
        return self._pack(ga, gb)


class MaxMinBackward(MulBackward):
    __slots__ = ()
    is_max = True

    def backward(self, g):
        a, b = self._operands()
        # Ties split the gradient evenly, as torch does.
        pick_a = gt(a, b) if self.is_max else lt(a, b)
        tie = eq(a, b)
        ga = gb = None
        wa = add(pick_a.to(g._dtype), mul(tie.to(g._dtype), 0.5))
        want_a, want_b = self._wants()
        if want_a:
            ga = mul(g, wa)
        if want_b:
            gb = mul(g, rsub(wa, 1.0))
        return self._pack(ga, gb)


class MinBackward(MaxMinBackward):
    __slots__ = ()
    is_max = False


class RemainderBackward(MulBackward):
    __slots__ = ()

    def backward(self, g):
        # a % b = a - floor(a / b) * b
        a, b = self._operands()
        want_a, want_b = self._wants()
        ga = g if want_a else None
        gb = mul(neg(g), _unary(C.FLOOR, div(a, b), None)) if want_b else None
        return self._pack(ga, gb)


_NODE = {C.ADD: AddBackward, C.SUB: SubBackward, C.MUL: MulBackward, C.DIV: DivBackward,
         C.POW: PowBackward, C.MAXIMUM: MaxMinBackward, C.MINIMUM: MinBackward, C.REMAINDER: RemainderBackward}
_SAVES = (C.MUL, C.DIV, C.POW, C.MAXIMUM, C.MINIMUM, C.REMAINDER)
_CMP = frozenset((C.EQ, C.NE, C.LT, C.LE, C.GT, C.GE, C.AND, C.OR, C.XOR))


def _binary(code, a, b):
    if isinstance(a, Tensor):
        if isinstance(b, Tensor):
            dev = a._storage.device
            if dev is b._storage.device:
                a2, b2 = a, b
            else:
                dev = _device_of(a, b)
                a2, b2 = _scalar_of(a, dev), _scalar_of(b, dev)
            if a._shape != b._shape:
                broadcast_shapes(a._shape, b._shape)
            cdt = a._dtype if a._dtype is b._dtype else dt.result_type(a, b)
            needs_grad = a._requires_grad or b._requires_grad
        else:
            _check_number(b, _NAMES[code])
            dev, a2, b2 = a._storage.device, a, b
            cdt = dt.result_type(a, b)
            needs_grad = a._requires_grad
    elif isinstance(b, Tensor):
        _check_number(a, _NAMES[code])
        dev, a2, b2 = b._storage.device, a, b
        cdt = dt.result_type(a, b)
        needs_grad = b._requires_grad
    else:
        raise TypeError(f"{_NAMES[code]}(): expected at least one Tensor operand")
    if code in _CMP:
        out_dt = dt.bool_
    elif code == C.DIV and cdt.category != dt.FLOAT:
        cdt = out_dt = dt.get_default_dtype()
    else:
        out_dt = cdt
        if code == C.SUB and (getattr(a, "_dtype", None) is dt.bool_ or getattr(b, "_dtype", None) is dt.bool_ or
                              a.__class__ is bool or b.__class__ is bool):
            raise RuntimeError("Subtraction, the `-` operator, with a bool tensor is not supported. "
                               "If you are trying to invert a mask, use the `~` or `logical_not()` operator instead.")
    out = _K_BINARY[dev.backend](code, a2, b2, cdt, out_dt)
    if needs_grad:
        node_cls = _NODE.get(code)
        if node_cls is not None:
            ins = (a, b) if isinstance(a, Tensor) and isinstance(b, Tensor) else (a,) if isinstance(a, Tensor) else (b,)
            return node_cls.record(out, ins, ins if code in _SAVES else (), a, b)
    return out


_NAMES = {C.ADD: "add", C.SUB: "sub", C.MUL: "mul", C.DIV: "div", C.POW: "pow",
          C.MAXIMUM: "maximum", C.MINIMUM: "minimum", C.EQ: "eq", C.NE: "ne",
          C.LT: "lt", C.LE: "le", C.GT: "gt", C.GE: "ge", C.AND: "logical_and",
          C.OR: "logical_or", C.XOR: "logical_xor", C.FLOORDIV: "floor_divide",
          C.REMAINDER: "remainder", C.ATAN2: "atan2"}


def add(a, b, alpha=1):
    if alpha != 1:
        b = mul(b, alpha)
    return _binary(C.ADD, a, b)


def sub(a, b, alpha=1):
    if alpha != 1:
        b = mul(b, alpha)
    return _binary(C.SUB, a, b)


def rsub(a, b):
    return _binary(C.SUB, b, a)


def mul(a, b):
    return _binary(C.MUL, a, b)


def div(a, b, rounding_mode=None):
    if rounding_mode is None:
        return _binary(C.DIV, a, b)
    if rounding_mode == "floor":
        return _binary(C.FLOORDIV, a, b)
    if rounding_mode == "trunc":
        q = _binary(C.DIV, a, b)
        r = _unary(C.TRUNC, q, None)
        res = dt.result_type(a, b)
        return r if res.is_floating_point else r.to(res)
    raise ValueError(f"div expected rounding_mode to be one of None, 'trunc', or 'floor' but found {rounding_mode!r}")


def pow(a, b):
    return _binary(C.POW, a, b)


def maximum(a, b):
    return _binary(C.MAXIMUM, a, b)


def minimum(a, b):
    return _binary(C.MINIMUM, a, b)


def floor_divide(a, b):
    return _binary(C.FLOORDIV, a, b)


def remainder(a, b):
    return _binary(C.REMAINDER, a, b)


def eq(a, b):
    return _binary(C.EQ, a, b)


def ne(a, b):
    return _binary(C.NE, a, b)


def lt(a, b):
    return _binary(C.LT, a, b)


def le(a, b):
    return _binary(C.LE, a, b)


def gt(a, b):
    return _binary(C.GT, a, b)


def ge(a, b):
    return _binary(C.GE, a, b)


def logical_and(a, b):
    return _binary(C.AND, a, b)


def logical_or(a, b):
    return _binary(C.OR, a, b)


def logical_xor(a, b):
    return _binary(C.XOR, a, b)


def _bitwise_bool(code, a, b):
    for x in (a, b):
        if isinstance(x, Tensor) and x._dtype is not dt.bool_:
            raise TypeError(f"bitwise operators are supported on bool tensors only in cutegrad, got {x._dtype}")
    return _binary(code, a, b)


# --- unary --------------------------------------------------------------------
class _UnaryNode(Node):
    __slots__ = ("code",)

    def __init__(self, code):
        self.code = code

    def backward(self, g):
        code = self.code
        saved = self.saved_tensors
        x = saved[0]
        if code == C.NEG:
            return (neg(g),)
        if code == C.EXP:
            return (mul(g, saved[1]),)
        if code == C.LOG:
            return (div(g, x),)
        if code == C.SQRT:
            return (div(g, mul(saved[1], 2)),)
        if code == C.RSQRT:
            y = saved[1]
            return (mul(g, mul(pow(y, 3), -0.5)),)
        if code == C.ABS:
            return (mul(g, _unary(C.SIGN, x, None)),)
        if code == C.TANH:
            y = saved[1]
            return (mul(g, rsub(mul(y, y), 1)),)
        if code == C.SIGMOID:
            y = saved[1]
            return (mul(g, mul(y, rsub(y, 1))),)
        if code == C.RELU:
            return (where(gt(x, 0), g, 0.0),)  # not g * mask: an inf gradient must give 0, not NaN
        if code in (C.GELU, C.GELU_TANH, C.SILU):
            return (_act_backward(code, g, x),)
        if code == C.SIN:
            return (mul(g, _unary(C.COS, x, None)),)
        if code == C.COS:
            return (neg(mul(g, _unary(C.SIN, x, None))),)
        if code == C.RECIPROCAL:
            y = saved[1]
            return (neg(mul(g, mul(y, y))),)
        if code == C.SQUARE:
            return (mul(g, mul(x, 2)),)
        if code == C.ERF:
            return (mul(g, mul(exp(neg(mul(x, x))), 1.1283791670955126)),)
        if code == C.LOG1P:
            return (div(g, add(x, 1)),)
        if code == C.EXPM1:
            return (mul(g, add(saved[1], 1)),)
        if code in (C.SIGN, C.FLOOR, C.CEIL, C.ROUND, C.TRUNC):
            return (mul(g, 0),)
        raise RuntimeError(f"no derivative for unary code {code}")  # pragma: no cover


class ActBackwardNode(Node):
    """act'(x) * g, differentiable again (for create_graph through gelu/silu)."""
    __slots__ = ("code",)

    def __init__(self, code):
        self.code = code

    def backward(self, gg):
        g, x = self.saved_tensors
        ones = _ones_like(x)
        return (mul(gg, _act_backward(self.code, ones, x)),
                mul(mul(gg, g), _act_second_derivative(self.code, x)))


def _act_second_derivative(code, x):
    if code == C.GELU:
        pdf = mul(exp(mul(mul(x, x), -0.5)), 0.3989422804014327)
        return mul(pdf, rsub(mul(x, x), 2.0))
    if code == C.SILU:
        s = sigmoid(x)
        return mul(mul(s, rsub(s, 1.0)), add(mul(x, rsub(mul(s, 2.0), 1.0)), 2.0))
    k, c = 0.7978845608028654, 0.044715
    t = tanh(mul(add(x, mul(pow(x, 3), c)), k))
    du = mul(add(mul(mul(x, x), 3 * c), 1.0), k)
    d2u = mul(x, 6 * k * c)
    return mul(rsub(mul(t, t), 1.0), add(du, mul(mul(x, 0.5), sub(d2u, mul(mul(t, 2.0), mul(du, du))))))


def _ones_like(x):
    from .creation import ones_like
    return ones_like(x)


def _act_backward(code, g, x):
    return ActBackwardNode.record(_K_ACT_BWD[g._storage.device.backend](code, g, x), (g, x), (g, x), code)


_SAVE_OUT = frozenset((C.EXP, C.SQRT, C.RSQRT, C.TANH, C.SIGMOID, C.RECIPROCAL, C.EXPM1))
_NO_GRAD = frozenset((C.LOGICAL_NOT, C.ISNAN, C.ISINF, C.ISFINITE))
_FLOAT_ONLY = frozenset((C.EXP, C.LOG, C.SQRT, C.RSQRT, C.TANH, C.SIGMOID, C.GELU, C.GELU_TANH,
                         C.SILU, C.SIN, C.COS, C.RECIPROCAL, C.ERF, C.LOG1P, C.EXPM1))
_BOOL_OUT = frozenset((C.LOGICAL_NOT, C.ISNAN, C.ISINF, C.ISFINITE))


def _unary(code, x, name):
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}(): argument 'input' must be Tensor, not {type(x).__name__}")
    xd = x._dtype
    if code in _BOOL_OUT:
        out_dt = dt.bool_
    elif code in _FLOAT_ONLY and not xd.is_floating_point:
        out_dt = dt.get_default_dtype()
    elif code == C.SQUARE and xd is dt.bool_:
        out_dt = dt.int64  # torch's square is pow(x, 2): bool promotes to int64
    else:
        out_dt = xd
        if xd is dt.bool_ and code in (C.NEG,):
            raise RuntimeError("Negation, the `-` operator, on a bool tensor is not supported. "
                               "If you are trying to invert a mask, use the `~` or `logical_not()` operator instead.")
    out = _K_UNARY[x._storage.device.backend](code, x, out_dt)
    if not x._requires_grad or code in _NO_GRAD:
        return out
    if code in _SAVE_OUT:
        return _UnaryNode.record(out, (x,), (x,), code, save_output=True)
    return _UnaryNode.record(out, (x,), (x,), code)


def neg(input):
    return _unary(C.NEG, input, "neg")


def exp(input):
    return _unary(C.EXP, input, "exp")


def log(input):
    return _unary(C.LOG, input, "log")


def sqrt(input):
    return _unary(C.SQRT, input, "sqrt")


def rsqrt(input):
    return _unary(C.RSQRT, input, "rsqrt")


def abs(input):
    return _unary(C.ABS, input, "abs")


def tanh(input):
    return _unary(C.TANH, input, "tanh")


def sigmoid(input):
    return _unary(C.SIGMOID, input, "sigmoid")


def relu(input, inplace=False):
    if inplace:
        from .inplace import relu_
        return relu_(input)
    return _unary(C.RELU, input, "relu")


def gelu(input, approximate="none"):
    if approximate == "none":
        return _unary(C.GELU, input, "gelu")
    if approximate == "tanh":
        return _unary(C.GELU_TANH, input, "gelu")
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def silu(input, inplace=False):
    out = _unary(C.SILU, input, "silu")
    if inplace:
        from .inplace import copy_
        return copy_(input, out)
    return out


def sign(input):
    return _unary(C.SIGN, input, "sign")


def sin(input):
    return _unary(C.SIN, input, "sin")


def cos(input):
    return _unary(C.COS, input, "cos")


def reciprocal(input):
    return _unary(C.RECIPROCAL, input, "reciprocal")


def square(input):
    return _unary(C.SQUARE, input, "square")


def erf(input):
    return _unary(C.ERF, input, "erf")


def log1p(input):
    return _unary(C.LOG1P, input, "log1p")


def expm1(input):
    return _unary(C.EXPM1, input, "expm1")


def floor(input):
    return _unary(C.FLOOR, input, "floor")


def ceil(input):
    return _unary(C.CEIL, input, "ceil")


def round(input):
    return _unary(C.ROUND, input, "round")


def trunc(input):
    return _unary(C.TRUNC, input, "trunc")


def logical_not(input):
    return _unary(C.LOGICAL_NOT, input, "logical_not")


def isnan(input):
    return _unary(C.ISNAN, input, "isnan")


def isinf(input):
    return _unary(C.ISINF, input, "isinf")


def isfinite(input):
    return _unary(C.ISFINITE, input, "isfinite")


# --- where / clamp / masked_fill -------------------------------------------------
class WhereBackward(Node):
    __slots__ = ("a_meta", "b_meta")

    def __init__(self, input, other):
        self.a_meta = (input._shape, input._dtype) if isinstance(input, Tensor) else None
        self.b_meta = (other._shape, other._dtype) if isinstance(other, Tensor) else None

    def backward(self, g):
        (cond,) = self.saved_tensors
        out = []
        if self.a_meta is not None:
            out.append(_grad_to(where(cond, g, 0.0), *self.a_meta))
        if self.b_meta is not None:
            out.append(_grad_to(where(cond, 0.0, g), *self.b_meta))
        return tuple(out)


def where(condition, input, other):
    if not isinstance(condition, Tensor):
        raise TypeError("where(): condition must be a Tensor")
    if condition._dtype is not dt.bool_:
        raise RuntimeError(f"where expected condition to be a boolean tensor, but got a tensor with dtype {condition._dtype}")
    shapes = [condition._shape] + [x._shape for x in (input, other) if isinstance(x, Tensor)]
    for x in (input, other):
        if isinstance(x, Tensor) and x._storage.device is not condition._storage.device and x._shape:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{condition.device} and {x.device}!")
    shape = broadcast_shapes(*shapes)
    out_dt = dt.result_type(input, other)
    out = _K_WHERE[condition._storage.device.backend](condition, input, other, out_dt)
    if out._shape != shape:
        from .shape import expand
        out = expand(out, shape).contiguous()
    return WhereBackward.record(out, [x for x in (input, other) if isinstance(x, Tensor)], (condition,), input, other)


class ClampBackward(Node):
    __slots__ = ("lo", "hi")

    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi

    def backward(self, g):
        (x,) = self.saved_tensors
        keep = None
        if self.lo is not None:
            keep = ge(x, self.lo)
        if self.hi is not None:
            k2 = le(x, self.hi)
            keep = k2 if keep is None else logical_and(keep, k2)
        return (where(keep, g, 0.0),)


def clamp(input, min=None, max=None):
    x = input
    if min is None and max is None:
        raise RuntimeError("torch.clamp: At least one of 'min' or 'max' must not be None")
    for v in (min, max):
        if isinstance(v, Tensor):
            raise TypeError("clamp with tensor bounds: use maximum()/minimum()")
    out_dt = dt.result_type(x, *(v for v in (min, max) if v is not None))
    return ClampBackward.record(_K_CLAMP[x._storage.device.backend](x, min, max, out_dt), (x,), (x,), min, max)


def masked_fill(x, mask, value):
    if not isinstance(mask, Tensor) or mask._dtype is not dt.bool_:
        raise RuntimeError(f"masked_fill only supports boolean masks, but got mask with dtype "
                           f"{getattr(mask, '_dtype', type(mask).__name__)}")
    broadcast_shapes(x._shape, mask._shape)
    if isinstance(value, Tensor):
        if value._shape:
            raise RuntimeError(f"masked_fill only supports a 0-dimensional value tensor, but got tensor with "
                               f"{len(value._shape)} dimension(s).")
        if not (value._requires_grad and _state.enabled):  # keep it a tensor only when its gradient is needed
            value = value.item()
    out = where(mask, value, x)
    if out._dtype is not x._dtype:
        out = out.to(x._dtype)
    return out


def clamp_min(x, min):
    return clamp(x, min=min)


def clamp_max(x, max):
    return clamp(x, max=max)


_LN2, _LN10 = 0.6931471805599453, 2.302585092994046


def log2(x):
    return div(log(x), _LN2)


def log10(x):
    return div(log(x), _LN10)


def lerp(start, end, weight):
    """start + weight * (end - start)."""
    return add(start, mul(sub(end, start), weight))


def addcmul(x, tensor1, tensor2, value=1):
    return add(x, mul(mul(tensor1, tensor2), value) if value != 1 else mul(tensor1, tensor2))


def addcdiv(x, tensor1, tensor2, value=1):
    return add(x, mul(div(tensor1, tensor2), value) if value != 1 else div(tensor1, tensor2))


def isclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    """|a - b| <= atol + rtol * |b| elementwise; equal infinities are close, as torch."""
    close = logical_or(eq(a, b), le(abs(sub(a, b)), add(mul(abs(b), rtol), atol)))
    if equal_nan:
        close = logical_or(close, logical_and(isnan(a), isnan(b)))
    return close


def allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    return bool(isclose(a, b, rtol, atol, equal_nan).all())


def equal(a, b):
    """True when a and b have the same shape and the same elements."""
    return a._shape == b._shape and bool(eq(a, b).all())
