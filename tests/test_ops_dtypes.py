"""dtypes and PyTorch's type-promotion rules: a hand-written table of the
rules that matter (wrapped Python scalars, 0-dim tensors, categories), and
the full table checked against torch.result_type when torch is installed."""
import numpy as np
import pytest

import cutegrad as cg

try:
    import torch
except ImportError:  # CI installs it; without it only the hand-written table runs
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

D = cg.zeros  # dimensioned tensor of a dtype: D(2, dtype=...)


def Z(dtype):
    """0-dim tensor of a dtype."""
    return cg.zeros((), dtype=dtype)


RULES = [
    # (operands, expected) -- straight from PyTorch's documented rules
    ((D(2, dtype=cg.int32), 5), cg.int32),  # int scalar does not widen an int tensor
    ((D(2, dtype=cg.int32), 2.5), cg.float32),  # float scalar lifts to the default float
    ((D(2, dtype=cg.float16), 2.5), cg.float16),  # ... but not a float tensor
    ((D(2, dtype=cg.bool), 3), cg.int64),
    ((D(2, dtype=cg.bool), True), cg.bool),
    ((D(2, dtype=cg.uint8), D(2, dtype=cg.int8)), cg.int16),
    ((D(2, dtype=cg.float16), D(2, dtype=cg.bfloat16)), cg.float32),
    ((D(2, dtype=cg.int64), D(2, dtype=cg.float16)), cg.float16),
    ((D(2, dtype=cg.int8), Z(cg.int64)), cg.int8),  # a 0-dim tensor of the same category does not widen
    ((D(2, dtype=cg.int8), Z(cg.float64)), cg.float64),  # ... a higher category takes the 0-dim dtype
    ((D(2, dtype=cg.float16), Z(cg.float64)), cg.float16),
    ((Z(cg.float16), 1.5), cg.float16),
    ((Z(cg.int32), Z(cg.float16)), cg.float16),
    ((Z(cg.int32), 2.5), cg.float32),
    ((Z(cg.bool), D(2, dtype=cg.uint8)), cg.uint8),
    ((D(2, dtype=cg.uint8), -1), cg.uint8),
]


@pytest.mark.parametrize("operands,expected", RULES, ids=range(len(RULES)))
def test_promotion_rules(operands, expected):
    assert cg.result_type(*operands) is expected
    if any(isinstance(o, cg.Tensor) for o in operands):
        assert (operands[0] + operands[1]).dtype is expected
        assert (operands[1] * operands[0]).dtype is expected


def test_promotion_follows_default_dtype():
    cg.set_default_dtype(cg.float64)
    assert cg.result_type(D(2, dtype=cg.int32), 2.5) is cg.float64
    assert (cg.tensor([1, 2]) / 2).dtype is cg.float64


def test_division_and_comparison_output_dtypes():
    assert (cg.tensor([1, 2]) / cg.tensor([2, 2])).dtype is cg.float32
    assert (cg.tensor([1, 2], dtype=cg.int8) // 2).dtype is cg.int8
    assert (cg.tensor([1.0], dtype=cg.bfloat16) < 2).dtype is cg.bool
    assert cg.promote_types(cg.int32, cg.float16) is cg.float16


def test_dtype_names_and_numpy_mapping():
    from cutegrad import dtypes
    assert dtypes.from_name("bf16") is cg.bfloat16 and dtypes.from_name("half") is cg.float16
    with pytest.raises(TypeError, match="unknown dtype"):
        dtypes.from_name("complex64")
    assert dtypes.from_numpy_dtype(np.int16) is cg.int16
    with pytest.raises(TypeError, match="no cutegrad equivalent"):
        dtypes.from_numpy_dtype(np.complex64)


# --- the full table against torch --------------------------------------------
DTYPE_NAMES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]


def _operand(kind, name):
    """(cutegrad operand, torch operand) of a kind: dimensioned, 0-dim, or Python scalar."""
    if kind == "dim":
        return cg.zeros(2, dtype=getattr(cg, name)), torch.zeros(2, dtype=getattr(torch, name))
    if kind == "zero":
        return cg.zeros((), dtype=getattr(cg, name)), torch.zeros((), dtype=getattr(torch, name))
    value = {"bool": True, "int": 3, "float": 2.5}[name]
    return value, value


KINDS = [("dim", n) for n in DTYPE_NAMES] + [("zero", n) for n in DTYPE_NAMES] + \
    [("scalar", "bool"), ("scalar", "int"), ("scalar", "float")]


