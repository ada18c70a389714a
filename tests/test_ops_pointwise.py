"""Elementwise ops against a float64 NumPy reference: every float dtype, shapes
with 1s, odd sizes and 0-dim tensors, broadcasting, Python-scalar operands."""
import zlib

import numpy as np
import pytest

import cutegrad as cg
from core_harness import (FLOAT_DTYPES, SHAPES, BROADCAST_PAIRS, erf64, rand, tensor, f64, assert_close,
                          random_shape)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


GELU_K = np.sqrt(2.0 / np.pi)

# name -> (cutegrad fn, float64 reference, (low, high) input domain)
UNARY = {
    "neg": (cg.neg, np.negative, (-2, 2)),
    "exp": (cg.exp, np.exp, (-3, 3)),
    "log": (cg.log, np.log, (0.1, 4)),
    "sqrt": (cg.sqrt, np.sqrt, (0.1, 4)),
    "rsqrt": (cg.rsqrt, lambda x: 1 / np.sqrt(x), (0.1, 4)),
    "abs": (cg.abs, np.abs, (-2, 2)),
    "tanh": (cg.tanh, np.tanh, (-3, 3)),
    "sigmoid": (cg.sigmoid, _sigmoid, (-6, 6)),
    "relu": (cg.relu, lambda x: np.maximum(x, 0), (-2, 2)),
    "gelu": (cg.gelu, lambda x: 0.5 * x * (1 + erf64(x / np.sqrt(2))), (-4, 4)),
    "gelu_tanh": (lambda t: cg.gelu(t, approximate="tanh"),
                  lambda x: 0.5 * x * (1 + np.tanh(GELU_K * (x + 0.044715 * x ** 3))), (-4, 4)),
    "silu": (cg.silu, lambda x: x * _sigmoid(x), (-6, 6)),
    "sin": (cg.sin, np.sin, (-3, 3)),
    "cos": (cg.cos, np.cos, (-3, 3)),
    "reciprocal": (cg.reciprocal, lambda x: 1 / x, (0.2, 3)),
    "square": (cg.square, np.square, (-2, 2)),
    "erf": (cg.erf, erf64, (-3.5, 3.5)),
    "log1p": (cg.log1p, np.log1p, (-0.5, 3)),
    "expm1": (cg.expm1, np.expm1, (-2, 2)),
    "floor": (cg.floor, np.floor, (-3, 3)),
    "ceil": (cg.ceil, np.ceil, (-3, 3)),
    "trunc": (cg.trunc, np.trunc, (-3, 3)),
    "sign": (cg.sign, np.sign, (-2, 2)),
}

BINARY = {
    "add": (cg.add, np.add, None),
    "sub": (cg.sub, np.subtract, None),
    "mul": (cg.mul, np.multiply, None),
    "div": (cg.div, np.divide, (0.5, 2)),
    "pow": (cg.pow, np.power, "pow"),
    "maximum": (cg.maximum, np.maximum, None),
    "minimum": (cg.minimum, np.minimum, None),
}

COMPARE = {"eq": (cg.eq, np.equal), "ne": (cg.ne, np.not_equal), "lt": (cg.lt, np.less),
           "le": (cg.le, np.less_equal), "gt": (cg.gt, np.greater), "ge": (cg.ge, np.greater_equal)}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_matches_float64_reference(name, dtype):
    fn, ref, (lo, hi) = UNARY[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for shape in SHAPES + [random_shape(rng)]:
        x = rand(rng, shape, dtype, lo, hi)
        out = fn(tensor(x, dtype))
        assert out.dtype is dtype and out.shape == shape
        assert_close(out, ref(x), dtype, what=f"{name}{shape}")


def test_round_is_half_to_even_like_torch():
    x = tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.4999])
    assert f64(cg.round(x)).tolist() == [-2, -2, -0, 0, 2, 2, 0]


