"""The Tensor method surface, bound to the ops in one place (PyTorch names)."""
import types

from . import ops
from . import dtypes as dt
from .tensor import Tensor
from .ops import codes as C
from .ops import pointwise as P


def _method(fn):
    def m(self, *args, **kwargs):
        return fn(self, *args, **kwargs)
    m.__name__ = fn.__name__
    m.__doc__ = fn.__doc__
    return m


_PLAIN = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
          "logical_and", "logical_or", "logical_xor", "logical_not", "neg", "exp", "log", "sqrt", "rsqrt", "abs",
          "tanh", "sigmoid", "relu", "sign", "sin", "cos", "reciprocal", "square", "erf", "log1p", "expm1",
          "floor", "ceil", "round", "trunc", "isnan", "isinf", "isfinite", "clamp", "masked_fill", "floor_divide",
          "remainder", "add_", "sub_", "mul_", "div_", "pow_", "masked_fill_", "clamp_", "relu_", "neg_", "exp_",
          "sqrt_", "tanh_", "sigmoid_", "copy_", "fill_", "zero_", "index_put_", "sum", "mean", "amax", "amin",
          "argmax", "argmin", "any", "all", "prod", "var", "std", "logsumexp", "view", "reshape", "flatten",
          "unflatten", "permute", "transpose", "t", "movedim", "expand", "expand_as", "broadcast_to", "unsqueeze",
          "squeeze", "as_strided", "narrow", "select", "split", "chunk", "unbind", "repeat", "gather",
          "scatter_add", "index_select", "index_add", "matmul", "mm", "bmm", "softmax", "log_softmax", "to",
          "clone", "contiguous", "uniform_", "normal_", "clamp_min", "clamp_max", "log2", "log10", "lerp",
          "addcmul", "addcdiv", "isclose", "allclose", "equal", "abs_", "log_", "rsqrt_", "lerp_", "addcmul_",
          "addcdiv_", "norm", "flip", "nonzero", "masked_select", "outer", "sort", "argsort", "topk", "cumsum",
          "tril", "triu", "var_mean", "std_mean", "multinomial"]

# Plain functions bind as methods by themselves (x.exp() calls ops.exp(x));
# a wrapper would cost one more Python frame on every method call.
for _name in _PLAIN:
    _fn = getattr(ops, _name)
    setattr(Tensor, _name, _fn if isinstance(_fn, types.FunctionType) else _method(_fn))

Tensor.max = _method(ops.max)
Tensor.min = _method(ops.min)
Tensor.clip = Tensor.clamp
Tensor.absolute = Tensor.abs
Tensor.multiply = Tensor.mul
Tensor.true_divide = Tensor.div
Tensor.where = lambda self, condition, other: ops.where(condition, self, other)
Tensor.type_as = lambda self, other: ops.to_dtype(self, other._dtype)
Tensor.view_as = lambda self, other: ops.view(self, other._shape)
Tensor.reshape_as = lambda self, other: ops.reshape(self, other._shape)
Tensor.gelu = lambda self, approximate="none": ops.gelu(self, approximate)
Tensor.silu = _method(ops.silu)
Tensor.cpu = lambda self: ops.to_device(self, "cpu")
Tensor.cuda = lambda self, device=None, non_blocking=False: ops.to_device(
    self, "cuda" if device is None else (f"cuda:{device}" if isinstance(device, int) else device), non_blocking)
Tensor.float = lambda self: ops.to_dtype(self, dt.float32)
Tensor.double = lambda self: ops.to_dtype(self, dt.float64)
Tensor.half = lambda self: ops.to_dtype(self, dt.float16)
Tensor.bfloat16 = lambda self: ops.to_dtype(self, dt.bfloat16)
Tensor.long = lambda self: ops.to_dtype(self, dt.int64)
Tensor.int = lambda self: ops.to_dtype(self, dt.int32)
Tensor.bool = lambda self: ops.to_dtype(self, dt.bool_)
Tensor.byte = lambda self: ops.to_dtype(self, dt.uint8)
Tensor.new_zeros = lambda self, *size, dtype=None, device=None: ops.zeros(
    *size, dtype=dtype or self._dtype, device=device or self._storage.device)
