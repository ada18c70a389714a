"""Every compute kernel of the CUDA backend against the CPU backend.

Each kernel is called through the registry on CUDA tensors and on CPU
tensors with the same arguments: dtype and shape must match the CPU backend
on the same dtype, and values must match the CPU backend run in float64 on
the same (already rounded) inputs, within a tolerance of the output dtype.
Every output the CUDA backend allocates is first filled with 0xFF bytes (NaN
for floats, -1 for integers), so an element a kernel does not write fails.
Shapes include 0-d, extent-1, odd and empty extents and non-contiguous views.
"""
import math

import numpy as np
import pytest

import cutegrad
from cutegrad import dtypes as dt
from cutegrad.device import CPU, CUDA
from cutegrad.dispatch import kernel, KERNELS, has_impl
from cutegrad.ops import codes as C


def _gpu_skip_reason():
    try:
        import cutegrad.cuda as cuda
        if not cuda.is_available():
            return "needs a CUDA GPU and driver"
        from cutegrad import _C
    except Exception as exc:  # no driver library, or the extension is not built
        return f"needs a CUDA GPU and cutegrad._C: {type(exc).__name__}: {exc}"
    if not hasattr(_C, "elementwise"):
        return "cutegrad._C was built without the CUDA op kernels"
    return None


_SKIP = _gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

FLOATS = [dt.float32, dt.bfloat16, dt.float16]
# relative tolerance of a result of each dtype (about two units in the last place)
TOL = {dt.float32: 3e-6, dt.bfloat16: 1.6e-2, dt.float16: 2e-3, dt.float64: 1e-12}
STORAGE_KERNELS = {"empty", "full", "from_numpy", "to_device"}


@pytest.fixture(autouse=True)
def poisoned_outputs():
    from cutegrad.backends import cuda as backend
    backend.set_poison_outputs(True)
    yield
    backend.set_poison_outputs(False)


def impl(name, backend):
    return kernel(name).impl[backend]


def rand(rng, shape, dtype, lo=-3.0, hi=3.0):
    """A CPU tensor of dtype with values drawn in [lo, hi) (rounded to dtype)."""
    if dtype.is_floating_point:
        vals = rng.uniform(lo, hi, size=shape)
    elif dtype is dt.bool_:
        vals = rng.integers(0, 2, size=shape).astype(bool)
    else:
        vals = rng.integers(int(lo), int(hi) + 1, size=shape)
    return cutegrad.tensor(np.asarray(vals), dtype=dtype)


def cuda_of(t):
    return t.to("cuda") if isinstance(t, cutegrad.Tensor) else t


def f64(v):
    """CPU float64 twin of a float tensor or float dtype argument; anything else unchanged."""
    if isinstance(v, cutegrad.Tensor):
        return v.to(dt.float64) if v.dtype.is_floating_point else v
    if isinstance(v, dt.DType):
        return dt.float64 if v.is_floating_point else v
    return v


def values(t):
    arr = t.detach().cpu().numpy()
    return arr.astype(np.float64) if arr.dtype != bool else arr


def assert_close(got, ref, dtype, scale=None):
    g = values(got)
    r = values(ref)
    assert g.shape == r.shape, (g.shape, r.shape)
    if dtype is None or not dtype.is_floating_point:
        np.testing.assert_array_equal(g, r)
        return
    finite = np.isfinite(r)
    np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg="NaN positions differ")
    np.testing.assert_array_equal(g[~finite & ~np.isnan(r)], r[~finite & ~np.isnan(r)], err_msg="infinities differ")
    if scale is None:
        scale = 0.0
    tol = TOL[dtype] * (np.abs(r[finite]) + scale)
    err = np.abs(g[finite] - r[finite])
    assert np.all(err <= tol), f"max error {err.max() if err.size else 0} (tolerance {TOL[dtype]}, dtype {dtype})"


def check(name, *args, scale=None, out_index=None):
    """Run kernel `name` on CPU (same dtypes and float64) and CUDA; compare."""
    cpu = impl(name, CPU)(*args)
    ref = impl(name, CPU)(*[f64(a) for a in args])
    gpu = impl(name, CUDA)(*[cuda_of(a) for a in args])
    cpus, refs, gpus = (cpu, ref, gpu) if isinstance(cpu, tuple) else ((cpu,), (ref,), (gpu,))
    for c, r, g in zip(cpus, refs, gpus):
        if c is None:
            assert g is None
            continue
        assert g.device.type == "cuda"
        assert g.dtype is c.dtype, (g.dtype, c.dtype)
        assert tuple(g.shape) == tuple(c.shape)
        assert_close(g, r if c.dtype.is_floating_point else c, c.dtype, scale)
    return gpu


SHAPES = [(), (1,), (7,), (3, 5), (2, 1, 33), (0, 4)]

# --- pointwise -------------------------------------------------------------------------
UNARY = {name: getattr(C, name) for name in (
    "NEG", "EXP", "LOG", "SQRT", "RSQRT", "ABS", "TANH", "SIGMOID", "RELU", "GELU", "GELU_TANH", "SILU", "SIGN",
    "SIN", "COS", "LOGICAL_NOT", "RECIPROCAL", "SQUARE", "ERF", "LOG1P", "EXPM1", "FLOOR", "CEIL", "ROUND",
    "TRUNC", "ISNAN", "ISINF", "ISFINITE")}
POSITIVE = {"LOG", "SQRT", "RSQRT", "RECIPROCAL"}
BOOL_OUT = {"ISNAN", "ISINF", "ISFINITE", "LOGICAL_NOT"}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_float(name, dtype):
    rng = np.random.default_rng(1)
    for shape in SHAPES:
        lo = 0.1 if name in POSITIVE else -4.0
        x = rand(rng, shape, dtype, lo, 4.0)
        out_dtype = dt.bool_ if name in BOOL_OUT else dtype
        # absolute slack of one tolerance unit: 1 + erf(x) and friends cancel near their zeros
        check("unary", UNARY[name], x, out_dtype, scale=1.0)
    # special values and a transposed (strided) view
    x = cutegrad.tensor([[0.0, -0.0, float("inf")], [float("-inf"), float("nan"), 2.5]], dtype=dtype)
    if name not in POSITIVE:
        check("unary", UNARY[name], x, dt.bool_ if name in BOOL_OUT else dtype, scale=1.0)
    xt = rand(rng, (4, 6), dtype, 0.1 if name in POSITIVE else -4.0, 4.0).t()
    check("unary", UNARY[name], xt, dt.bool_ if name in BOOL_OUT else dtype, scale=1.0)


@pytest.mark.parametrize("name", ["NEG", "ABS", "SIGN", "SQUARE", "RELU", "LOGICAL_NOT", "ISNAN", "ISFINITE",
                                  "FLOOR"])
@pytest.mark.parametrize("dtype", [dt.int64, dt.int32, dt.uint8, dt.bool_])
def test_unary_integer(name, dtype):
    if dtype is dt.bool_ and name in ("NEG", "SQUARE", "SIGN"):
        pytest.skip("rejected by the frontend for bool")
    rng = np.random.default_rng(2)
    x = rand(rng, (5, 7), dtype, 0 if dtype in (dt.uint8, dt.bool_) else -9, 9)
    out_dtype = dt.bool_ if name in BOOL_OUT else dtype
    check("unary", UNARY[name], x, out_dtype)


def test_unary_float_of_integer_computes_in_the_output_dtype():
    rng = np.random.default_rng(3)
    x = rand(rng, (9,), dt.int64, 1, 20)
    check("unary", C.EXP, x, dt.float32)
    check("unary", C.SQRT, x, dt.float32)


BINARY = {name: getattr(C, name) for name in (
    "ADD", "SUB", "MUL", "DIV", "POW", "MAXIMUM", "MINIMUM", "EQ", "NE", "LT", "LE", "GT", "GE", "AND", "OR", "XOR",
    "FLOORDIV", "REMAINDER", "ATAN2")}
CMP = {"EQ", "NE", "LT", "LE", "GT", "GE", "AND", "OR", "XOR"}
BROADCAST_PAIRS = [((3, 5), (3, 5)), ((3, 1, 5), (4, 5)), ((), (6,)), ((1,), (2, 3)), ((0, 3), (1, 3)),
                   ((2, 3, 65), (65,))]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_float(name, dtype):
    rng = np.random.default_rng(4)
    out_dtype = dt.bool_ if name in CMP else dtype
    for sa, sb in BROADCAST_PAIRS:
        lo = 0.5 if name == "POW" else -4.0
        a = rand(rng, sa, dtype, lo, 4.0)
        b = rand(rng, sb, dtype, -2.0, 2.0)
        if name in ("DIV", "FLOORDIV", "REMAINDER"):
            b = rand(rng, sb, dtype, 0.5, 3.0)
        scale = 1.0 if name in ("SUB", "ADD", "REMAINDER") else None
        check("binary", BINARY[name], a, b, dtype, out_dtype, scale=scale)
        check("binary", BINARY[name], a, 1.5, dtype, out_dtype, scale=scale)
        check("binary", BINARY[name], 2.0, b, dtype, out_dtype, scale=scale)