def _binary_inputs(name, rng, sa, sb, dtype):
    dom = BINARY[name][2]
    if dom == "pow":
        return rand(rng, sa, dtype, 0.2, 2.0), rand(rng, sb, dtype, -2.0, 2.0)
    if dom is not None:
        a = rand(rng, sa, dtype)
        b = rand(rng, sb, dtype, *dom) * np.where(rng.random(sb) < 0.5, -1, 1)
        return a, b
    return rand(rng, sa, dtype), rand(rng, sb, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_broadcasting_matches_float64_reference(name, dtype):
    fn, ref, _ = BINARY[name]
    rng = np.random.default_rng(len(name))
    for sa, sb in BROADCAST_PAIRS + [(b, a) for a, b in BROADCAST_PAIRS]:
        a, b = _binary_inputs(name, rng, sa, sb, dtype)
        out = fn(tensor(a, dtype), tensor(b, dtype))
        assert out.dtype is dtype
        assert_close(out, ref(a, b), dtype, what=f"{name}{sa}x{sb}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_with_python_scalar_keeps_tensor_dtype(name, dtype):
    fn, ref, _ = BINARY[name]
    rng = np.random.default_rng(7)
    a = rand(rng, (3, 5), dtype, 0.2, 2.0)
    for s in (3, 0.75, -1.25):
        if name == "pow" and s == -1.25:
            continue
        out = fn(tensor(a, dtype), s)
        assert out.dtype is dtype
        assert_close(out, ref(a, s), dtype, what=f"{name}(t, {s})")
        out = fn(s, tensor(a, dtype))
        assert out.dtype is dtype
        assert_close(out, ref(s, a), dtype, what=f"{name}({s}, t)")


def test_operators_match_named_ops():
    rng = np.random.default_rng(3)
    a, b = rand(rng, (4, 3), cg.float32, 0.5, 2), rand(rng, (3,), cg.float32, 0.5, 2)
    ta, tb = tensor(a, cg.float32), tensor(b, cg.float32)
    for got, want in [(ta + tb, a + b), (ta - tb, a - b), (ta * tb, a * b), (ta / tb, a / b), (ta ** tb, a ** b),
                      (2 - ta, 2 - a), (2 / ta, 2 / a), (2 ** ta, 2 ** a), (-ta, -a), (abs(-ta), a),
                      (ta // tb, a // b), (ta % tb, np.mod(a, b))]:
        assert_close(got, want, cg.float32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64, cg.int32), ids=str)
@pytest.mark.parametrize("name", sorted(COMPARE))
def test_comparisons_exact_with_ties(name, dtype):
    fn, ref = COMPARE[name]
    rng = np.random.default_rng(11)
    for sa, sb in BROADCAST_PAIRS:
        a = rng.integers(-2, 3, size=sa).astype(np.float64)  # small ints: many ties
        b = rng.integers(-2, 3, size=sb).astype(np.float64)
        out = fn(tensor(a, dtype), tensor(b, dtype))
        assert out.dtype is cg.bool
        np.testing.assert_array_equal(out.numpy(), ref(a, b))
        np.testing.assert_array_equal(fn(tensor(a, dtype), 1).numpy(), ref(a, 1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_clamp(dtype):
    rng = np.random.default_rng(5)
    x = rand(rng, (6, 7), dtype, -3, 3)
    t = tensor(x, dtype)
    assert_close(cg.clamp(t, -1.0, 0.5), np.clip(x, -1.0, 0.5), dtype)
    assert_close(cg.clamp(t, min=0.25), np.maximum(x, 0.25), dtype)
    assert_close(cg.clamp(t, max=-0.5), np.minimum(x, -0.5), dtype)
    assert_close(t.clip(-1, 1), np.clip(x, -1, 1), dtype)
    assert cg.clamp(t, -1, 1).dtype is dtype


def test_clamp_int_tensor_with_float_bound_promotes():
    out = cg.clamp(cg.tensor([-3, 0, 3]), min=-1.5)
    assert out.dtype is cg.float32
    assert out.tolist() == [-1.5, 0.0, 3.0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_where_broadcasts_condition_and_operands(dtype):
    rng = np.random.default_rng(6)
    cond = rng.random((4, 1, 5)) < 0.5
    a, b = rand(rng, (3, 5), dtype), rand(rng, (4, 3, 1), dtype)
    out = cg.where(cg.tensor(cond), tensor(a, dtype), tensor(b, dtype))
    assert out.shape == (4, 3, 5) and out.dtype is dtype
    assert_close(out, np.where(cond, a, b), dtype)
    out = cg.where(cg.tensor(cond), tensor(a, dtype), 0.0)
    assert out.dtype is dtype
    assert_close(out, np.where(cond, a, 0.0), dtype)


def test_where_scalar_branches_broadcast_to_condition():
    cond = cg.tensor([[True, False, True]])
    out = cg.where(cond, 1.0, 0.0)
    assert out.shape == (1, 3) and out.dtype is cg.float32
    assert out.tolist() == [[1.0, 0.0, 1.0]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_masked_fill(dtype):
    rng = np.random.default_rng(8)
    x = rand(rng, (3, 4, 5), dtype)
    mask = rng.random((4, 1)) < 0.5
    out = cg.masked_fill(tensor(x, dtype), cg.tensor(mask), -7.5)
    assert out.dtype is dtype and out.shape == x.shape
    assert_close(out, np.where(mask, -7.5, x), dtype)
    out = tensor(x, dtype).masked_fill(cg.tensor(mask), cg.tensor(2.0))
    assert_close(out, np.where(mask, 2.0, x), dtype)
    out = tensor(x, dtype).masked_fill(cg.tensor(mask), float("-inf"))
    assert np.isneginf(f64(out)[np.broadcast_to(mask, x.shape)]).all()


def test_masked_fill_int_tensor_keeps_dtype():
    out = cg.tensor([1, 2, 3]).masked_fill(cg.tensor([True, False, True]), 9)
    assert out.dtype is cg.int64 and out.tolist() == [9, 2, 9]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_maximum_minimum_propagate_nan(dtype):
    a = tensor([1.0, np.nan, 3.0], dtype)
    b = tensor([np.nan, 2.0, 1.0], dtype)
    assert np.isnan(f64(cg.maximum(a, b))[:2]).all() and f64(cg.maximum(a, b))[2] == 3.0
    assert np.isnan(f64(cg.minimum(a, b))[:2]).all() and f64(cg.minimum(a, b))[2] == 1.0


def test_integer_arithmetic_is_exact():
    rng = np.random.default_rng(9)
    a = rng.integers(-50, 50, size=(5, 3))
    b = rng.integers(1, 9, size=(3,))
    ta, tb = cg.tensor(a), cg.tensor(b)
    assert (ta + tb).dtype is cg.int64
    np.testing.assert_array_equal((ta + tb).numpy(), a + b)
    np.testing.assert_array_equal((ta * tb).numpy(), a * b)
    np.testing.assert_array_equal((ta // tb).numpy(), a // b)
    np.testing.assert_array_equal((ta % tb).numpy(), np.mod(a, b))
    q = ta / tb
    assert q.dtype is cg.float32
    np.testing.assert_allclose(f64(q), a / b, rtol=1e-6)


def test_div_rounding_modes_match_torch_semantics():
    a = cg.tensor([7.0, -7.0, 7.5, -7.5])
    b = cg.tensor([2.0, 2.0, -2.0, 2.0])
    assert cg.div(a, b, rounding_mode="trunc").tolist() == [3.0, -3.0, -3.0, -3.0]
    assert cg.div(a, b, rounding_mode="floor").tolist() == [3.0, -4.0, -4.0, -4.0]
    ai = cg.tensor([7, -7])
    assert cg.div(ai, 2, rounding_mode="trunc").tolist() == [3, -3]
    assert cg.div(ai, 2, rounding_mode="trunc").dtype is cg.int64


def test_logical_and_bitwise_bool_ops():
    a = cg.tensor([True, True, False, False])
    b = cg.tensor([True, False, True, False])
    assert (a & b).tolist() == [True, False, False, False]
    assert (a | b).tolist() == [True, True, True, False]
    assert (a ^ b).tolist() == [False, True, True, False]
    assert (~a).tolist() == [False, False, True, True]
    assert cg.logical_not(cg.tensor([0.0, 2.0])).tolist() == [True, False]


def test_isnan_isinf_isfinite():
    x = cg.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert cg.isnan(x).tolist() == [False, True, False, False]
    assert cg.isinf(x).tolist() == [False, False, True, True]
    assert cg.isfinite(x).tolist() == [True, False, False, False]


@pytest.mark.parametrize("dtype", (cg.int64, cg.int32, cg.uint8, cg.bool), ids=str)
def test_float_only_unary_on_integer_input_returns_default_float(dtype):
    x = cg.tensor([0, 1, 1], dtype=dtype)
    out = cg.exp(x)
    assert out.dtype is cg.float32
    np.testing.assert_allclose(f64(out), np.exp([0, 1, 1]), rtol=1e-6)
    assert cg.sqrt(x).dtype is cg.float32


def _broadcastable_pair(rng):
    """Random shapes that broadcast: a common shape with dims set to 1 or dropped from the front."""
    full = [int(v) for v in rng.integers(1, 6, size=int(rng.integers(0, 5)))]
    a = [1 if rng.random() < 0.3 else n for n in full][int(rng.integers(0, len(full) + 1)):]
    b = [1 if rng.random() < 0.3 else n for n in full][int(rng.integers(0, len(full) + 1)):]
    return tuple(a), tuple(b)


@pytest.mark.parametrize("seed", range(12))
def test_random_broadcast_sweep(seed):
    rng = np.random.default_rng(1000 + seed)
    for _ in range(6):
        sa, sb = _broadcastable_pair(rng)
        dtype = FLOAT_DTYPES[int(rng.integers(0, len(FLOAT_DTYPES)))]
        name = sorted(BINARY)[int(rng.integers(0, len(BINARY)))]
        a, b = _binary_inputs(name, rng, sa, sb, dtype)
        out = BINARY[name][0](tensor(a, dtype), tensor(b, dtype))
        assert_close(out, BINARY[name][1](a, b), dtype, what=f"{name} {sa} {sb} {dtype}")
        uname = sorted(UNARY)[int(rng.integers(0, len(UNARY)))]
        fn, ref, (lo, hi) = UNARY[uname]
        x = rand(rng, sa, dtype, lo, hi)
        assert_close(fn(tensor(x, dtype)), ref(x), dtype, what=f"{uname} {sa} {dtype}")


def test_ieee_special_values_without_numpy_warnings(recwarn):
    inf, nan = float("inf"), float("nan")
    x = cg.tensor([inf, 0.0, -inf, nan])
    y = cg.tensor([inf, inf, -inf, 1.0])
    np.testing.assert_array_equal(f64(x - y), [nan, -inf, nan, nan])
    np.testing.assert_array_equal(f64(x * cg.tensor([0.0, inf, 0.0, 2.0])), [nan, nan, nan, nan])
    np.testing.assert_array_equal(f64(cg.tensor([1.0, 0.0, -1.0]) / 0), [inf, nan, -inf])
    np.testing.assert_array_equal(f64(cg.log(cg.tensor([0.0, -1.0]))), [-inf, nan])
    np.testing.assert_array_equal(f64(cg.exp(cg.tensor([1000.0]))), [inf])
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
