"""The residual dropout fused into the CuTeDSL add+norm on a GPU (`-m gpu`): the fused forward
equals the standalone dropout kernel (kernels/cuda/dropout.cu) followed by the plain add+norm,
bit for bit, for the same Philox state, and its mask is the NumPy model's; the fused backward's
x gradient equals the plain backward's followed by the dropout kernel's backward, with its column
sum; outputs poisoned with NaN, row counts not a multiple of a CTA's slots; the CuTeDSL kernel
is the one that ran; a captured graph draws a fresh mask on each replay (the eager sequence) and
its backward regenerates that replay's mask."""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad import dtypes as dt
from cutegrad.device import CUDA
from cutegrad.dispatch import kernel

from norms_loading import load_norms_module
# The same GPU checks, and NaN-poisoned outputs in every test here (an autouse fixture).
from test_fused_norms_gpu import _SKIP, _host, poisoned_outputs  # noqa: F401

model = load_norms_module("reference")
family = load_norms_module("cute")
_DT = {"bf16": dt.bfloat16, "fp32": dt.float32}


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


def _k(name):
    return kernel(name).impl[CUDA]


FWD = [c for c in family.FWD_COMBOS if c[1]]  # the forwards with a residual take the dropout


def _fwd_inputs(rng, n, rows, combo):
    x_dt, r_dt, _ = combo
    x = cg.tensor(rng.standard_normal((rows, n)), dtype=_DT[x_dt]).cuda()
    res = cg.tensor(rng.standard_normal((rows, n)) * 2 + 0.5, dtype=_DT[r_dt]).cuda()
    w = cg.tensor(rng.standard_normal(n) * 0.5 + 1, dtype=dt.float32).cuda()
    b = cg.tensor(rng.standard_normal(n) * 0.1, dtype=dt.float32).cuda()
    return x, res, w, b


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", [128, 768, 2048])
@pytest.mark.parametrize("rows", [1, 37, 1001])
@pytest.mark.parametrize("combo", FWD)
@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_forward_equals_the_dropout_kernel_then_add_norm(kind, n, rows, combo, keep):
    rng = np.random.default_rng(n + rows)
    x, res, w, b = _fwd_inputs(rng, n, rows, combo)
    rms, out_dt = kind == "rms", _DT[combo[2]]
    bias = None if rms else b
    y, s, mean, rstd, state = _k("add_dropout_norm")(x, res, w, bias, 1e-5, rms, out_dt, keep, None)
    seed, seed_ptr, offset, offset_ptr = state
    assert seed_ptr == offset_ptr == 0
    dropped = _k("dropout_fused_backward")(x, keep, state)  # the standalone kernel, same Philox state
    y2, s2, mean2, rstd2 = _k("add_norm")(dropped, res, w, bias, 1e-5, rms, out_dt)
    for got, want in ((y, y2), (s, s2), (rstd, rstd2)) + (() if rms else ((mean, mean2),)):
        np.testing.assert_array_equal(_host(got), _host(want))
    # the mask is the model's walk of the kernel, and a real one
    scales = model.residual_dropout_scales(seed, offset, rows, n, keep, combo)
    np.testing.assert_array_equal(_host(dropped) != 0, (scales != 0) & (_host(x) != 0))
    assert rows * n < 8 or 0 < (scales != 0).sum() < rows * n
    # y against the model of the kernels' arithmetic on the dropped x
    xd = model._round(_host(x).astype(np.float32) * scales, combo[0])
    y_m, s_m, _, _ = model.forward(xd, _host(res), _host(w), _host(b), 1e-5, kind, combo)
    np.testing.assert_array_equal(_host(s), s_m.astype(np.float64))
    np.testing.assert_allclose(_host(y), y_m, rtol=2e-2 if combo[2] == "bf16" else 1e-5, atol=1e-5)