@pytest.mark.parametrize("name", sorted(set(BINARY) - {"DIV", "ATAN2"}))
@pytest.mark.parametrize("dtype", [dt.int64, dt.int32, dt.uint8])
def test_binary_integer(name, dtype):
    rng = np.random.default_rng(5)
    out_dtype = dt.bool_ if name in CMP else dtype
    lo = 0 if dtype is dt.uint8 else -9
    a = rand(rng, (4, 9), dtype, lo, 9)
    b = rand(rng, (9,), dtype, 1 if name in ("FLOORDIV", "REMAINDER") else lo, 4 if name == "POW" else 9)
    if name == "POW":
        b = rand(rng, (9,), dtype, 0, 4)
    check("binary", BINARY[name], a, b, dtype, out_dtype)
    check("binary", BINARY[name], a, 3, dtype, out_dtype)


def test_binary_mixed_dtypes_promote_to_the_compute_dtype():
    rng = np.random.default_rng(6)
    a = rand(rng, (5, 6), dt.bfloat16)
    b = rand(rng, (5, 6), dt.float16)
    check("binary", C.MUL, a, b, dt.float32, dt.float32)
    i = rand(rng, (6,), dt.int64, -5, 5)
    check("binary", C.ADD, a, i, dt.bfloat16, dt.bfloat16)
    check("binary", C.LT, i, a, dt.bfloat16, dt.bool_)


def test_binary_with_nan_and_zero_division():
    x = cutegrad.tensor([1.0, -1.0, 0.0, float("nan"), 5.0, -7.5])
    y = cutegrad.tensor([0.0, 0.0, 0.0, 1.0, float("nan"), 2.0])
    for code in (C.DIV, C.MAXIMUM, C.MINIMUM, C.FLOORDIV, C.REMAINDER, C.POW):
        check("binary", code, x, y, dt.float32, dt.float32)
    xi = cutegrad.tensor([7, -7, 7, -7, 0])
    yi = cutegrad.tensor([2, 2, -2, -2, 3])
    for code in (C.FLOORDIV, C.REMAINDER):
        check("binary", code, xi, yi, dt.int64, dt.int64)


@pytest.mark.parametrize("dtype", FLOATS + [dt.int64])
def test_where(dtype):
    rng = np.random.default_rng(7)
    cond = rand(rng, (3, 1, 5), dt.bool_)
    a = rand(rng, (4, 5), dtype)
    b = rand(rng, (3, 4, 1), dtype)
    check("where", cond, a, b, dtype)
    check("where", cond, a, 0.5 if dtype.is_floating_point else 2, dtype)
    check("where", cond, -1, b, dtype)


@pytest.mark.parametrize("dtype", FLOATS + [dt.int64])
def test_clamp(dtype):
    rng = np.random.default_rng(8)
    x = rand(rng, (6, 7), dtype, -5, 5)
    check("clamp", x, -1, 2, dtype)
    check("clamp", x, None, 0, dtype)
    check("clamp", x.t(), 1, None, dtype)
    if dtype.is_floating_point:
        check("clamp", cutegrad.tensor([float("nan"), 3.0, -3.0], dtype=dtype), -1.0, 1.0, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("code", [C.GELU, C.GELU_TANH, C.SILU])
def test_act_backward(code, dtype):
    rng = np.random.default_rng(9)
    g = rand(rng, (5, 33), dtype)
    x = rand(rng, (5, 33), dtype, -6, 6)
    check("act_backward", code, g, x, scale=1.0)


ALL_DTYPES = [dt.bool_, dt.uint8, dt.int8, dt.int16, dt.int32, dt.int64, dt.float16, dt.bfloat16, dt.float32,
              dt.float64]


@pytest.mark.parametrize("src", ALL_DTYPES)
def test_cast_every_pair(src):
    rng = np.random.default_rng(10)
    x = rand(rng, (3, 7), src, 0 if src in (dt.uint8, dt.bool_) else -50, 50)
    for dst in ALL_DTYPES:
        got = impl("cast", CUDA)(cuda_of(x), dst)
        expect = impl("cast", CPU)(x, dst)
        assert got.dtype is dst
        np.testing.assert_array_equal(values(got), values(expect))
        got_t = impl("cast", CUDA)(cuda_of(x).t(), dst)
        np.testing.assert_array_equal(values(got_t), values(expect).T)


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.int64, dt.bool_])
def test_contiguous_and_copy(dtype):
    rng = np.random.default_rng(11)
    x = rand(rng, (4, 5, 6), dtype, 0, 9)
    xd = cuda_of(x)
    views = [lambda t: t.permute(2, 0, 1), lambda t: t[:, 1:4, ::2], lambda t: t[1], lambda t: t.transpose(0, 1)]
    for v in views:
        got = impl("contiguous", CUDA)(v(xd))
        assert got.is_contiguous()
        np.testing.assert_array_equal(values(got), values(impl("contiguous", CPU)(v(x))))
    # copy_ into a strided destination, broadcasting and casting the source
    dst = cutegrad.zeros(6, 4, dtype=dt.float32, device="cuda")
    src = rand(rng, (4,), dtype, 0, 9)
    impl("copy_", CUDA)(dst.t(), cuda_of(src).unsqueeze(1))
    expect = np.broadcast_to(values(src)[:, None], (4, 6)).T
    np.testing.assert_array_equal(values(dst), expect)
    # overlapping source and destination in one storage
    y = cuda_of(cutegrad.arange(10, dtype=dt.float32))
    impl("copy_", CUDA)(y[1:], y[:-1])
    np.testing.assert_array_equal(values(y), [0, 0, 1, 2, 3, 4, 5, 6, 7, 8])


@pytest.mark.parametrize("dtype", [dt.float32, dt.int64, dt.float64, dt.bfloat16])
def test_arange(dtype):
    for start, end, step in [(0, 10, 1), (-3, 17, 3), (5, 0, -2), (0, 0, 1)]:
        got = impl("arange", CUDA)(start, end, step, dtype, cutegrad.device("cuda"))
        np.testing.assert_array_equal(values(got), values(impl("arange", CPU)(start, end, step, dtype, None)))
    got = impl("arange", CUDA)(0.5, 3.0, 0.25, dt.float32, cutegrad.device("cuda"))
    np.testing.assert_allclose(values(got), np.arange(0.5, 3.0, 0.25), rtol=1e-6)


# --- reductions -----------------------------------------------------------------------
RED_CASES = [((7,), (0,)), ((3, 5), (1,)), ((3, 5), (0,)), ((2, 3, 4), (0, 2)), ((4, 1000), (1,)),
             ((1000, 3), (0,)), ((2, 3, 4), (0, 1, 2)), ((), ()), ((5, 3), ()), ((6, 0), (1,)), ((33, 17, 5), (1,))]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("code", [C.SUM, C.MEAN, C.MAX, C.MIN, C.PROD])
def test_reduce_float(code, dtype):
    rng = np.random.default_rng(12)
    for shape, dims in RED_CASES:
        n = math.prod(shape[d] for d in dims) if shape else 1
        if code in (C.MAX, C.MIN) and n == 0:
            continue
        lo, hi = (0.99, 1.01) if code == C.PROD else (-3.0, 3.0)
        x = rand(rng, shape, dtype, lo, hi)
        # sums and products of n terms carry about n roundings
        scale = {C.SUM: 3.0 * n, C.MEAN: 3.0, C.PROD: 0.1 * n}.get(code)
        for keepdim in (False, True):
            out_dtype = dt.float32 if (code in (C.SUM, C.PROD) and dtype is dt.float32) else dtype
            check("reduce", code, x, dims, keepdim, out_dtype, scale=scale)
        if len(shape) >= 2:
            check("reduce", code, x.transpose(0, -1), dims, False, dtype, scale=scale)


@pytest.mark.parametrize("code", [C.SUM, C.MAX, C.MIN, C.PROD, C.ANY, C.ALL])
@pytest.mark.parametrize("dtype", [dt.int64, dt.int32, dt.bool_])
def test_reduce_integer_and_logical(code, dtype):
    rng = np.random.default_rng(13)
    for shape, dims in RED_CASES:
        n = math.prod(shape[d] for d in dims) if shape else 1
        if code in (C.MAX, C.MIN) and n == 0:
            continue
        x = rand(rng, shape, dtype, 0 if dtype is dt.bool_ else -2, 2)
        out_dtype = dt.bool_ if code in (C.ANY, C.ALL) else (dt.int64 if code in (C.SUM, C.PROD) else dtype)
        check("reduce", code, x, dims, False, out_dtype)


def test_reduce_propagates_nan_and_empty_mean_is_nan():
    x = cutegrad.tensor([[1.0, float("nan"), 3.0], [float("-inf"), 2.0, 0.0]])
    for code in (C.SUM, C.MAX, C.MIN, C.MEAN):
        check("reduce", code, x, (1,), False, dt.float32)
    check("reduce", C.MEAN, cutegrad.zeros(3, 0), (1,), False, dt.float32)