@needs_torch
@pytest.mark.parametrize("a", KINDS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_result_type_matches_torch(a):
    ca, ta = _operand(*a)
    for b in KINDS:
        if a[0] == "scalar" and b[0] == "scalar":
            continue
        cb, tb = _operand(*b)
        want = str(torch.result_type(ta, tb)).replace("torch.", "")
        assert cg.result_type(ca, cb).name == want, f"{a} with {b}"


@needs_torch
@pytest.mark.parametrize("a", [k for k in KINDS if k[0] != "scalar"], ids=lambda k: f"{k[0]}-{k[1]}")
def test_binary_op_output_dtype_matches_torch(a):
    ca, ta = _operand(*a)
    for b in KINDS:
        cb, tb = _operand(*b)
        for name in ("add", "mul", "div", "maximum", "lt"):
            if name == "maximum" and b[0] == "scalar":
                continue  # torch.maximum takes tensors only
            try:
                want = getattr(torch, name)(ta, tb).dtype
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    getattr(cg, name)(ca, cb)
                continue
            got = getattr(cg, name)(ca, cb).dtype
            assert got.name == str(want).replace("torch.", ""), f"{name}({a}, {b})"


@needs_torch
def test_promote_types_table_matches_torch():
    for a in DTYPE_NAMES:
        for b in DTYPE_NAMES:
            want = str(torch.promote_types(getattr(torch, a), getattr(torch, b))).replace("torch.", "")
            assert cg.promote_types(getattr(cg, a), getattr(cg, b)).name == want, (a, b)


@needs_torch
def test_unary_and_reduction_output_dtypes_match_torch():
    for name in DTYPE_NAMES:
        ct, tt = cg.ones(3, dtype=getattr(cg, name)), torch.ones(3, dtype=getattr(torch, name))
        for op in ("exp", "sqrt", "sigmoid", "abs", "sum", "prod", "floor", "any", "all", "cumsum", "mean", "amax"):
            try:
                want = getattr(torch, op)(tt).dtype
            except (RuntimeError, TypeError):
                continue
            assert getattr(cg, op)(ct).dtype.name == str(want).replace("torch.", ""), (op, name)


UNARY_NAMES = ["neg", "exp", "log", "sqrt", "rsqrt", "abs", "tanh", "sigmoid", "relu", "sign", "sin", "cos",
               "reciprocal", "square", "erf", "log1p", "expm1", "floor", "ceil", "round", "trunc", "isnan", "isinf",
               "isfinite", "logical_not", "log2", "log10"]


@needs_torch
@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_unary_ops_on_every_dtype_match_torch(name):
    a = np.array([-2.0, -1.0, 0.0, 1.0, 3.0])
    arr = a > 0 if name == "bool" else (np.abs(a) if name == "uint8" else a)
    ct, tt = cg.tensor(arr, dtype=getattr(cg, name)), torch.from_numpy(arr).to(getattr(torch, name))
    for op in UNARY_NAMES:
        try:
            want = getattr(torch, op)(tt)
        except (RuntimeError, TypeError):
            continue  # torch refuses this dtype; cutegrad may be more lenient
        got = getattr(cg, op)(ct)
        assert got.dtype.name == str(want.dtype).replace("torch.", ""), op
        np.testing.assert_allclose(got.to(cg.float64).numpy(), want.to(torch.float64).numpy(), rtol=1e-2, atol=1e-2,
                                   equal_nan=True, err_msg=op)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float64_to_16_bit_rounds_through_float32_as_torch(dtype):
    # Just above a float32-exact tie: rounding once goes up, through float32 (torch) goes to even.
    x = [1 + 2.0 ** -11 + 2.0 ** -40, 1 + 2.0 ** -8 + 2.0 ** -30, -97.75 - 2.0 ** -35]
    got = cg.tensor(x, dtype=cg.float64).to(getattr(cg, dtype)).double().tolist()
    torch = pytest.importorskip("torch")
    expect = torch.tensor(x, dtype=torch.float64).to(getattr(torch, dtype)).double().tolist()
    assert got == expect


# Just above a float32-exact tie, rounding once and rounding through float32 differ.
# Written out so that a new NumPy or ml_dtypes release that changes its own casts
# (ml_dtypes 0.7 rounds float64 -> bfloat16 once) fails here, with or without torch.
_ABOVE_TIE = {
    "float16": ([1 + 2.0 ** -11 + 2.0 ** -40, -97.75 - 2.0 ** -35], [1.0, -97.75]),
    "bfloat16": ([1 + 2.0 ** -8 + 2.0 ** -30, -97.75 - 2.0 ** -35], [1.0, -98.0]),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_host_conversion_to_16_bit_rounds_through_float32(dtype):
    x, expect = _ABOVE_TIE[dtype]
    d = getattr(cg, dtype)
    made = {
        "tensor(list)": cg.tensor(x, dtype=d),
        "tensor(float64 array)": cg.tensor(np.array(x), dtype=d),
        "cast": cg.tensor(x, dtype=cg.float64).to(d),
        "full": cg.stack([cg.full((1,), v, dtype=d) for v in x]).reshape(-1),
        "cat": cg.cat([cg.tensor(x, dtype=cg.float64).to(d)]),
    }
    for how, t in made.items():
        assert t.dtype is d, how
        assert t.double().tolist() == expect, how
    step = x[0] - 1.0
    assert cg.arange(1.0, 1.0 + 1.5 * step, step, dtype=d).double().tolist() == [1.0, 1.0]
