"""The fused linear family (linear, linear_gelu, linear_residual, mlp_gelu) on the CPU backend:
values against float64 NumPy, gradients against finite differences (first and second order)
and against torch, one autograd node per call, autocast dtypes, bad input."""
import math

import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from cutegrad import dtypes as dt
from cutegrad.autograd import gradcheck, gradgradcheck
from cutegrad.dispatch import kernel
from cutegrad.device import CPU

K0, K1 = math.sqrt(2.0 / math.pi), 0.044715


def gelu_tanh(v):
    return 0.5 * v * (1.0 + np.tanh(K0 * (v + K1 * v ** 3)))


def gelu_tanh_grad(v):
    t = np.tanh(K0 * (v + K1 * v ** 3))
    return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * K0 * (1.0 + 3 * K1 * v * v)


def leaf(rng, shape, dtype=cg.float64, scale=1.0):
    return cg.tensor(rng.standard_normal(shape) * scale, dtype=dtype, requires_grad=True)


def f64(t):
    return t.detach().to(cg.float64).numpy()


# (input shape, in_features, out_features): 1-D, 2-D, 3-D inputs, odd extents, N = 10 / 36 heads
SHAPES = [((7,), 7, 5), ((3, 13), 13, 10), ((2, 5, 9), 9, 36), ((4, 1, 3), 3, 1), ((1, 1), 1, 6)]