@pytest.mark.parametrize("dtype", FLOATS + [dt.int64])
@pytest.mark.parametrize("code", [C.ARGMAX, C.ARGMIN])
def test_argreduce(code, dtype):
    rng = np.random.default_rng(14)
    for shape, dim in [((7,), 0), ((3, 5), 1), ((3, 5), 0), ((4, 300), 1), ((2, 3, 4), 1)]:
        x = rand(rng, shape, dtype, -3, 3)  # int64: values in [-3, 3], many ties
        for keepdim in (False, True):
            check("argreduce", code, x, dim, keepdim)
        check("argreduce", code, x, None, False)
        check("argreduce", code, x, None, True)
    x = cutegrad.tensor([1.0, float("nan"), 5.0, float("nan")])
    check("argreduce", code, x, 0, False)


@pytest.mark.parametrize("dtype", FLOATS)
def test_var(dtype):
    rng = np.random.default_rng(15)
    for shape, dims in RED_CASES[:8]:
        if not shape:
            continue
        x = rand(rng, shape, dtype, 2.0, 4.0)
        for correction in (0, 1):
            check("var", x, dims, correction, False, scale=1.0)
            check("var", x, dims, correction, True, scale=1.0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_logsumexp(dtype):
    rng = np.random.default_rng(16)
    for shape, dims in RED_CASES[:8]:
        x = rand(rng, shape, dtype, -20, 20)
        check("logsumexp", x, dims, False, scale=1.0)
        check("logsumexp", x, dims, True, scale=1.0)
    inf = float("inf")
    x = cutegrad.tensor([[-inf, -inf], [inf, 1.0], [float("nan"), 0.0], [-inf, 2.0]])
    check("logsumexp", x, (1,), False)


# Two-stage paths (per-chunk partials in a workspace, then a combining launch):
# column sums of tall (R, C) inputs, reductions over leading dims of 3-d
# inputs and full reductions; small cases take the one-launch path.
COLUMN_CASES = [(r, c) for r in (1, 3, 1000, 20481) for c in (1, 7, 256, 3071) if r * c <= 6_000_000]


@pytest.mark.parametrize("dtype", FLOATS)
def test_reduce_columns_of_tall_inputs(dtype):
    rng = np.random.default_rng(40)
    for r, c in COLUMN_CASES:
        x = rand(rng, (r, c), dtype)
        for code in (C.SUM, C.MEAN, C.MAX, C.MIN):
            scale = {C.SUM: 3.0 * r, C.MEAN: 3.0}.get(code)
            check("reduce", code, x, (0,), False, dtype, scale=scale)
        check("reduce", C.SUM, x, (0,), True, dt.float32, scale=3.0 * r)
        check("argreduce", C.ARGMAX, x, 0, False)
        check("argreduce", C.ARGMIN, x, 0, True)
        if r > 1:
            check("var", x, (0,), 1, False, scale=1.0)
        check("logsumexp", x, (0,), False, scale=1.0)


def test_reduce_columns_of_float64_and_integers():
    rng = np.random.default_rng(41)
    for r, c in [(20481, 7), (1000, 256), (3, 3071)]:
        x = rand(rng, (r, c), dt.float64)
        check("reduce", C.SUM, x, (0,), False, dt.float64, scale=3.0 * r)
        check("var", x, (0,), 0, False, scale=1.0)
        check("argreduce", C.ARGMAX, x, 0, False)
        xi = rand(rng, (r, c), dt.int32, -5, 5)
        check("reduce", C.SUM, xi, (0,), False, dt.int64)
        check("reduce", C.MAX, xi, (0,), False, dt.int32)
        check("argreduce", C.ARGMIN, xi, 0, False)  # many ties: the first index wins
        xb = rand(rng, (r, c), dt.bool_)
        check("reduce", C.ANY, xb, (0,), False, dt.bool_)
        check("reduce", C.ALL, xb, (0,), False, dt.bool_)


@pytest.mark.parametrize("dtype", FLOATS)
def test_reduce_leading_dims_of_3d(dtype):
    rng = np.random.default_rng(42)
    for shape in [(3, 1000, 7), (8, 2049, 7), (20, 1024, 256), (1, 20481, 3), (64, 80, 33)]:
        x = rand(rng, shape, dtype)
        for dims in [(0,), (0, 1), (1,)]:
            n = math.prod(shape[d] for d in dims)
            check("reduce", C.SUM, x, dims, False, dt.float32, scale=3.0 * n)
            check("reduce", C.MEAN, x, dims, False, dtype, scale=3.0)
            check("reduce", C.MAX, x, dims, False, dtype)
        check("argreduce", C.ARGMAX, x, 1, False)
        check("var", x, (0, 1), 0, False, scale=1.0)
        check("logsumexp", x, (1,), False, scale=1.0)
        # the same reductions over a transposed (non-contiguous) view
        xt = x.transpose(0, 2)
        check("reduce", C.SUM, xt, (1, 2), False, dt.float32, scale=3.0 * shape[0] * shape[1])


@pytest.mark.parametrize("n", [1, 2, 129, 1000, 65537, 1_000_003, 10_000_000])
def test_full_reductions(n):
    rng = np.random.default_rng(43)
    dtypes = [dt.float32] if n == 10_000_000 else FLOATS + [dt.float64]
    for dtype in dtypes:
        x = rand(rng, (n,), dtype)
        check("reduce", C.SUM, x, (0,), False, dt.float32 if dtype is not dt.float64 else dtype, scale=3.0 * n)
        check("reduce", C.MEAN, x, (0,), False, dtype, scale=3.0)
        check("reduce", C.MAX, x, (0,), False, dtype)
        check("reduce", C.MIN, x, (0,), True, dtype)
        check("argreduce", C.ARGMAX, x, None, False)
        check("argreduce", C.ARGMIN, x, None, False)
        if n > 1:
            check("var", x, (0,), 1, False, scale=1.0)
        check("logsumexp", x, (0,), False, scale=1.0)
    x2 = rand(rng, (n // 7 + 1, 7), dt.float32)  # 2-d, all dims
    check("reduce", C.SUM, x2, (0, 1), False, dt.float32, scale=3.0 * x2.numel())
    check("reduce", C.SUM, x2.t(), (0, 1), False, dt.float32, scale=3.0 * x2.numel())
    if n <= 1_000_003:
        xi = rand(rng, (n,), dt.int64, -3, 3)
        check("reduce", C.SUM, xi, (0,), False, dt.int64)
        check("argreduce", C.ARGMAX, xi, None, False)  # ties everywhere: the first index
        xb = rand(rng, (n,), dt.bool_)
        check("reduce", C.ANY, xb, (0,), False, dt.bool_)
        check("reduce", C.ALL, xb, (0,), False, dt.bool_)


def test_argmax_ties_and_nan_in_long_reductions_take_the_first_index():
    n = 1_000_003
    vals = np.zeros(n)
    vals[[5000, 700_000, 999_999]] = 2.0  # the maximum three times, in different chunks
    vals[[123, 800_000]] = -2.0
    x = cutegrad.tensor(vals, dtype=dt.float32)
    assert values(impl("argreduce", CUDA)(C.ARGMAX, cuda_of(x), None, False)) == 5000
    assert values(impl("argreduce", CUDA)(C.ARGMIN, cuda_of(x), None, False)) == 123
    vals[[600_000, 900_000]] = np.nan
    x = cutegrad.tensor(vals, dtype=dt.float32)
    assert values(impl("argreduce", CUDA)(C.ARGMAX, cuda_of(x), None, False)) == 600_000
    assert np.isnan(values(impl("reduce", CUDA)(C.MAX, cuda_of(x), (0,), False, dt.float32)))
    assert np.isnan(values(impl("reduce", CUDA)(C.SUM, cuda_of(x), (0,), False, dt.float32)))
    col = np.zeros((20481, 5))
    col[[17, 9000, 20480], 2] = 1.0
    col[10_000, 4] = np.nan
    xc = cutegrad.tensor(col, dtype=dt.bfloat16)
    got = values(impl("argreduce", CUDA)(C.ARGMAX, cuda_of(xc), 0, False))
    np.testing.assert_array_equal(got, [0, 0, 17, 0, 10_000])


def test_two_stage_reductions_are_deterministic():
    rng = np.random.default_rng(44)
    x = cuda_of(rand(rng, (20481, 256), dt.float32))
    first = values(impl("reduce", CUDA)(C.SUM, x, (0,), False, dt.float32))
    for _ in range(3):
        np.testing.assert_array_equal(values(impl("reduce", CUDA)(C.SUM, x, (0,), False, dt.float32)), first)
    full = values(impl("reduce", CUDA)(C.SUM, x, (0, 1), False, dt.float32))
    np.testing.assert_array_equal(values(impl("reduce", CUDA)(C.SUM, x, (0, 1), False, dt.float32)), full)


# --- matmul ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
def test_matmul(dtype):
    rng = np.random.default_rng(17)
    cases = [((5, 7), (7, 3)), ((1, 1), (1, 1)), ((3, 0), (0, 4)), ((2, 3, 4, 5), (5, 6)), ((4, 5), (3, 5, 2)),
             ((2, 1, 9, 4), (3, 4, 2)), ((128, 96), (96, 160)), ((3, 64, 128), (3, 128, 64)), ((70, 33), (33, 65))]
    for sa, sb in cases:
        a = rand(rng, sa, dtype, -1, 1)
        b = rand(rng, sb, dtype, -1, 1)
        k = sa[-1]
        check("matmul", a, b, dtype, scale=max(1.0, math.sqrt(k)))
    a = rand(rng, (40, 96), dtype, -1, 1)
    b = rand(rng, (64, 96), dtype, -1, 1)
    got = impl("matmul", CUDA)(cuda_of(a), cuda_of(b).t(), dtype)  # B n-major: the transposed weight of linear
    assert_close(got, impl("matmul", CPU)(f64(a), f64(b).t(), dt.float64), dtype, scale=10.0)


# --- softmax and norms -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("log", [False, True])
def test_softmax(dtype, log):
    rng = np.random.default_rng(18)
    for shape, dim in [((7,), 0), ((3, 5), 1), ((3, 5), 0), ((2, 3, 4), 1), ((4, 1000), 1), ((2, 5000), 1),
                       ((1, 1), 1), ((0, 3), 1)]:
        x = rand(rng, shape, dtype, -10, 10)
        # exp(x - max) carries the rounding of x - max (up to |x - max| ulp): slack of 1% of a unit
        check("softmax", x, dim, log, scale=1.0 if log else 1e-2)
        if len(shape) == 2:
            check("softmax", x.t(), 0, log, scale=1.0 if log else 1e-2)
    x = cutegrad.tensor([[float("-inf"), 0.0, 1.0], [float("-inf")] * 3])
    check("softmax", x, 1, log)


@pytest.mark.parametrize("dtype", FLOATS)
def test_layer_norm_and_rms_norm(dtype):
    rng = np.random.default_rng(19)
    for shape, nd in [((4, 7), 1), ((2, 3, 64), 1), ((5, 3, 4), 2), ((3, 1000), 1), ((1, 1), 1), ((0, 8), 1)]:
        x = rand(rng, shape, dtype, -2, 5)
        nshape = shape[len(shape) - nd:]
        w = rand(rng, nshape, dtype, 0.5, 1.5)
        b = rand(rng, nshape, dtype, -1, 1)
        w32 = rand(rng, nshape, dt.float32, 0.5, 1.5)  # fp32 master weight beside half activations
        for weight, bias in [(None, None), (w, b), (w, None), (w32, None)]:
            check("layer_norm", x, nd, weight, bias, 1e-5, scale=4.0)
            check("rms_norm", x, nd, weight, 1e-6, scale=4.0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_norm_backward_kernels(dtype):
    """layer_norm_backward / rms_norm_backward (CUDA only) against CPU float64 autograd of the ops."""
    from cutegrad.backends.cuda import layer_norm_backward, rms_norm_backward
    F = cutegrad.nn.functional
    rng = np.random.default_rng(29)
    for shape, nd in [((4, 7), 1), ((2, 3, 64), 1), ((5, 3, 4), 2), ((3, 1000), 1), ((1, 1), 1), ((300, 33), 1)]:
        nshape = shape[len(shape) - nd:]
        x = rand(rng, shape, dtype, -2, 5)
        w = rand(rng, nshape, dtype, 0.5, 1.5)
        b = rand(rng, nshape, dtype, -1, 1)
        dy = rand(rng, shape, dtype, -1, 1)
        for rms in (False, True):
            x64, w64, b64 = (t.to(dt.float64).detach().requires_grad_(True) for t in (x, w, b))
            if rms:
                y = F.rms_norm(x64, nshape, w64, 1e-6)
            else:
                y = F.layer_norm(x64, nshape, w64, b64, 1e-5)
            (y * dy.to(dt.float64)).sum().backward()
            if rms:
                _, rstd = impl("rms_norm", CUDA)(cuda_of(x), nd, cuda_of(w), 1e-6)
                dx, dw = rms_norm_backward(cuda_of(dy), cuda_of(x), nd, cuda_of(w), rstd)
                grads = [(dx, x64.grad), (dw, w64.grad)]
            else:
                _, mean, rstd = impl("layer_norm", CUDA)(cuda_of(x), nd, cuda_of(w), cuda_of(b), 1e-5)
                dx, dw, db = layer_norm_backward(cuda_of(dy), cuda_of(x), nd, cuda_of(w), mean, rstd)
                grads = [(dx, x64.grad), (dw, w64.grad), (db, b64.grad)]
            rows = math.prod(shape[:len(shape) - nd])
            for got, ref in grads:
                assert got.dtype is dtype
                assert_close(got, ref, dtype, scale=4.0 * max(1, rows) ** 0.5)


@pytest.mark.parametrize("dtype", FLOATS)
def test_norm_backward_parameter_gradients_of_many_rows(dtype):
    """dweight/dbias of tall inputs take the two-stage column sum; float64 autograd on the CPU as reference."""
    from cutegrad.backends.cuda import layer_norm_backward, rms_norm_backward
    F = cutegrad.nn.functional
    rng = np.random.default_rng(45)
    for rows, n in [(1, 3071), (3, 7), (1000, 256), (1000, 3071), (20481, 1), (20481, 7), (20481, 256)]:
        x = rand(rng, (rows, n), dtype, -2, 5)
        w32 = rand(rng, (n,), dt.float32, 0.5, 1.5)  # fp32 master weights, as under autocast
        b32 = rand(rng, (n,), dt.float32, -1, 1)
        dy = rand(rng, (rows, n), dtype, -1, 1)
        x64, w64, b64 = (t.to(dt.float64).detach().requires_grad_(True) for t in (x, w32, b32))
        (F.layer_norm(x64, (n,), w64, b64, 1e-5) * dy.to(dt.float64)).sum().backward()
        _, mean, rstd = impl("layer_norm", CUDA)(cuda_of(x), 1, cuda_of(w32), cuda_of(b32), 1e-5)
        dx, dw, db = layer_norm_backward(cuda_of(dy), cuda_of(x), 1, cuda_of(w32), mean, rstd)
        assert dw.dtype is dt.float32 and db.dtype is dt.float32
        tol = 4.0 * rows ** 0.5
        assert_close(dx, x64.grad, dtype, scale=tol)
        assert_close(dw, w64.grad, dt.float32 if dtype is dt.float32 else dtype, scale=tol)
        assert_close(db, b64.grad, dt.float32 if dtype is dt.float32 else dtype, scale=tol)
        _, db_only = layer_norm_backward(cuda_of(dy), cuda_of(x), 1, None, mean, rstd)[1:]
        assert_close(db_only, b64.grad, dt.float32 if dtype is dt.float32 else dtype, scale=tol)
        x64, w64 = (t.to(dt.float64).detach().requires_grad_(True) for t in (x, w32))
        (F.rms_norm(x64, (n,), w64, 1e-6) * dy.to(dt.float64)).sum().backward()
        _, rstd = impl("rms_norm", CUDA)(cuda_of(x), 1, cuda_of(w32), 1e-6)
        dx, dw = rms_norm_backward(cuda_of(dy), cuda_of(x), 1, cuda_of(w32), rstd)
        assert_close(dx, x64.grad, dtype, scale=tol)
        assert_close(dw, w64.grad, dt.float32 if dtype is dt.float32 else dtype, scale=tol)
        again = rms_norm_backward(cuda_of(dy), cuda_of(x), 1, cuda_of(w32), rstd)[1]
        np.testing.assert_array_equal(values(again), values(dw))  # fixed summation order


# --- indexing ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.int64, dt.bool_])
def test_gather_and_index_select(dtype):
    rng = np.random.default_rng(20)
    x = rand(rng, (5, 6, 7), dtype, 0, 9)
    for dim in range(3):
        idx_shape = [4, 3, 2]
        idx = cutegrad.tensor(rng.integers(0, x.shape[dim], size=idx_shape))
        check("gather", x, dim, idx)
        sel = cutegrad.tensor(rng.integers(0, x.shape[dim], size=9))
        check("index_select", x, dim, sel)
        xt = x.transpose(0, 2)
        sel_t = cutegrad.tensor(rng.integers(0, xt.shape[dim], size=9), dtype=dt.int32)
        check("index_select", xt, dim, sel_t)
    check("index_select", x, 1, cutegrad.tensor(2))


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.float16, dt.int64])
def test_scatter_add_and_index_add(dtype):
    rng = np.random.default_rng(21)
    base = rand(rng, (5, 6), dtype, -3, 3)
    for dim in (0, 1):
        idx = cutegrad.tensor(rng.integers(0, base.shape[dim], size=(5, 6)))  # duplicates
        src = rand(rng, (5, 6), dtype, -3, 3)
        check("scatter_add", base, dim, idx, src, scale=10.0)
        sel = cutegrad.tensor(rng.integers(0, base.shape[dim], size=11))
        src2 = rand(rng, (11, 6) if dim == 0 else (5, 11), dtype, -3, 3)
        check("index_add", base, dim, sel, src2, scale=10.0)


def test_index_add_along_dim0_is_deterministic():
    """The embedding backward (index_add on dim 0) gives the same bits on every run."""
    rng = np.random.default_rng(30)
    base = cutegrad.zeros(50, 33)
    idx = cutegrad.tensor(rng.integers(0, 50, size=5000))  # many duplicates per row
    src = rand(rng, (5000, 33), dt.float32, -1, 1)
    check("index_add", base, 0, idx, src, scale=10.0)
    runs = [values(impl("index_add", CUDA)(cuda_of(base), 0, cuda_of(idx), cuda_of(src))) for _ in range(3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


def _index_keys(rng):
    i = cutegrad.tensor([0, 3, 3, 1])
    j = cutegrad.tensor([[1], [0]])
    mask = cutegrad.tensor(rng.integers(0, 2, size=(4, 5)).astype(bool))
    return [(i,), (slice(None), cutegrad.tensor([4, 0])), (i, slice(1, 4)), (j, cutegrad.tensor([2, 4, 0])),
            (mask,), (Ellipsis, cutegrad.tensor([-1, 0])), (None, i), (1, cutegrad.tensor([0, 2]))]


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.int64])
def test_index_and_index_put(dtype):
    rng = np.random.default_rng(22)
    x = rand(rng, (4, 5, 3), dtype, -5, 5)
    for key in _index_keys(rng):
        gkey = tuple(cuda_of(k) for k in key)
        got = impl("index", CUDA)(cuda_of(x), gkey)
        np.testing.assert_array_equal(values(got), values(impl("index", CPU)(x, key)))
        got_t = impl("index", CUDA)(cuda_of(x).transpose(0, 1).transpose(0, 1), gkey)
        np.testing.assert_array_equal(values(got_t), values(got))
        shape = impl("index", CPU)(x, key).shape
        v = rand(rng, tuple(shape)[-1:] if len(shape) else (), dtype, -5, 5)
        for accumulate in (False, True):
            if not accumulate and any(isinstance(k, cutegrad.Tensor) and k.dtype is dt.int64 and
                                      len(set(k.numpy().reshape(-1).tolist())) < k.numel() for k in key):
                continue  # duplicate targets without accumulate: which write wins is unspecified
            a = x.clone()
            b = cuda_of(x)
            impl("index_put_", CPU)(a, key, v, accumulate)
            impl("index_put_", CUDA)(b, gkey, cuda_of(v), accumulate)
            assert_close(b, a, dtype, scale=5.0)
            impl("index_put_", CPU)(a, key, 2, accumulate)
            impl("index_put_", CUDA)(b, gkey, 2, accumulate)
            assert_close(b, a, dtype, scale=5.0)


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.int64])
def test_cat_and_one_hot(dtype):
    rng = np.random.default_rng(23)
    parts = [rand(rng, (2, n, 3), dtype, 0, 9) for n in (1, 0, 4, 2)]
    for dim, ps in [(1, parts), (0, [p.transpose(0, 1) for p in parts[:1]] * 3), (2, [parts[2], parts[2][..., :1]])]:
        got = impl("cat", CUDA)([cuda_of(p) for p in ps], dim, dtype)
        np.testing.assert_array_equal(values(got), values(impl("cat", CPU)(ps, dim, dtype)))
    got = impl("cat", CUDA)([cuda_of(parts[0]), cuda_of(parts[0].to(dt.float64))], 1, dt.float64)
    np.testing.assert_array_equal(values(got), values(impl("cat", CPU)([parts[0], parts[0].to(dt.float64)], 1,
                                                                        dt.float64)))
    idx = cutegrad.tensor(rng.integers(0, 7, size=(3, 4)))
    np.testing.assert_array_equal(values(impl("one_hot", CUDA)(cuda_of(idx), 7)), values(impl("one_hot", CPU)(idx, 7)))


