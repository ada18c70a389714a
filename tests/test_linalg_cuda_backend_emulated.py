"""The CUDA backend's matmul and fused-linear kernels (frontend/backends/cuda/linalg.py) without
a GPU: host memory stands in for device memory and an emulator of the `_C.gemm` contract
(docs/kernels.md: integer codes, (batch, M, K) / (batch, K, N) / (batch, M, N) shapes and
strides, the epilogue order) computes each call in float64 from the raw addresses and strides
the backend passes.  Outputs start as NaN.  This checks what the backend asks for: operand
layouts, epilogue codes, bias / aux pointers, accumulation, against the CPU backend."""
import ctypes
import math

import ml_dtypes
import numpy as np
import pytest

import cutegrad as cg
from cutegrad import _gemm
from cutegrad.backends.cuda import linalg
from cutegrad.device import CPU
from cutegrad.dispatch import kernel

ITEM = {0: np.dtype(ml_dtypes.bfloat16), 1: np.dtype(np.float16), 2: np.dtype(np.float32), 3: np.dtype(np.float32)}
TF32 = _gemm.DTYPES["tf32"]
EPI = {v: k for k, v in _gemm.EPILOGUES.items()}
K0, K1 = math.sqrt(2.0 / math.pi), 0.044715


def _view(addr, shape, strides, code):
    dtype = ITEM[code]
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides) if n > 0)
    buf = (ctypes.c_char * (span * dtype.itemsize)).from_address(addr)
    flat = np.frombuffer(buf, dtype=dtype)
    return np.lib.stride_tricks.as_strided(flat, shape=shape, strides=[s * dtype.itemsize for s in strides])


def _tf32(x):
    """fp32 values as a TF32 MMA reads them: the low 13 mantissa bits dropped."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


class Emulator:
    """_C.gemm on host addresses; records each call's epilogue name and accumulate flag."""

    def __init__(self):
        self.calls = []
        self.shapes = []  # (a_shape, a_strides) of each call

    def __call__(self, a, a_shape, a_strides, b, b_shape, b_strides, d, d_shape, d_strides, dtype, out_dtype,
                 epilogue, bias, aux, aux_strides, accumulate, stream, path, tile_n, split_k, device):
        assert isinstance(dtype, int) and isinstance(out_dtype, int) and isinstance(epilogue, int)
        name = EPI[epilogue]
        self.calls.append((name, accumulate, "tf32" if dtype == TF32 else ITEM[dtype].name, ITEM[out_dtype].name))
        self.shapes.append((a_shape, a_strides))
        batch, m, k = a_shape
        assert b_shape[:2] == (batch, k) and d_shape == (batch, m, b_shape[2])
        n = b_shape[2]
        assert a_strides[2] == 1 or a_strides[1] == 1 or k <= 1 or m <= 1, "A needs a unit stride"
        assert b_strides[1] == 1 or b_strides[2] == 1 or k <= 1 or n <= 1, "B needs a unit stride"
        assert d_strides[2] == 1, "D needs unit stride along N"
        A = _view(a, a_shape, a_strides, dtype)
        B = _view(b, b_shape, b_strides, dtype)
        if dtype == TF32:
            assert out_dtype == _gemm.DTYPES["fp32"], "tf32 operands write fp32"
            assert a_strides[2] == 1 or k <= 1, "TF32 wgmma reads A K-major"
            assert b_strides[1] == 1 or k <= 1, "TF32 wgmma reads B K-major"
            A, B = _tf32(A), _tf32(B)
        A, B = A.astype(np.float64), B.astype(np.float64)
        D = _view(d, d_shape, d_strides, out_dtype)
        v = A @ B
        if accumulate:
            v = v + D.astype(np.float64)
        if name in ("bias", "bias_gelu", "bias_residual", "bias_gelu_aux"):
            v = v + _view(bias, (n,), (1,), out_dtype).astype(np.float64)
        if name == "bias_gelu_aux":
            X = _view(aux, d_shape, aux_strides, out_dtype)
            X[...] = v.astype(ITEM[out_dtype])
            v = X.astype(np.float64)
        if name in ("gelu", "bias_gelu", "bias_gelu_aux"):
            v = 0.5 * v * (1.0 + np.tanh(K0 * (v + K1 * v ** 3)))
        if name == "gelu_bwd":
            x = _view(aux, d_shape, aux_strides, out_dtype).astype(np.float64)
            t = np.tanh(K0 * (x + K1 * x ** 3))
            v = v * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * K0 * (1.0 + 3 * K1 * x * x))
        if name in ("residual", "bias_residual"):
            v = v + _view(aux, d_shape, aux_strides, out_dtype).astype(np.float64)
        D[...] = v.astype(ITEM[out_dtype])
        return "emulated"


