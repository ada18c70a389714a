"""Shared pieces of the core op tests: per-dtype tolerances, seeded random
inputs exactly representable in the tested dtype, float64 views of results,
and the comparison every op test ends with.

Inputs are drawn in float64 and rounded to the tested dtype first, so the
float64 NumPy reference sees exactly the values cutegrad sees; what remains is
the op's own rounding, bounded per dtype by TOLERANCE.
"""
import math

import numpy as np

import cutegrad as cg

FLOAT_DTYPES = (cg.float32, cg.float64, cg.float16, cg.bfloat16)
# (rtol, atol): a few ulps of the output dtype; half dtypes round once at the end.
TOLERANCE = {
    cg.float64: (1e-10, 1e-12),
    cg.float32: (2e-5, 1e-6),
    cg.float16: (2e-3, 1e-3),
    cg.bfloat16: (1.6e-2, 1e-2),
}
# Shapes with 1s, odd sizes and a 0-dim entry; pairs that broadcast.
SHAPES = [(), (1,), (7,), (3, 1), (1, 5), (2, 3, 5), (4, 1, 3)]
BROADCAST_PAIRS = [((), (3,)), ((5,), (5,)), ((3, 1), (1, 4)), ((2, 3, 5), (5,)), ((4, 1, 3), (2, 1)),
                   ((1,), (2, 3)), ((7, 1, 1), (1, 3, 1))]

erf64 = np.vectorize(math.erf, otypes=[np.float64])


def random_shape(rng, max_ndim=4, max_size=7):
    return tuple(int(v) for v in rng.integers(1, max_size + 1, size=int(rng.integers(0, max_ndim + 1))))


def rand(rng, shape, dtype=cg.float64, low=-2.0, high=2.0):
    """float64 array of values representable in dtype."""
    return np.asarray(rng.uniform(low, high, size=shape)).astype(dtype.np).astype(np.float64)


def tensor(arr, dtype=cg.float64, requires_grad=False):
    return cg.tensor(np.asarray(arr), dtype=dtype, requires_grad=requires_grad)


def f64(t):
    """float64 NumPy copy of a tensor's values."""
    return np.asarray(t.detach().numpy()).astype(np.float64)


def assert_close(actual, expected, dtype=None, rtol=None, atol=None, what=""):
    """actual: Tensor; expected: float64 array (or number)."""
    dtype = dtype or actual.dtype
    r, a = TOLERANCE.get(dtype, (0.0, 0.0))
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    got = f64(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != expected {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)