# --- random ------------------------------------------------------------------------------
def test_random_distributions_and_seeding():
    dev = cutegrad.device("cuda")
    cutegrad.manual_seed(123)
    u = values(impl("uniform", CUDA)((200_001,), -2.0, 3.0, dt.float32, dev, None))
    assert u.min() >= -2.0 and u.max() < 3.0 and abs(u.mean() - 0.5) < 0.02
    nrm = values(impl("normal", CUDA)((100_003,), 1.0, 2.0, dt.float32, dev, None))
    assert abs(nrm.mean() - 1.0) < 0.03 and abs(nrm.std() - 2.0) < 0.03
    r = values(impl("randint", CUDA)(-3, 5, (10_001,), dt.int64, dev, None))
    assert set(np.unique(r).tolist()) == set(range(-3, 5))
    m = values(impl("bernoulli_scaled", CUDA)((50_001,), 0.8, dt.bfloat16, dev, None))
    assert set(np.unique(m).tolist()) <= {0.0, float(np.float32(1 / 0.8).astype(dt.bfloat16.np))}
    assert abs((m > 0).mean() - 0.8) < 0.01
    p = values(impl("randperm", CUDA)(1000, dt.int64, dev, None))
    assert sorted(p.tolist()) == list(range(1000))
    # the same seed gives the same numbers; consecutive draws differ
    cutegrad.manual_seed(7)
    a = values(impl("uniform", CUDA)((1000,), 0.0, 1.0, dt.float32, dev, None))
    b = values(impl("uniform", CUDA)((1000,), 0.0, 1.0, dt.float32, dev, None))
    cutegrad.manual_seed(7)
    a2 = values(impl("uniform", CUDA)((1000,), 0.0, 1.0, dt.float32, dev, None))
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)