def _addr(t):
    return t._np.__array_interface__["data"][0] if t._np.size else 1 << 20


@pytest.fixture
def emulated(monkeypatch):
    emu = Emulator()
    monkeypatch.setattr(linalg, "_gemm", lambda: emu)
    monkeypatch.setattr(linalg, "_stream", lambda idx: 0)
    monkeypatch.setattr(linalg, "_ptr", _addr)
    monkeypatch.setattr(linalg, "_empty", lambda shape, dtype, dev, stream: cg.full(shape, float("nan"), dtype=dtype))
    monkeypatch.setattr(linalg, "_contig", lambda x, stream: x.contiguous())
    monkeypatch.setattr(linalg, "_fill", lambda out, value, stream: out._np.fill(value))
    monkeypatch.setattr(linalg, "_cast_new", lambda x, dtype, stream: x.to(dtype))
    monkeypatch.setattr(linalg, "_copy_into", lambda dst, src, stream: dst.copy_(src))
    return emu


def cpu_impl(name):
    return kernel(name).impl[CPU]


def rand(rng, shape, dtype):
    return cg.tensor(rng.standard_normal(shape), dtype=cg.float32).to(dtype)


def close(got, want, dtype):
    got = got.to(cg.float64).numpy()
    want = want.to(cg.float64).numpy()
    assert not np.isnan(got).any(), "an output element was not written"
    tol = {cg.float32: 1e-5, cg.bfloat16: 2e-2, cg.float16: 4e-3}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


DTYPES = [cg.float32, cg.bfloat16, cg.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,)], ids=str)
def test_linear_forward_every_epilogue(emulated, dtype, shape):
    rng = np.random.default_rng(len(shape))
    x, w, b = rand(rng, shape, dtype), rand(rng, (6, 7), dtype), rand(rng, (6,), dtype)
    res = rand(rng, shape[:-1] + (6,), dtype)
    gpu, cpu = linalg.linear, cpu_impl("linear")
    for args, epilogue in (((x, w, None, None, False, dtype), "none"), ((x, w, b, None, False, dtype), "bias"),
                           ((x, w, b, None, True, dtype), "bias_gelu_aux"), ((x, w, None, None, True, dtype),
                                                                             "bias_gelu_aux"),
                           ((x, w, b, res, False, dtype), "bias_residual"), ((x, w, None, res, False, dtype),
                                                                              "residual")):
        emulated.calls.clear()
        (y, z), (y_ref, z_ref) = gpu(*args), cpu(*args)
        assert emulated.calls[0][0] == epilogue and len(emulated.calls) == 1
        close(y, y_ref, dtype)
        if args[4]:
            close(z, z_ref, dtype)


