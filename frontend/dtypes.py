"""dtypes and PyTorch's type-promotion rules.

A DType is a small immutable object; `index` makes promotion a table lookup so
the hot path of every binary op does no dict work or string formatting.
"""
import numpy as np
import ml_dtypes

BOOL, INT, FLOAT = 0, 1, 2  # promotion categories, in order


class DType:
    __slots__ = ("name", "np", "itemsize", "category", "index", "is_floating_point", "is_signed")

    def __init__(self, name, np_dtype, category, index, signed=True):
        self.name = name
        self.np = np.dtype(np_dtype)
        self.itemsize = self.np.itemsize
        self.category = category
        self.index = index
        self.is_floating_point = category == FLOAT
        self.is_signed = signed

    def __repr__(self):
        return "cutegrad." + self.name

    def __reduce__(self):
        return (_by_name, (self.name,))

    def to_real(self):
        return self


bool_ = DType("bool", np.bool_, BOOL, 0, signed=False)
uint8 = DType("uint8", np.uint8, INT, 1, signed=False)
int8 = DType("int8", np.int8, INT, 2)
int16 = DType("int16", np.int16, INT, 3)
int32 = DType("int32", np.int32, INT, 4)
int64 = DType("int64", np.int64, INT, 5)
float16 = DType("float16", np.float16, FLOAT, 6)
bfloat16 = DType("bfloat16", ml_dtypes.bfloat16, FLOAT, 7)
float32 = DType("float32", np.float32, FLOAT, 8)
float64 = DType("float64", np.float64, FLOAT, 9)

ALL = (bool_, uint8, int8, int16, int32, int64, float16, bfloat16, float32, float64)

_NAMES = {d.name: d for d in ALL}
_NAMES.update({"half": float16, "float": float32, "double": float64, "long": int64,
               "int": int32, "short": int16, "bf16": bfloat16, "fp16": float16,
               "fp32": float32, "fp64": float64})
_FROM_NP = {d.np: d for d in ALL}


def _by_name(name):
    return _NAMES[name]


def from_name(name):
    """'bf16', 'float32', ... -> DType; raises naming the unknown dtype."""
    d = _NAMES.get(name)
    if d is None:
        raise TypeError(f"unknown dtype {name!r}; expected one of {sorted(_NAMES)}")
    return d


def from_numpy_dtype(npd):
    d = _FROM_NP.get(np.dtype(npd))
    if d is None:
        raise TypeError(f"numpy dtype {np.dtype(npd)} has no cutegrad equivalent")
    return d


_F32 = np.dtype(np.float32)


def to_numpy(values, dtype):
    """Values (array or number) as a NumPy array of dtype, converted as PyTorch does.

    PyTorch converts anything wider than float32 to float16/bfloat16 through
    float32, rounding twice; NumPy and ml_dtypes >= 0.7 round once, which gives a
    different bfloat16 just above a float32-exact tie.  Every host conversion
    into a tensor's dtype goes through here so both backends agree with torch.
    """
    if dtype is float16 or dtype is bfloat16:
        arr = np.asarray(values)
        if arr.dtype != dtype.np and arr.dtype != _F32:
            arr = arr.astype(_F32)
        return arr.astype(dtype.np, copy=False)
    return np.asarray(values, dtype=dtype.np)


def _promote_pair(a, b):
    if a is b:
        return a
    if a.category != b.category:
        return a if a.category > b.category else b
    if a.category == FLOAT:
        if {a, b} == {float16, bfloat16}:
            return float32
        return a if a.index > b.index else b
    if a.category == INT:
        if {a, b} == {uint8, int8}:
            return int16
        if uint8 in (a, b):
            return b if a is uint8 else a
        return a if a.index > b.index else b
    return a


_PROMOTE = [[_promote_pair(a, b) for b in ALL] for a in ALL]


def promote_types(a, b):
    return _PROMOTE[a.index][b.index]


def _combine_categories(higher, lower):
    # PyTorch's combine_categories: a lower-priority participant only changes
    # the result when it is of a higher category (e.g. int tensor + 2.5).
    if higher is None:
        return lower
    if lower is None:
        return higher
    if higher.category == FLOAT:
        return higher
    if higher is bool_ or lower.category == FLOAT:
        return _PROMOTE[higher.index][lower.index]
    return higher


def scalar_dtype(value):
    """dtype a Python scalar takes as a 'wrapped number' in promotion."""
    if isinstance(value, bool):
        return bool_
    if isinstance(value, (int, np.integer)):
        return int64
    return _default_dtype


def result_type(*operands):
    """PyTorch's result_type over tensors (dimensioned and 0-dim) and scalars."""
    dim = zero = wrapped = None
    for x in operands:
        dt = getattr(x, "_dtype", None)
        if dt is None:
            d = scalar_dtype(x)
            wrapped = d if wrapped is None else _PROMOTE[wrapped.index][d.index]
        elif x._shape:
            dim = dt if dim is None else _PROMOTE[dim.index][dt.index]
        else:
            zero = dt if zero is None else _PROMOTE[zero.index][dt.index]
    return _combine_categories(dim, _combine_categories(zero, wrapped))


_default_dtype = float32


def get_default_dtype():
    return _default_dtype


def set_default_dtype(d):
    global _default_dtype
    if not d.is_floating_point:
        raise TypeError(f"default dtype must be floating point, got {d}")
    _default_dtype = d