def test_dropout_mask_replays_fresh_under_graph_capture():
    from cutegrad import graphs
    dev = cutegrad.device("cuda")
    cutegrad.manual_seed(11)
    eager = [values(impl("bernoulli_scaled", CUDA)((4096,), 0.5, dt.float32, dev, None)) for _ in range(3)]
    cutegrad.manual_seed(11)
    g = graphs.CUDAGraph()
    with graphs.graph(g):
        out = impl("bernoulli_scaled", CUDA)((4096,), 0.5, dt.float32, dev, None)
    # capture reserved offsets but ran nothing; replays draw what eager draws in sequence
    cutegrad.manual_seed(11)
    for want in eager:
        g.replay()
        np.testing.assert_array_equal(values(out), want)


# --- backward through the ops on CUDA -------------------------------------------------------
def _loss_functions():
    F = cutegrad.nn.functional

    def mlp(x, w, b):
        h = F.gelu(cutegrad.matmul(x, w) + b)
        return (h * h).mean()

    def attention_like(x, w, b):
        s = cutegrad.softmax(cutegrad.matmul(x, w), dim=-1)
        return (s * cutegrad.log_softmax(x.sum(-1, keepdim=True) + b, dim=0)).sum()

    def norms(x, w, b):
        y = F.layer_norm(x, (x.shape[-1],), w[0], b) + F.rms_norm(x, (x.shape[-1],), w[1])
        return (y.tanh() * cutegrad.sigmoid(y)).sum()

    def indexing(x, w, b):
        idx = cutegrad.tensor([2, 0, 2, 1], device=x.device)
        rows = x[idx] * w[1]
        return (rows.exp().sum(0) + b).max() + F.silu(x).var() + x.logsumexp(dim=1).sum()

    def reductions(x, w, b):
        return x.abs().amax(dim=1).sum() + (x.pow(2) / (w[0] * w[0] + 1)).mean() + x.clamp(-0.5, 0.5).sum()

    def cross_entropy(x, w, b):
        target = cutegrad.tensor([1, 0, 3, 2], device=x.device)
        return F.cross_entropy(cutegrad.matmul(x, w)[:, :4] + b[:4], target, label_smoothing=0.1)

    return [mlp, attention_like, norms, indexing, reductions, cross_entropy]


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16])
@pytest.mark.parametrize("fn", _loss_functions(), ids=lambda f: f.__name__)
def test_backward_on_cuda_matches_cpu(fn, dtype):
    rng = np.random.default_rng(24)
    x0 = rng.uniform(-1, 1, size=(4, 6))
    w0 = rng.uniform(-1, 1, size=(6, 6))
    b0 = rng.uniform(-1, 1, size=(6,))
    # the float64 reference starts from the inputs as the GPU sees them (rounded to dtype):
    # a row of small variance amplifies input rounding far beyond the dtype's tolerance
    x0, w0, b0 = (v.astype(dtype.np).astype(np.float64) for v in (x0, w0, b0))
    results = {}
    # float32 is checked against float64; a 16-bit run against the CPU backend
    # in the same dtype (same rounding points), since the losses here
    # (normalisation followed by saturating functions) amplify 16-bit rounding
    # of intermediates far beyond any fixed tolerance against float64.
    ref_dtype = dt.float64 if dtype is dt.float32 else dtype
    for device, dty in (("cpu", ref_dtype), ("cuda", dtype)):
        x, w, b = (cutegrad.tensor(v, dtype=dty, device=device, requires_grad=True) for v in (x0, w0, b0))
        loss = fn(x, w, b)
        loss.backward()
        results[device] = [loss] + [t.grad for t in (x, w, b)]
    tol = 1e-4 if dtype is dt.float32 else 5e-2
    for got, ref in zip(results["cuda"], results["cpu"]):
        if ref is None:  # an argument the loss does not use gets no gradient on either device
            assert got is None
            continue
        g, r = values(got), values(ref)
        scale = max(1.0, float(np.abs(r).max()))
        np.testing.assert_allclose(g, r, rtol=tol, atol=tol * scale)


