"""matmul (1-D, 2-D, batched, broadcast batch dims), mm, bmm and linear
against float64 NumPy."""
import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, TOLERANCE, rand, tensor, assert_close

MATMUL_SHAPES = [((3,), (3,)), ((3,), (3, 5)), ((4, 3), (3,)), ((1, 1), (1, 1)), ((4, 3), (3, 5)),
                 ((2, 4, 3), (3, 5)), ((4, 3), (2, 3, 5)), ((2, 1, 4, 3), (3, 3, 5)), ((7, 1, 9), (1, 9, 2)),
                 ((2, 4, 3), (3,)), ((3,), (2, 3, 5)), ((5, 17, 33), (5, 33, 9))]


def _tol(dtype, k):
    rtol, atol = TOLERANCE[dtype]
    # the float32 accumulation of k products: error grows ~ sqrt(k)
    return rtol * max(1.0, np.sqrt(k)), atol * max(1.0, k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("sa,sb", MATMUL_SHAPES, ids=str)
def test_matmul_matches_numpy(sa, sb, dtype):
    rng = np.random.default_rng(sum(sa) * 7 + sum(sb))
    a, b = rand(rng, sa, dtype), rand(rng, sb, dtype)
    out = cg.matmul(tensor(a, dtype), tensor(b, dtype))
    assert out.dtype is dtype
    rtol, atol = _tol(dtype, sa[-1])
    assert_close(out, np.matmul(a, b), dtype, rtol=rtol, atol=atol)
    assert_close(tensor(a, dtype) @ tensor(b, dtype), np.matmul(a, b), dtype, rtol=rtol, atol=atol)


def test_matmul_of_non_contiguous_operands():
    rng = np.random.default_rng(0)
    a, b = rand(rng, (5, 4)), rand(rng, (6, 5))
    out = cg.matmul(tensor(a).t(), tensor(b)[::2].t().t().t())
    assert_close(out, a.T @ b[::2].T)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_mm_bmm(dtype):
    rng = np.random.default_rng(1)
    a, b = rand(rng, (3, 4, 5), dtype), rand(rng, (3, 5, 2), dtype)
    rtol, atol = _tol(dtype, 5)
    assert_close(cg.bmm(tensor(a, dtype), tensor(b, dtype)), a @ b, dtype, rtol=rtol, atol=atol)
    assert_close(cg.mm(tensor(a[0], dtype), tensor(b[1], dtype)), a[0] @ b[1], dtype, rtol=rtol, atol=atol)
    assert_close(tensor(a, dtype).bmm(tensor(b, dtype)), a @ b, dtype, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("xshape", [(7,), (3, 7), (2, 3, 7)], ids=str)
def test_linear_with_and_without_bias(xshape, dtype):
    rng = np.random.default_rng(2)
    x, w, b = rand(rng, xshape, dtype), rand(rng, (5, 7), dtype), rand(rng, (5,), dtype)
    rtol, atol = _tol(dtype, 7)
    assert_close(cg.linear(tensor(x, dtype), tensor(w, dtype)), x @ w.T, dtype, rtol=rtol, atol=atol)
    assert_close(cg.linear(tensor(x, dtype), tensor(w, dtype), tensor(b, dtype)), x @ w.T + b, dtype, rtol=rtol,
                 atol=atol)