@pytest.mark.parametrize("shape,fin,fout", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_values_match_float64_numpy(shape, fin, fout, with_bias):
    rng = np.random.default_rng(sum(shape) * 31 + fout)
    x, w = leaf(rng, shape), leaf(rng, (fout, fin))
    b = leaf(rng, (fout,)) if with_bias else None
    r = leaf(rng, shape[:-1] + (fout,))
    z = f64(x) @ f64(w).T + (f64(b) if with_bias else 0.0)
    np.testing.assert_allclose(f64(F.linear(x, w, b)), z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f64(F.linear_gelu(x, w, b)), gelu_tanh(z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f64(F.linear_residual(x, w, b, r)), z + f64(r), rtol=1e-12, atol=1e-12)
    w2, b2 = leaf(rng, (4, fout)), (leaf(rng, (4,)) if with_bias else None)
    mlp = gelu_tanh(z) @ f64(w2).T + (f64(b2) if with_bias else 0.0)
    np.testing.assert_allclose(f64(F.mlp_gelu(x, w, b, w2, b2)), mlp, rtol=1e-12, atol=1e-12)
    r2 = leaf(rng, shape[:-1] + (4,))
    np.testing.assert_allclose(f64(F.mlp_gelu(x, w, b, w2, b2, residual=r2)), mlp + f64(r2), rtol=1e-12,
                               atol=1e-12)


def test_one_node_per_call_with_edges_to_every_input():
    rng = np.random.default_rng(1)
    x, w, b, r = leaf(rng, (3, 4)), leaf(rng, (5, 4)), leaf(rng, (5,)), leaf(rng, (3, 5))
    for y, n_inputs in ((F.linear(x, w, b), 4), (F.linear_gelu(x, w, b), 4), (F.linear_residual(x, w, b, r), 4)):
        assert type(y.grad_fn).__name__ == "LinearBackward"
        edges = y.grad_fn.next_functions
        assert len(edges) == n_inputs
        assert [e.variable if e is not None else None for e in edges[:3]] == [x, w, b]
    y = F.mlp_gelu(x, w, b, leaf(rng, (2, 5)), leaf(rng, (2,)), residual=leaf(rng, (3, 2)))
    assert type(y.grad_fn).__name__ == "MlpGeluBackward"
    assert all(e is not None and type(e).__name__ == "AccumulateGrad" for e in y.grad_fn.next_functions)
    lin = cg.nn.Linear(4, 5, dtype=cg.float64)
    assert type(lin(x).grad_fn).__name__ == "LinearBackward"


CASES = {
    "linear": (lambda x, w, b: F.linear(x, w, b), lambda r: (leaf(r, (2, 3, 4)), leaf(r, (5, 4)), leaf(r, (5,)))),
    "linear_nobias": (lambda x, w: F.linear(x, w), lambda r: (leaf(r, (3, 4)), leaf(r, (5, 4)))),
    "linear_gelu": (lambda x, w, b: F.linear_gelu(x, w, b), lambda r: (leaf(r, (3, 4)), leaf(r, (5, 4)),
                                                                     leaf(r, (5,)))),
    "linear_gelu_nobias": (lambda x, w: F.linear_gelu(x, w), lambda r: (leaf(r, (2, 2, 3)), leaf(r, (4, 3)))),
    "linear_residual": (lambda x, w, b, res: F.linear_residual(x, w, b, res),
                        lambda r: (leaf(r, (3, 4)), leaf(r, (5, 4)), leaf(r, (5,)), leaf(r, (3, 5)))),
    "mlp_gelu": (lambda x, w1, b1, w2, b2: F.mlp_gelu(x, w1, b1, w2, b2),
                 lambda r: (leaf(r, (2, 3, 4)), leaf(r, (6, 4)), leaf(r, (6,)), leaf(r, (3, 6)), leaf(r, (3,)))),
    "mlp_gelu_residual": (lambda x, w1, b1, w2, b2, res: F.mlp_gelu(x, w1, b1, w2, b2, residual=res),
                          lambda r: (leaf(r, (3, 4)), leaf(r, (6, 4)), leaf(r, (6,)), leaf(r, (2, 6)),
                                     leaf(r, (2,)), leaf(r, (3, 2)))),
}


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name):
    fn, make = CASES[name]
    inputs = make(np.random.default_rng(len(name)))
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("name", ["linear", "linear_gelu", "linear_residual", "mlp_gelu_residual"])
def test_gradgradcheck(name):
    """create_graph: the backward is built from differentiable ops, so it differentiates again."""
    fn, make = CASES[name]
    inputs = make(np.random.default_rng(len(name) + 100))
    assert gradgradcheck(fn, inputs)


def test_only_needed_gradients_are_computed():
    rng = np.random.default_rng(2)
    x = cg.tensor(rng.standard_normal((3, 4)))  # no grad
    w, b = leaf(rng, (5, 4)), leaf(rng, (5,))
    F.linear_gelu(x, w, b).sum().backward()
    assert x.grad is None and w.grad is not None and b.grad is not None
    w1 = cg.tensor(rng.standard_normal((6, 4)))
    w2 = leaf(rng, (2, 6))
    F.mlp_gelu(x, w1, None, w2, None).sum().backward()
    assert w2.grad is not None and w1.grad is None


def test_gradients_accumulate_over_two_backwards():
    rng = np.random.default_rng(3)
    x, w, b = leaf(rng, (3, 4)), leaf(rng, (5, 4)), leaf(rng, (5,))
    F.linear(x, w, b).sum().backward()
    first = f64(w.grad).copy()
    F.linear(x, w, b).sum().backward()
    np.testing.assert_allclose(f64(w.grad), 2 * first, rtol=1e-12)


def test_weight_gradient_accumulates_into_grad_when_the_engine_allows():
    """With grad_mode.state.accumulate_into_leaves set (the engine's signal that leaf gradients
    are being summed into .grad), the weight-gradient GEMM adds into the existing .grad in place;
    a hook on the leaf, or no flag, keeps the ordinary out-of-place path."""
    from cutegrad.autograd import grad_mode
    rng = np.random.default_rng(10)
    x, w, b = leaf(rng, (3, 4)), leaf(rng, (5, 4)), leaf(rng, (5,))
    F.linear(x, w, b).sum().backward()
    first, grad_obj = f64(w.grad).copy(), w.grad
    grad_mode.state.accumulate_into_leaves = True
    try:
        F.linear_gelu(x, w, b).sum().backward()
        z = f64(x) @ f64(w).T + f64(b)
        expect = first + (gelu_tanh_grad(z)).T @ f64(x)
        assert w.grad is grad_obj, "the GEMM should have added into the existing .grad"
        np.testing.assert_allclose(f64(w.grad), expect, rtol=1e-12)
        w.register_hook(lambda g: g)
        F.linear(x, w, b).sum().backward()
        assert w.grad is not grad_obj, "a hooked leaf must see its gradient: no in-place accumulation"
        np.testing.assert_allclose(f64(w.grad), expect + np.ones((3, 5)).T @ f64(x), rtol=1e-12)
    finally:
        grad_mode.state.accumulate_into_leaves = False


torch = pytest.importorskip("torch")
TF = torch.nn.functional


def _torch_leaf(t):
    return torch.tensor(f64(t), dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("name", ["linear", "linear_gelu", "linear_residual", "mlp_gelu_residual"])
def test_values_and_gradients_match_torch(name):
    fn, make = CASES[name]
    inputs = make(np.random.default_rng(len(name) + 7))
    tins = [_torch_leaf(t) for t in inputs]
    ref = {
        "linear": lambda x, w, b: TF.linear(x, w, b),
        "linear_gelu": lambda x, w, b: TF.gelu(TF.linear(x, w, b), approximate="tanh"),
        "linear_residual": lambda x, w, b, r: r + TF.linear(x, w, b),
        "mlp_gelu_residual": lambda x, w1, b1, w2, b2, r: r + TF.linear(TF.gelu(TF.linear(x, w1, b1),
                                                                                approximate="tanh"), w2, b2),
    }[name]
    out, tout = fn(*inputs), ref(*tins)
    np.testing.assert_allclose(f64(out), tout.detach().numpy(), rtol=1e-12, atol=1e-12)
    seed = np.random.default_rng(5).standard_normal(tuple(tout.shape))
    out.backward(cg.tensor(seed, dtype=cg.float64))
    tout.backward(torch.tensor(seed))
    for t, tt in zip(inputs, tins):
        np.testing.assert_allclose(f64(t.grad), tt.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [cg.float32, cg.bfloat16], ids=str)
def test_low_precision_rounds_once_like_the_gpu(dtype):
    """float32 / bfloat16: computed in float32, the pre-activation rounded to the dtype and GELU
    applied to the rounded value (the GEMM epilogue's order)."""
    rng = np.random.default_rng(4)
    x = cg.tensor(rng.standard_normal((6, 8)), dtype=dtype)
    w = cg.tensor(rng.standard_normal((10, 8)), dtype=dtype)
    b = cg.tensor(rng.standard_normal(10), dtype=dtype)
    y = F.linear_gelu(x, w, b)
    assert y.dtype is dtype
    z = f64(x) @ f64(w).T + f64(b)
    z_rounded = f64(cg.tensor(z, dtype=cg.float32).to(dtype))
    tol = 1e-5 if dtype is cg.float32 else 1e-2
    np.testing.assert_allclose(f64(y), gelu_tanh(z_rounded), rtol=tol, atol=tol)


def test_autocast_residual_keeps_its_dtype_and_weight_grads_are_fp32():
    """Under autocast the GEMM runs in bfloat16; an fp32 residual stream stays fp32, and the
    gradients of fp32 parameters arrive in fp32."""
    rng = np.random.default_rng(6)
    x = cg.tensor(rng.standard_normal((4, 8)), dtype=cg.float32)
    w, b = leaf(rng, (8, 8), cg.float32), leaf(rng, (8,), cg.float32)
    res = leaf(rng, (4, 8), cg.float32)
    with cg.autocast("cpu", dtype=cg.bfloat16):
        y = F.linear_residual(x, w, b, res)
        h = F.linear_gelu(x, w, b)
    assert y.dtype is cg.float32 and h.dtype is cg.bfloat16
    z = f64(x.to(cg.bfloat16)) @ f64(w.to(cg.bfloat16)).T + f64(b)
    np.testing.assert_allclose(f64(y), z + f64(res), rtol=2e-3, atol=2e-3)
    y.sum().backward()  # alone: the fp32 bias (not lowered next to an fp32 residual) gets an fp32 gradient
    assert w.grad.dtype is cg.float32 and b.grad.dtype is cg.float32 and res.grad.dtype is cg.float32
    np.testing.assert_allclose(f64(res.grad), np.ones((4, 8)))
    np.testing.assert_allclose(f64(b.grad), np.full(8, 4.0))
    w.grad = b.grad = None
    h.float().sum().backward()  # bfloat16 autocast copies of fp32 parameters: gradients in fp32
    assert w.grad.dtype is cg.float32 and b.grad.dtype is cg.float32


def test_weight_grad_kernel_accumulates_in_place():
    """linear_weight_grad with `into`: beta = 1 into an existing gradient, no separate add."""
    rng = np.random.default_rng(8)
    g = cg.tensor(rng.standard_normal((2, 3, 5)), dtype=cg.float32)
    x = cg.tensor(rng.standard_normal((2, 3, 4)), dtype=cg.float32)
    into = cg.tensor(rng.standard_normal((5, 4)), dtype=cg.float32)
    before, version = f64(into).copy(), into._storage.version
    fn = kernel("linear_weight_grad").impl[CPU]
    out = fn(g, x, cg.float32, into)
    assert out is into and into._storage.version == version + 1
    expect = before + f64(g).reshape(6, 5).T @ f64(x).reshape(6, 4)
    np.testing.assert_allclose(f64(into), expect, rtol=1e-5, atol=1e-5)
    fresh = fn(g, x, cg.float32, None)
    np.testing.assert_allclose(f64(fresh), expect - before, rtol=1e-5, atol=1e-5)


def test_input_grad_kernel_applies_gelu_backward():
    rng = np.random.default_rng(9)
    g = cg.tensor(rng.standard_normal((3, 5)))
    w = cg.tensor(rng.standard_normal((5, 4)))
    z = cg.tensor(rng.standard_normal((3, 4)))
    out = kernel("linear_input_grad").impl[CPU](g, w, z)
    np.testing.assert_allclose(f64(out), (f64(g) @ f64(w)) * gelu_tanh_grad(f64(z)), rtol=1e-12)


BAD = [
    ("in_features", lambda: F.linear(cg.zeros(2, 3), cg.zeros(4, 5)), RuntimeError, "does not match"),
    ("weight_1d", lambda: F.linear_gelu(cg.zeros(2, 3), cg.zeros(3)), RuntimeError, "weight must be 2-D"),
    ("bias_shape", lambda: F.linear(cg.zeros(2, 3), cg.zeros(4, 3), cg.zeros(3)), RuntimeError,
     r"bias must have shape \[4\]"),
    ("residual_shape", lambda: F.linear_residual(cg.zeros(2, 3), cg.zeros(4, 3), None, cg.zeros(2, 5)),
     RuntimeError, r"residual must have the output's shape \[2, 4\]"),
    ("dtype_mix", lambda: F.linear(cg.zeros(2, 3), cg.zeros(4, 3, dtype=cg.float64)), RuntimeError,
     "same dtype"),
    ("int_input", lambda: F.linear(cg.zeros(2, 3, dtype=cg.int64), cg.zeros(4, 3, dtype=cg.int64)), RuntimeError,
     "floating point"),
    ("mlp_fc2", lambda: F.mlp_gelu(cg.zeros(2, 3), cg.zeros(4, 3), None, cg.zeros(5, 6), None), RuntimeError,
     "does not match weight's in_features 6"),
    ("not_tensor", lambda: F.linear([1.0], cg.zeros(4, 3)), TypeError, "expected Tensor"),
    ("bias_not_tensor", lambda: F.linear(cg.zeros(2, 3), cg.zeros(4, 3), 1.0), TypeError, "bias must be a Tensor"),
]


@pytest.mark.parametrize("name,fn,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_clearly(name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_float32_matmul_precision_switches():
    assert cg.get_float32_matmul_precision() == "highest"
    assert cg.backends.cuda.matmul.allow_tf32 is False
    try:
        cg.backends.cuda.matmul.allow_tf32 = True
        assert cg.get_float32_matmul_precision() == "high"
        cg.set_float32_matmul_precision("medium")
        assert cg.backends.cuda.matmul.allow_tf32 is True
        cg.backends.cuda.matmul.allow_tf32 = False
        assert cg.get_float32_matmul_precision() == "highest"
        with pytest.raises(ValueError, match="precision must be one of"):
            cg.set_float32_matmul_precision("low")
    finally:
        cg.set_float32_matmul_precision("highest")
    # CPU results do not depend on it (the CPU backend computes exactly)
    a = cg.tensor(np.random.default_rng(0).standard_normal((5, 7)), dtype=cg.float32)
    exact = (a @ a.t()).numpy()
    cg.set_float32_matmul_precision("medium")
    try:
        np.testing.assert_array_equal((a @ a.t()).numpy(), exact)
    finally:
        cg.set_float32_matmul_precision("highest")


def test_cudnn_flags_are_accepted():
    flags = cg.backends.cudnn
    assert flags.is_available() is False and flags.allow_tf32 is True
    old = flags.benchmark
    flags.benchmark = True
    flags.benchmark = old