# --- scans, sorting, data-dependent shapes --------------------------------------------------
@pytest.mark.parametrize("dtype", FLOATS + [dt.int64, dt.bool_])
def test_cumsum(dtype):
    rng = np.random.default_rng(26)
    for shape, dim in [((7,), 0), ((3, 5), 1), ((3, 5), 0), ((2, 300, 3), 1), ((0, 4), 1)]:
        x = rand(rng, shape, dtype, -3, 3)
        out_dtype = dt.int64 if not dtype.is_floating_point else dtype
        check("cumsum", x, dim, out_dtype, scale=3.0 * shape[dim])
        if len(shape) == 2:
            check("cumsum", x.t(), 1 - dim, out_dtype, scale=3.0 * shape[dim])


@pytest.mark.parametrize("dtype", FLOATS + [dt.int64, dt.int32])
def test_sort_and_topk(dtype):
    rng = np.random.default_rng(27)
    for shape, dim in [((7,), 0), ((3, 50), 1), ((50, 3), 0), ((2, 9000), 1), ((4, 1), 1), ((0, 3), 1)]:
        x = rand(rng, shape, dtype, -4, 4)  # integers: ties, so stability matters
        for descending in (False, True):
            for count in {shape[dim], min(3, shape[dim])}:
                check("sort", x, dim, descending, count)
    x = cutegrad.tensor([[1.0, float("nan"), -2.0, 1.0, float("nan"), float("-inf")]], dtype=FLOATS[0])
    for descending in (False, True):
        check("sort", x, 1, descending, 6)


@pytest.mark.parametrize("dtype", [dt.float32, dt.int64, dt.bool_])
def test_nonzero(dtype):
    rng = np.random.default_rng(28)
    for shape in [(), (7,), (3, 4, 5), (0, 2)]:
        x = rand(rng, shape, dtype, 0, 2)
        got = impl("nonzero", CUDA)(cuda_of(x))
        np.testing.assert_array_equal(values(got), values(impl("nonzero", CPU)(x)))


def test_multinomial():
    dev = cutegrad.device("cuda")
    probs = cutegrad.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 1.0, 0.0]], device=dev)
    cutegrad.manual_seed(3)
    draws = values(impl("multinomial", CUDA)(probs, 4000, True, None))
    assert draws.shape == (2, 4000) and not np.any(draws[:, :] == 1)
    np.testing.assert_allclose(np.bincount(draws[0].astype(int), minlength=4) / 4000, [0.1, 0.0, 0.6, 0.3], atol=0.03)
    assert np.all(draws[1] == 2)
    once = values(impl("multinomial", CUDA)(cutegrad.tensor([[1.0, 2.0, 3.0, 4.0]], device=dev), 4, False, None))
    assert sorted(once[0].tolist()) == [0, 1, 2, 3]


# --- fused cross-entropy (CUDA-only kernels, checked against the composite CPU op) --------
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_cross_entropy_rows(dtype, label_smoothing):
    from cutegrad.backends.cuda import cross_entropy_rows, cross_entropy_rows_backward
    F = cutegrad.nn.functional
    rng = np.random.default_rng(25)
    for rows, classes in [(1, 1), (5, 7), (33, 1000), (4, 5000), (0, 3)]:
        logits = rand(rng, (rows, classes), dtype, -8, 8)
        target = cutegrad.tensor(rng.integers(0, classes, size=rows), dtype=dt.int64)
        if rows > 2:
            target[1] = -100  # ignored row
        g_rows = rng.uniform(-1, 1, size=rows)
        x64 = logits.to(dt.float64).detach().requires_grad_(True)
        ref = F.cross_entropy(x64, target, reduction="none", label_smoothing=label_smoothing)
        (ref * cutegrad.tensor(g_rows, dtype=dt.float64)).sum().backward()
        loss, lse = cross_entropy_rows(cuda_of(logits), cuda_of(target), -100, label_smoothing)
        assert loss.dtype is dt.float32 and tuple(loss.shape) == (rows,)
        assert_close(loss, ref.detach(), dt.float32, scale=10.0)
        grad = cross_entropy_rows_backward(cuda_of(logits), cuda_of(target), lse,
                                           cutegrad.tensor(g_rows, dtype=dt.float32, device="cuda"), -100,
                                           label_smoothing)
        assert grad.dtype is dtype
        assert_close(grad, x64.grad if rows else cutegrad.zeros(0, classes, dtype=dt.float64), dtype, scale=1e-2)
    bad = cross_entropy_rows(cuda_of(rand(rng, (2, 3), dt.float32)), cuda_of(cutegrad.tensor([0, 7])))[0]
    with pytest.raises(IndexError, match="index 7 is out of bounds for dimension 1 with size 3"):
        cutegrad.cuda.synchronize()
    assert np.isnan(values(bad)[1]) and np.isfinite(values(bad)[0])


# --- argument validation --------------------------------------------------------------------
def test_bad_arguments_raise_before_launch():
    from cutegrad import _C
    with pytest.raises(ValueError, match="unknown unary code"):
        _C.elementwise(0, 99, 0, (3,), 1, 8, (1,), 1, 8, (1,), None, 0, -1, (), None, 0, -1, (), None, None, None, 0)
    with pytest.raises(ValueError, match="strides"):
        _C.elementwise(0, 0, 0, (3, 2), 1, 8, (2, 1), 1, 8, (1,), None, 0, -1, (), None, 0, -1, (), None, None,
                       None, 0)
    with pytest.raises(ValueError, match="overlap"):
        _C.elementwise(5, 0, 0, (3,), 1, 8, (0,), 1, 8, (1,), None, 0, -1, (), None, 0, -1, (), None, None, None, 0)
    with pytest.raises(ValueError, match="null pointer"):
        _C.elementwise(5, 0, 0, (3,), 1, 8, (1,), 0, 8, (1,), None, 0, -1, (), None, 0, -1, (), None, None, None, 0)
    with pytest.raises(ValueError, match="empty reduction"):
        _C.reduce(202, 0, 1, 8, (3, 0), (0, 1), [1], 1, 8, 0.0, 0, 0, 0)
    with pytest.raises(ValueError, match="workspace is a null pointer"):
        _C.reduce(200, 0, 1, 8, (3, 4), (4, 1), [0], 1, 8, 0.0, 0, 64, 0)
    with pytest.raises(ValueError, match="negative workspace"):
        _C.norm_backward(1, 1, 8, 3, 4, 0, 8, 1, 1, 8, 1, 1, 8, 1, 8, False, 0, -8, 0)
    with pytest.raises(ValueError, match="index must be an integer"):
        _C.gather((2,), 0, 2, 1, 8, (1,), 1, 8, (1,), 1, 8, (1,), 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        _C.random(0, 1, 8, 4, 0, 0, 2, 0, 0.0, 1.0, 0, 0, 0)


def test_every_compute_kernel_is_registered_and_tested():
    """Every kernel with a CPU implementation has a CUDA one, and a test in this file calls it."""
    import pathlib
    import re
    cpu_kernels = {k for k in KERNELS if has_impl(k, CPU)}
    assert not {k for k in cpu_kernels if not has_impl(k, CUDA)}
    referenced = set(re.findall(r'(?:impl|check)\("(\w+)"', pathlib.Path(__file__).read_text()))
    untested = cpu_kernels - STORAGE_KERNELS - referenced
    assert not untested, f"kernels without a CUDA test here: {sorted(untested)}"


# --- strided copies: packed (raw words, 16-byte packs) and tiled-transpose kernels ---------------
# (extent, permutation) pairs: the permutations that move the innermost dimension go through the
# transpose kernel when both unit-stride extents are >= 8; the others keep the innermost dimension
# and move raw words or W-byte packs (inner extents 32/64 allow 16-byte packs for every dtype).
PERMUTES = [
    ((3, 17, 33), (0, 2, 1)), ((1, 65, 127), (2, 1, 0)), ((17, 3, 8), (1, 0, 2)), ((127, 65), (1, 0)),
    ((2, 3, 17, 33), (0, 2, 1, 3)), ((2, 33, 3, 65), (0, 3, 1, 2)), ((4, 6, 10, 32), (0, 2, 1, 3)),
    ((3, 9, 8, 64), (2, 0, 1, 3)), ((33, 2, 65, 3), (3, 1, 2, 0)),
    ((2, 3, 1, 17, 33), (3, 0, 2, 4, 1)), ((2, 5, 3, 4, 8), (2, 0, 3, 1, 4)), ((3, 17, 2, 9, 16), (4, 3, 2, 1, 0)),
    ((3, 17, 2, 9, 16), (0, 2, 4, 1, 3)), ((2, 3, 1, 17, 33), (4, 1, 0, 3, 2)),
]


def _copy_source(rng, shape, dtype):
    lo, hi = (0, 100) if dtype in (dt.uint8, dt.bool_) else (-100, 100)
    return rand(rng, shape, dtype, lo, hi)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape,perm", PERMUTES, ids=["x".join(map(str, s)) + "-p" + "".join(map(str, p))
                                                      for s, p in PERMUTES])