Tensor.new_ones = lambda self, *size, dtype=None, device=None: ops.ones(
    *size, dtype=dtype or self._dtype, device=device or self._storage.device)
Tensor.new_full = lambda self, size, value, dtype=None, device=None: ops.full(
    size, value, dtype=dtype or self._dtype, device=device or self._storage.device)
Tensor.new_empty = lambda self, *size, dtype=None, device=None: ops.empty(
    *size, dtype=dtype or self._dtype, device=device or self._storage.device)
Tensor.new_tensor = lambda self, data, dtype=None, device=None: ops.tensor(
    data, dtype=dtype or self._dtype, device=device or self._storage.device)
Tensor.__getitem__ = ops.getitem
Tensor.__setitem__ = ops.setitem

# Operators call the binary core directly: one Python frame less per op.
_binary = P._binary
Tensor.__add__ = lambda a, b: _binary(C.ADD, a, b)
Tensor.__radd__ = lambda a, b: _binary(C.ADD, b, a)
Tensor.__sub__ = lambda a, b: _binary(C.SUB, a, b)
Tensor.__rsub__ = lambda a, b: _binary(C.SUB, b, a)
Tensor.__mul__ = lambda a, b: _binary(C.MUL, a, b)
Tensor.__rmul__ = lambda a, b: _binary(C.MUL, b, a)
Tensor.__truediv__ = lambda a, b: _binary(C.DIV, a, b)
Tensor.__rtruediv__ = lambda a, b: _binary(C.DIV, b, a)
Tensor.__floordiv__ = lambda a, b: ops.floor_divide(a, b)
Tensor.__rfloordiv__ = lambda a, b: ops.floor_divide(b, a)
Tensor.__mod__ = lambda a, b: ops.remainder(a, b)
Tensor.__pow__ = lambda a, b: ops.pow(a, b)
Tensor.__rpow__ = lambda a, b: ops.pow(b, a)
Tensor.__matmul__ = lambda a, b: ops.matmul(a, b)
Tensor.__rmatmul__ = lambda a, b: ops.matmul(b, a)
Tensor.__neg__ = lambda a: ops.neg(a)
Tensor.__pos__ = lambda a: a
Tensor.__abs__ = lambda a: ops.abs(a)
Tensor.__invert__ = lambda a: ops.logical_not(a) if a._dtype is dt.bool_ else _no_bitwise(a)
Tensor.__and__ = lambda a, b: P._bitwise_bool(C.AND, a, b)
Tensor.__or__ = lambda a, b: P._bitwise_bool(C.OR, a, b)
Tensor.__xor__ = lambda a, b: P._bitwise_bool(C.XOR, a, b)
Tensor.__rand__ = lambda a, b: P._bitwise_bool(C.AND, b, a)
Tensor.__ror__ = lambda a, b: P._bitwise_bool(C.OR, b, a)
Tensor.__eq__ = lambda a, b: ops.eq(a, b)
Tensor.__ne__ = lambda a, b: ops.ne(a, b)
Tensor.__lt__ = lambda a, b: ops.lt(a, b)
Tensor.__le__ = lambda a, b: ops.le(a, b)
Tensor.__gt__ = lambda a, b: ops.gt(a, b)
Tensor.__ge__ = lambda a, b: ops.ge(a, b)
Tensor.__hash__ = object.__hash__


def _iop(fn):
    def m(self, other):
        return fn(self, other)
    return m


Tensor.__iadd__ = _iop(ops.add_)
Tensor.__isub__ = _iop(ops.sub_)
Tensor.__imul__ = _iop(ops.mul_)
Tensor.__itruediv__ = _iop(ops.div_)


def _no_bitwise(a):
    raise TypeError(f"~ is supported on bool tensors only in cutegrad, got {a._dtype}")


Tensor.T = property(lambda self: ops.permute(self, tuple(reversed(range(len(self._shape))))))
Tensor.mT = property(lambda self: ops.transpose(self, -2, -1))


def _record_stream(self, stream):
    """Mark this CUDA tensor's memory as in use by `stream` (see cutegrad.cuda)."""
    from . import cuda
    cuda.record_stream(self, stream)


Tensor.record_stream = _record_stream
Tensor.unique = _method(ops.unique)