def test_fp32_residual_with_bf16_operands_writes_fp32(emulated):
    rng = np.random.default_rng(1)
    x, w = rand(rng, (4, 8), cg.bfloat16), rand(rng, (8, 8), cg.bfloat16)
    b, res = rand(rng, (8,), cg.float32), rand(rng, (4, 8), cg.float32)
    y, _ = linalg.linear(x, w, b, res, False, cg.float32)
    assert y.dtype is cg.float32 and emulated.calls[-1] == ("bias_residual", False, "bfloat16", "float32")
    close(y, cpu_impl("linear")(x, w, b, res, False, cg.float32)[0], cg.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_input_and_weight_gradients(emulated, dtype):
    rng = np.random.default_rng(2)
    g, w, x, z = rand(rng, (2, 5, 6), dtype), rand(rng, (6, 7), dtype), rand(rng, (2, 5, 7), dtype), \
        rand(rng, (2, 5, 7), dtype)
    close(linalg.linear_input_grad(g, w, None), cpu_impl("linear_input_grad")(g, w, None), dtype)
    close(linalg.linear_input_grad(g, w, z), cpu_impl("linear_input_grad")(g, w, z), dtype)
    assert [c[0] for c in emulated.calls] == ["none", "gelu_bwd"]
    for out in (dtype, cg.float32):
        close(linalg.linear_weight_grad(g, x, out, None), cpu_impl("linear_weight_grad")(g, x, out, None), out)
    into = rand(rng, (6, 7), cg.float32)
    want = cpu_impl("linear_weight_grad")(g, x, cg.float32, into.clone())
    got = linalg.linear_weight_grad(g, x, cg.float32, into)
    assert got is into and emulated.calls[-1][1] is True
    close(got, want, cg.float32)


def test_transposed_and_sliced_operands(emulated):
    """A non-contiguous input (rows not collapsible), a transposed weight and a strided residual."""
    rng = np.random.default_rng(3)
    base = rand(rng, (3, 8, 10), cg.float32)
    x = base[:, ::2, :7]  # rows do not flatten into one stride
    w = rand(rng, (7, 6), cg.float32).t()  # (6, 7) with unit stride along out_features
    res = rand(rng, (3, 4, 12), cg.float32)[:, :, :6]
    y, _ = linalg.linear(x, w, None, res, False, cg.float32)
    close(y, cpu_impl("linear")(x, w, None, res, False, cg.float32)[0], cg.float32)
    g = rand(rng, (3, 4, 6), cg.float32)
    close(linalg.linear_input_grad(g, w, None), cpu_impl("linear_input_grad")(g, w, None), cg.float32)


def _at_precision(level, fn, *args):
    cg.set_float32_matmul_precision(level)
    try:
        return fn(*args)
    finally:
        cg.set_float32_matmul_precision("highest")


def _rel_err(got, want):
    got, want = got.to(cg.float64).numpy(), want.to(cg.float64).numpy()
    assert not np.isnan(got).any()
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("a_shape,b_shape", [((2, 5, 7), (7, 3)), ((3, 4, 6), (3, 6, 5)), ((4, 6), (5, 6)),
                                             ((3, 4, 6), (6, 5))], ids=str)
def test_matmul_follows_the_float32_precision(emulated, a_shape, b_shape):
    """highest: one fp32 GEMM; medium: one GEMM of bfloat16 copies (error ~ 2^-8); high: one TF32
    GEMM (error ~ 2^-10) on K-major operands (an N-major B is copied first)."""
    rng = np.random.default_rng(4)
    a, b = rand(rng, a_shape, cg.float32), rand(rng, b_shape, cg.float32)
    if a_shape == (4, 6):
        b = b.t()  # a K-major B as a transposed view: used as it is
    want = cpu_impl("matmul")(a.to(cg.float64), b.to(cg.float64), cg.float64)
    for level, dtype, bound in (("highest", "float32", 1e-6), ("medium", "bfloat16", 2e-2), ("high", "tf32", 4e-3)):
        emulated.calls.clear()
        out = _at_precision(level, linalg.matmul, a, b, cg.float32)
        assert set(emulated.calls) == {("none", False, dtype, "float32")}, level
        err = _rel_err(out, want)
        assert err < bound, (level, err)
        if level == "high":
            assert err > 1e-6, "TF32 products should not be exact fp32 ones"


def test_high_precision_runs_every_linear_gemm_on_tf32(emulated):
    """Forward with each epilogue, input gradient (the weight copied K-major) and weight gradient
    (both operands copied K-major, accumulating too): one TF32 GEMM each, within TF32 error."""
    rng = np.random.default_rng(6)
    x, w, b = rand(rng, (3, 5, 8), cg.float32), rand(rng, (6, 8), cg.float32), rand(rng, (6,), cg.float32)
    res, g, z = rand(rng, (3, 5, 6), cg.float32), rand(rng, (3, 5, 6), cg.float32), rand(rng, (3, 5, 8), cg.float32)
    f64 = [t.to(cg.float64) for t in (x, w, b, res, g, z)]
    for args, epilogue in (((b, None, False), "bias"), ((b, None, True), "bias_gelu_aux"),
                           ((b, res, False), "bias_residual"), ((None, res, False), "residual")):
        emulated.calls.clear()
        y, _ = _at_precision("high", linalg.linear, x, w, *args, cg.float32)
        ref = [f64[2] if args[0] is not None else None, f64[3] if args[1] is not None else None, args[2]]
        want = cpu_impl("linear")(f64[0], f64[1], *ref, cg.float64)[0]
        assert emulated.calls == [(epilogue, False, "tf32", "float32")]
        assert 1e-7 < _rel_err(y, want) < 4e-3, epilogue
    emulated.calls.clear()
    dx = _at_precision("high", linalg.linear_input_grad, g, w, z)
    assert emulated.calls == [("gelu_bwd", False, "tf32", "float32")]
    assert _rel_err(dx, cpu_impl("linear_input_grad")(f64[4], f64[1], f64[5])) < 4e-3
    emulated.calls.clear()
    into = rand(rng, (6, 8), cg.float32)
    want = cpu_impl("linear_weight_grad")(f64[4], f64[0], cg.float64, into.to(cg.float64))
    gw = _at_precision("high", linalg.linear_weight_grad, g, x, cg.float32, into)
    assert gw is into and emulated.calls == [("none", True, "tf32", "float32")]
    assert _rel_err(gw, want) < 4e-3


@pytest.mark.parametrize("out_f,accumulate", [(10, False), (36, True), (7, False), (16, True)], ids=str)
def test_narrow_head_weight_gradient_is_padded_for_the_tensor_cores(emulated, out_f, accumulate):
    """dY with 10 / 36 / 7-wide rows (not 16-byte multiples): the GEMM sees dY^T padded to a
    multiple of 8 rows (16 bytes of bf16) with aligned strides, its extra output rows are dropped
    (they start as NaN here and must not leak), and an existing gradient is accumulated into."""
    rng = np.random.default_rng(out_f)
    rows = linalg._PAD_MIN_ROWS + 3
    g, x = rand(rng, (rows, out_f), cg.bfloat16), rand(rng, (rows, 24), cg.bfloat16)
    into = rand(rng, (out_f, 24), cg.float32) if accumulate else None
    want = cpu_impl("linear_weight_grad")(g, x, cg.float32, into.clone() if accumulate else None)
    got = linalg.linear_weight_grad(g, x, cg.float32, into)
    (name, acc, _, _), = emulated.calls
    assert acc is accumulate and (got is into) == accumulate
    m_pad = -(-out_f // 8) * 8
    assert emulated.shapes[-1][0] == (1, m_pad, rows), emulated.shapes[-1]
    a_strides = emulated.shapes[-1][1]
    assert a_strides[1] == 1 and a_strides[2] % 8 == 0, a_strides  # M-major, 16-byte aligned K stride
    close(got, want, cg.float32)
    small = linalg.linear_weight_grad(g[:100], x[:100], cg.float32, None)  # few rows: no padding
    assert emulated.shapes[-1][0] == (1, out_f, 100)
    close(small, cpu_impl("linear_weight_grad")(g[:100], x[:100], cg.float32, None), cg.float32)


def test_k_major_copy_keeps_values_and_moves_k_innermost(emulated):
    rng = np.random.default_rng(7)
    t = rand(rng, (4, 5, 6), cg.float32)
    assert linalg._k_major(t, -1, 0) is t and linalg._k_major(t, 2, 0) is t  # already K-major: no copy
    view = rand(rng, (6, 5, 4), cg.float32).permute(2, 1, 0)
    for k_dim in (0, 1, 2):
        c = linalg._k_major(view, k_dim, 0)
        assert c._strides[k_dim] == 1 and c.shape == view.shape
        np.testing.assert_array_equal(c.numpy(), view.numpy())


def test_fused_ops_end_to_end_through_the_backend(emulated):
    """F.mlp_gelu forward + backward with the CUDA backend's kernels registered for the CPU:
    the same values and gradients as the CPU backend's."""
    rng = np.random.default_rng(5)
    args = [rand(rng, s, cg.float32).requires_grad_() for s in ((3, 4, 8), (16, 8), (16,), (8, 16), (8,), (3, 4, 8))]
    ref = [a.detach().clone().requires_grad_() for a in args]
    import cutegrad.nn.functional as F
    F.mlp_gelu(*ref[:5], residual=ref[5]).square().sum().backward()
    names = ("linear", "linear_input_grad", "linear_weight_grad")
    saved = [kernel(n).impl[CPU] for n in names]
    try:
        for n in names:
            kernel(n).impl[CPU] = getattr(linalg, n)
        y = F.mlp_gelu(*args[:5], residual=args[5])
        y.square().sum().backward()
    finally:
        for n, fn in zip(names, saved):
            kernel(n).impl[CPU] = fn
    assert [c[0] for c in emulated.calls] == ["bias_gelu_aux", "bias_residual", "gelu_bwd", "none", "none", "none"]
    for a, r in zip(args, ref):
        close(a.grad, r.grad, cg.float32)