def test_contiguous_of_permutes(shape, perm, dtype):
    rng = np.random.default_rng(len(shape) * 1000 + sum(shape))
    x = _copy_source(rng, shape, dtype)
    got = impl("contiguous", CUDA)(cuda_of(x).permute(*perm))
    assert got.is_contiguous() and got.dtype is dtype
    np.testing.assert_array_equal(values(got), np.transpose(values(x), perm))


SLICED_VIEWS = [
    ("step", lambda t: t[:, ::2]),
    ("step-permute", lambda t: t[:, ::2].permute(2, 0, 1)),
    ("offset-inner", lambda t: t[..., 1:]),  # inner extent 63 and a pointer off the 16-byte grid
    ("offset-transpose", lambda t: t[1:, :, 3:].transpose(1, 2)),
    ("step-inner", lambda t: t[..., ::3]),  # no unit stride on the source side
    ("narrow-rows", lambda t: t[:, 2:9, :32]),  # unit inner stride, 16-byte packs, gaps between rows
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name,view", SLICED_VIEWS, ids=[n for n, _ in SLICED_VIEWS])
def test_contiguous_of_sliced_views(name, view, dtype):
    rng = np.random.default_rng(len(name))
    x = _copy_source(rng, (5, 17, 64), dtype)
    got = impl("contiguous", CUDA)(view(cuda_of(x)))
    expect = impl("contiguous", CPU)(view(x))
    assert got.is_contiguous() and tuple(got.shape) == tuple(expect.shape)
    np.testing.assert_array_equal(values(got), values(expect))


@pytest.mark.parametrize("src", ALL_DTYPES)
def test_cast_of_permuted_and_sliced_views(src):
    rng = np.random.default_rng(12)
    x = _copy_source(rng, (3, 33, 40), src)
    views = [lambda t: t.permute(0, 2, 1), lambda t: t.permute(1, 0, 2), lambda t: t[:, ::2, 1:]]
    for dst in ALL_DTYPES:
        for v in views:
            got = impl("cast", CUDA)(v(cuda_of(x)), dst)
            expect = impl("cast", CPU)(v(x), dst)
            assert got.dtype is dst and got.is_contiguous()
            np.testing.assert_array_equal(values(got), values(expect))


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.float16, dt.float64, dt.int64, dt.uint8])
def test_copy_into_poisoned_strided_destinations(dtype):
    """copy_ into transposed and sliced destinations; untouched elements keep the poison."""
    rng = np.random.default_rng(13)
    poison = float("nan") if dtype.is_floating_point else 7
    for shape, perm in [((3, 33, 65), (0, 2, 1)), ((2, 17, 9, 32), (0, 2, 1, 3)), ((65, 127), (1, 0))]:
        src = _copy_source(rng, tuple(shape[p] for p in perm), dtype)
        for src_dtype in (dtype, dt.float32):
            base = cutegrad.full(shape, poison, dtype=dtype, device="cuda")
            impl("copy_", CUDA)(base.permute(*perm), cuda_of(src.to(src_dtype)))
            expect = np.transpose(values(src.to(src_dtype).to(dtype)), np.argsort(perm))
            np.testing.assert_array_equal(values(base), expect)
    # every other column of a wider buffer: the gaps must stay poisoned
    base = cutegrad.full((9, 66), poison, dtype=dtype, device="cuda")
    src = _copy_source(rng, (33, 9), dtype)
    impl("copy_", CUDA)(base[:, ::2], cuda_of(src).t())
    got = values(base)
    np.testing.assert_array_equal(got[:, ::2], values(src).T)
    if dtype.is_floating_point:
        assert np.isnan(got[:, 1::2]).all()
    else:
        assert (got[:, 1::2] == poison).all()


def test_large_permutes_cover_grid_stride_and_every_tile():
    """Attention-sized copies: (B, T, H, D) -> (B, H, T, D) and a big 2-D transpose, fp32 and bf16."""
    rng = np.random.default_rng(14)
    for dtype in (dt.float32, dt.bfloat16):
        x = rand(rng, (64, 80, 8, 32), dtype)
        got = impl("contiguous", CUDA)(cuda_of(x).permute(0, 2, 1, 3))
        np.testing.assert_array_equal(values(got), np.transpose(values(x), (0, 2, 1, 3)))
        y = rand(rng, (1031, 769), dtype)
        got = impl("contiguous", CUDA)(cuda_of(y).t())
        np.testing.assert_array_equal(values(got), values(y).T)


@pytest.mark.parametrize("dtype", FLOATS)
def test_row_broadcast_operands(dtype):
    """(..., N) op (N,) as a bias add issues it: the vectorized kernel's row-broadcast path when N is a
    multiple of 16 bytes, the strided kernel when it is not or the row is off the 16-byte grid."""
    rng = np.random.default_rng(15)
    for shape in [(1, 8), (3, 16), (65, 24), (7, 33), (5, 768), (2, 3, 64), (4, 12)]:
        n = shape[-1]
        a = rand(rng, shape, dtype)
        b = rand(rng, (n,), dtype)
        check("binary", C.ADD, a, b, dtype, dtype, scale=1.0)
        check("binary", C.MUL, b, a, dtype, dtype)
        check("where", rand(rng, shape, dt.bool_), a, b, dtype)
        # a row one element into a buffer: not 16-byte aligned
        wide = rand(rng, (n + 1,), dtype)
        got = impl("binary", CUDA)(C.ADD, cuda_of(a), cuda_of(wide)[1:], dtype, dtype)
        ref = impl("binary", CPU)(C.ADD, f64(a), f64(wide)[1:], dt.float64, dt.float64)
        assert_close(got, ref, dtype, scale=1.0)
        # broadcast copy into a poisoned destination
        dst = cutegrad.full(shape, float("nan"), dtype=dtype, device="cuda")
        impl("copy_", CUDA)(dst, cuda_of(b))
        np.testing.assert_array_equal(values(dst), np.broadcast_to(values(b), shape))


# --- causal softmax and the fused softmax backward (attention) ---------------------------
CAUSAL_LS = [(1, 1), (3, 5), (5, 3), (17, 17), (128, 128), (1024, 1024)]


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA for the reference")
    return torch


def _torch_of(torch, t, dtype):
    return torch.tensor(values(t), device="cuda").to(getattr(torch, dtype.name))


def _causal_keep(L, S):
    """The composite's mask in _sdpa: _tril(ones((L, S))) keeps column j of query row i where j <= i."""
    return np.tril(np.ones((L, S), dtype=bool))


# half the spacing of each dtype's subnormals: the absolute error of one rounding near 0
SUBNORMAL_HALF_STEP = {dt.float32: 2.0 ** -150, dt.bfloat16: 2.0 ** -134, dt.float16: 2.0 ** -25}


def _assert_within(got, ref, bound, what):
    err = np.abs(values(got) - ref) if isinstance(got, cutegrad.Tensor) else np.abs(got - ref)
    assert np.all(np.isfinite(err)), f"{what}: non-finite values"
    assert np.all(err <= bound), f"{what}: max error {err.max()}, max excess {(err - bound).max()}"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("L,S", CAUSAL_LS)
def test_softmax_causal(dtype, L, S):
    """softmax_causal (CUDA only) against the CPU softmax in float64 of the masked_fill composite, and torch."""
    rng = np.random.default_rng(31)
    x = rand(rng, (2, 3, L, S), dtype, -10, 10)
    keep = _causal_keep(L, S)
    masked = np.where(keep, values(x), -np.inf)
    ref = values(impl("softmax", CPU)(cutegrad.tensor(masked, dtype=dt.float64), 3, False))
    got = impl("softmax_causal", CUDA)(cuda_of(x))
    assert got.dtype is dtype and tuple(got.shape) == (2, 3, L, S)
    g = values(got)
    np.testing.assert_array_equal(g[..., ~keep], 0.0)  # exactly 0, not merely small
    # as test_softmax: exp(x - max) carries the rounding of x - max
    _assert_within(g, ref, TOL[dtype] * (np.abs(ref) + 1e-2), "against float64")
    torch = _torch_cuda()
    tx = _torch_of(torch, x, dtype)
    tkeep = torch.tensor(keep, device="cuda")
    tref = torch.softmax(tx.masked_fill(~tkeep, float("-inf")), -1).double().cpu().numpy()
    _assert_within(g, tref, 2 * TOL[dtype] * (np.abs(ref) + 1e-2), "against torch")