def test_the_cute_kernel_takes_the_dropout():
    from cutegrad.backends.cuda import norms as N
    x = cg.randn(63, 768, dtype=dt.bfloat16, device="cuda")
    res = cg.randn(63, 768, device="cuda")
    w, b = cg.ones(768, device="cuda"), cg.zeros(768, device="cuda")
    assert N._cute_forward(x, res, w, b, 1e-5, False, dt.bfloat16, (0.9, 1234, 0, 4096, 0)) is not None


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", [256, 768, 2048])
@pytest.mark.parametrize("rows", [3, 515])
@pytest.mark.parametrize("with_dres", [False, True])
def test_backward_equals_the_plain_backward_then_the_dropout_kernel(kind, n, rows, with_dres):
    rng = np.random.default_rng(7 * n + rows)
    x, res, w, b = _fwd_inputs(rng, n, rows, ("bf16", "fp32", "bf16"))
    rms = kind == "rms"
    bias = None if rms else b
    _, s, mean, rstd, state = _k("add_dropout_norm")(x, res, w, bias, 1e-5, rms, dt.bfloat16, 0.8, None)
    dy = cg.tensor(rng.standard_normal((rows, n)), dtype=dt.bfloat16).cuda()
    dres = cg.tensor(rng.standard_normal((rows, n)), dtype=dt.float32).cuda() if with_dres else None
    args = (dy, dres, s, w, mean, rstd, rms, dt.bfloat16, dt.float32, True, not rms)
    dx, dr, dw, db, dx_sum = _k("add_dropout_norm_backward")(*args, 0.8, state)
    assert dx_sum is not None, "the CuTeDSL backward ran"
    px, pr, pw, pb, _ = _k("add_norm_backward")(*args)
    want = _k("dropout_fused_backward")(px, 0.8, state)
    np.testing.assert_array_equal(_host(dx), _host(want))
    np.testing.assert_array_equal(_host(dr), _host(pr))
    np.testing.assert_array_equal(_host(dw), _host(pw))
    if not rms:
        np.testing.assert_array_equal(_host(db), _host(pb))
    host_dx = _host(dx)
    assert 0 < (host_dx == 0).sum() < host_dx.size
    np.testing.assert_allclose(_host(dx_sum), host_dx.sum(0), rtol=1e-5,
                               atol=1e-5 * np.sqrt(rows) * np.abs(host_dx).max())


def test_linear_bias_gradient_through_the_fused_dropout():
    """proj -> (dropout in the add+norm): the bias gradient is the column sum of x's gradient."""
    rng = np.random.default_rng(5)
    lin = cg.nn.Linear(384, 768).cuda()
    h = cg.tensor(rng.standard_normal((3, 41, 384)), dtype=dt.float32).cuda().requires_grad_()
    res = cg.tensor(rng.standard_normal((3, 41, 768)), dtype=dt.float32).cuda().requires_grad_()
    norm = cg.nn.AddLayerNorm(768, dropout=0.2).cuda()
    with cg.autocast("cuda", dtype=cg.bfloat16):
        x = lin(h)
        x.retain_grad()
        y, s = norm(x, res)
    cg.autograd.backward([y, s], [cg.ones_like(y), cg.ones_like(s)])
    gx = _host(x.grad)
    assert 0 < (gx == 0).sum() < gx.size
    np.testing.assert_allclose(_host(lin.bias.grad), gx.reshape(-1, 768).sum(0), rtol=1e-4,
                               atol=1e-4 * np.abs(gx).max() * np.sqrt(123))


def test_capture_replays_draw_fresh_masks_and_the_backward_follows():
    from cutegrad import _C
    from cutegrad.graphs import CUDAGraph, graph
    _C.load_kernels()
    rng = np.random.default_rng(2)
    x, res, w, b = _fwd_inputs(rng, 768, 129, ("bf16", "fp32", "bf16"))
    x.requires_grad_()
    fwd, bwd = _k("add_dropout_norm"), _k("add_dropout_norm_backward")
    dy = cg.tensor(rng.standard_normal((129, 768)), dtype=dt.bfloat16).cuda()

    def step():
        _, s, mean, rstd, state = fwd(x.detach(), res, w, b, 1e-5, False, dt.bfloat16, 0.7, None)
        dx = bwd(dy, None, s, w, mean, rstd, False, dt.bfloat16, dt.float32, True, True, 0.7, state)[0]
        return s, dx, state

    cg.manual_seed(21)
    eager = [tuple(_host(t) for t in step()[:2]) for _ in range(3)]
    assert not np.array_equal(eager[0][0], eager[1][0])
    step()  # warm up outside the capture
    cg.manual_seed(21)
    g = CUDAGraph()
    with graph(g):
        s, dx, state = step()
    assert state[1] and state[3] == state[1] + 8, "a captured launch reads seed and offset from device memory"
    cg.manual_seed(21)
    for i, (want_s, want_dx) in enumerate(eager):
        g.replay()
        cg.cuda.synchronize()
        np.testing.assert_array_equal(_host(s), want_s, err_msg=f"replay {i}")
        np.testing.assert_array_equal(_host(dx), want_dx, err_msg=f"replay {i}")