def test_softmax_causal_non_contiguous_and_bad_input():
    rng = np.random.default_rng(32)
    x = rand(rng, (2, 9, 7), dt.float32, -5, 5)
    xt = cuda_of(x).transpose(1, 2)  # (2, 7, 9): a non-contiguous view
    keep = _causal_keep(7, 9)
    masked = np.where(keep, np.transpose(values(x), (0, 2, 1)), -np.inf)
    ref = values(impl("softmax", CPU)(cutegrad.tensor(masked, dtype=dt.float64), 2, False))
    _assert_within(impl("softmax_causal", CUDA)(xt), ref, TOL[dt.float32] * (np.abs(ref) + 1e-2), "view")
    with pytest.raises(RuntimeError, match="softmax_causal"):
        impl("softmax_causal", CUDA)(cuda_of(rand(rng, (5,), dt.float32)))


def _softmax_grad_ref(y, dy, dim, log):
    """float64 dx of softmax/log_softmax from the (rounded) output y and dy, and an error bound per element
    of one rounding of each operation in the accumulation dtype."""
    if log:
        s = dy.sum(dim, keepdims=True)
        return dy - np.exp(y) * s, np.abs(dy) + np.exp(y) * np.abs(dy).sum(dim, keepdims=True)
    s = (dy * y).sum(dim, keepdims=True)
    return y * (dy - s), np.abs(y) * (np.abs(dy) + np.abs(dy * y).sum(dim, keepdims=True))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_backward_kernel(dtype, log):
    """softmax_backward (CUDA only) against float64 on the same rounded y and dy, and against torch's
    _softmax_backward_data / _log_softmax_backward_data on the same GPU."""
    rng = np.random.default_rng(33)
    cases = [((2, 3, L, S), 3) for L, S in CAUSAL_LS] + [((7,), 0), ((3, 5), 0), ((2, 3, 4), 1), ((4, 1000), 1),
                                                          ((2, 5000), 1), ((0, 3), 1), ((5, 1), 0)]
    checked = []
    for shape, dim in cases:
        x = rand(rng, shape, dtype, -6, 6)
        y = impl("softmax", CPU)(x, dim, log)  # rounded to dtype, as the forward saves it
        dy = rand(rng, shape, dtype, -3, 3)
        got = impl("softmax_backward", CUDA)(cuda_of(y), cuda_of(dy), dim, log)
        assert got.dtype is dtype and tuple(got.shape) == shape
        ref, mag = _softmax_grad_ref(values(y), values(dy), dim, log)
        bound = TOL[dtype] * (np.abs(ref) + mag) + SUBNORMAL_HALF_STEP[dtype]
        _assert_within(got, ref, bound, f"{shape} dim {dim} against float64")
        checked.append((shape, dim, y, dy, got, bound))
    torch = _torch_cuda()
    for shape, dim, y, dy, got, bound in checked:
        ty, tdy = _torch_of(torch, y, dtype), _torch_of(torch, dy, dtype)
        tdata = torch._log_softmax_backward_data if log else torch._softmax_backward_data
        tref = tdata(tdy, ty, dim, ty.dtype).double().cpu().numpy()
        _assert_within(got, tref, 2 * bound, f"{shape} dim {dim} against torch")


def test_softmax_backward_kernel_views_and_bad_input():
    rng = np.random.default_rng(34)
    y = impl("softmax", CPU)(rand(rng, (6, 5), dt.float32), 1, False)
    dy = rand(rng, (5, 6), dt.float32)
    # dy as a transposed view, y contiguous; dy in another dtype than y is cast to y's
    got = impl("softmax_backward", CUDA)(cuda_of(y), cuda_of(dy).t(), 1, False)
    ref, mag = _softmax_grad_ref(values(y), values(dy).T, 1, False)
    _assert_within(got, ref, TOL[dt.float32] * (np.abs(ref) + mag), "view")
    got = impl("softmax_backward", CUDA)(cuda_of(y), cuda_of(dy).t().to(dt.bfloat16), 1, False)
    assert got.dtype is dt.float32
    with pytest.raises(RuntimeError, match="softmax_backward: grad_output of shape"):
        impl("softmax_backward", CUDA)(cuda_of(y), cuda_of(dy), 1, False)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("log", [False, True])
def test_softmax_autograd_uses_fused_backward(dtype, log):
    """cutegrad.softmax/log_softmax backward on CUDA (the fused kernel) against the CPU composite in float64;
    with create_graph the composite runs on CUDA and agrees."""
    rng = np.random.default_rng(35)
    fn = cutegrad.log_softmax if log else cutegrad.softmax
    for shape, dim in [((4, 33), 1), ((3, 17, 5), 1), ((2, 1024), -1)]:
        x = rand(rng, shape, dtype, -4, 4)
        g = rand(rng, shape, dtype, -2, 2)
        xc = cuda_of(x).requires_grad_()
        fn(xc, dim).backward(cuda_of(g))
        x64 = f64(x).requires_grad_()
        fn(x64, dim).backward(f64(g))
        y = values(fn(x64, dim))
        ref, mag = _softmax_grad_ref(y, values(g), dim % len(shape), log)
        if log:  # y = log p is rounded relative to |y|, exp(y) then carries |y| times that error
            mag = mag * (1.0 + np.abs(y))
        # y itself is rounded to dtype on the GPU, and the create_graph composite rounds after each op
        bound = 4 * (TOL[dtype] * (np.abs(ref) + mag) + SUBNORMAL_HALF_STEP[dtype])
        _assert_within(xc.grad, values(x64.grad), bound, f"{shape} dim {dim}")
        xg = cuda_of(x).requires_grad_()
        (d,) = cutegrad.autograd.grad(fn(xg, dim), xg, cuda_of(g), create_graph=True)
        _assert_within(d.detach(), values(x64.grad), bound, "create_graph")


SDPA_CASES = [(1, 1, 1, 1, 32), (2, 3, 5, 9, 32), (2, 3, 9, 5, 64), (2, 3, 17, 17, 64), (1, 4, 128, 128, 128),
              (1, 2, 1024, 1024, 64)]
SDPA_TOL = {dt.float32: 2e-5, dt.bfloat16: 3e-2, dt.float16: 5e-3}


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("B,H,L,S,D", SDPA_CASES)
def test_sdpa_causal_forward_backward(dtype, B, H, L, S, D):
    """scaled_dot_product_attention(is_causal=True) on CUDA (q scaled before the GEMM, causal softmax kernel,
    fused softmax backward) against the CPU composite in float64 and torch on the same GPU: relative error
    in norm of the output and of dq, dk, dv."""
    F = cutegrad.nn.functional
    rng = np.random.default_rng(36)
    q, k, v = (rand(rng, (B, H, n, D), dtype, -1, 1) for n in (L, S, S))
    g = rand(rng, (B, H, L, D), dtype, -1, 1)
    dev = [cuda_of(t).requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*dev, is_causal=True)
    assert out.dtype is dtype
    out.backward(cuda_of(g))
    ref_in = [f64(t).requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    ref.backward(f64(g))

    def rel(a, b):
        a, b = values(a), values(b)
        assert np.all(np.isfinite(a))
        return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)

    tol = SDPA_TOL[dtype]
    for name, a, b in [("out", out, ref)] + [(f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", dev, ref_in)]:
        assert rel(a, b) <= tol, (name, rel(a, b))
    torch = _torch_cuda()
    tin = [_torch_of(torch, t, dtype).requires_grad_() for t in (q, k, v)]
    tout = torch.nn.functional.scaled_dot_product_attention(*tin, is_causal=True)
    tout.backward(_torch_of(torch, g, dtype))
    for name, a, t in [("out", out, tout)] + [(f"d{n}", c.grad, tt.grad) for n, c, tt in zip("qkv", dev, tin)]:
        tv = t.detach().double().cpu().numpy()
        # fp32: torch's fused attention may accumulate in another order or precision than ours.
        # The floor on the scale: with one key, dq is exactly 0 (softmax of one score is constant);
        # ours is 0 and torch's is rounding noise of ~1e-7.
        scale = max(np.linalg.norm(tv), 1e-3 * np.sqrt(tv.size))
        assert np.linalg.norm(values(a) - tv) / scale <= max(2 * tol, 1e-4), name


def test_sdpa_causal_under_autocast_runs_in_bf16():
    """Under bf16 autocast the causal kernel runs in bf16 as the composite did; the result matches float64."""
    F = cutegrad.nn.functional
    rng = np.random.default_rng(37)
    q, k, v = (rand(rng, (2, 2, 33, 32), dt.float32, -1, 1) for _ in range(3))
    with cutegrad.autocast("cuda", dtype=dt.bfloat16):
        out = F.scaled_dot_product_attention(cuda_of(q), cuda_of(k), cuda_of(v), is_causal=True)
    assert out.dtype is dt.bfloat16
    ref = F.scaled_dot_product_attention(*(f64(t) for t in (q, k, v)), is_causal=True)
    err = np.linalg.norm(values(out) - values(ref)) / np.linalg.norm(values(ref))
    assert err <= SDPA_TOL[dt.bfloat16], err
