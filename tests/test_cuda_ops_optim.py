"""Fused multi-tensor optimizer kernels and the device-side gradient norm.

The fused CUDA steps (cutegrad.backends.cuda.adamw_multi_tensor /
sgd_multi_tensor) must follow cutegrad.optim.AdamW / SGD run on CPU float64
tensors from the same weights and gradients, step after step. Shapes include
odd sizes, sizes above one kernel chunk, and more tensors than one launch
takes (48), so chunking and launch grouping are exercised.
"""
import numpy as np
import pytest

import cutegrad
from cutegrad import dtypes as dt
from test_cuda_ops import _SKIP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

SHAPES = [(1,), (7, 3), (8193,), (3, 5, 11), (20000,)] + [(i % 5 + 1, 3) for i in range(50)]


def make(rng, dtype):
    ws = [rng.standard_normal(s) for s in SHAPES]
    gs_per_step = [[rng.standard_normal(s) for s in SHAPES] for _ in range(3)]
    return ws, gs_per_step


LRS = [1e-2, 5e-3, 2e-2]  # one per step: a schedule the tensor-lr runs fill in between launches


def run_reference(opt_cls, ws, gs_per_step, lrs=None, **kw):
    params = [cutegrad.tensor(w, dtype=dt.float64, requires_grad=True) for w in ws]
    opt = opt_cls(params, **kw)
    for i, gs in enumerate(gs_per_step):
        if lrs is not None:
            opt.param_groups[0]["lr"] = lrs[i]
        for p, g in zip(params, gs):
            p.grad = cutegrad.tensor(g, dtype=dt.float64)
        opt.step()
    return [p.detach().numpy() for p in params]


def assert_params_close(got, ref, dtype):
    tol = 2e-5 if dtype is dt.float32 else 2e-2
    for g, r in zip(got, ref):
        gv = g.cpu().to(dt.float64).numpy()
        np.testing.assert_allclose(gv, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16])
@pytest.mark.parametrize("step_mode", ["host", "shared", "counters"])
@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("decoupled", [True, False])
def test_fused_adam_matches_optim_adam(dtype, step_mode, lr_tensor, decoupled):
    """step: a host int; one device tensor the caller advances; or a counter per tensor the launch
    advances (increment_step). decoupled: AdamW's decay, else Adam's weight decay in the gradient."""
    from cutegrad.backends.cuda import adamw_multi_tensor
    rng = np.random.default_rng(0)
    ws, gss = make(rng, dtype)
    ref = run_reference(cutegrad.optim.AdamW if decoupled else cutegrad.optim.Adam, ws, gss, lrs=LRS,
                        lr=LRS[0], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    params = [cutegrad.tensor(w, dtype=dtype, device="cuda") for w in ws]
    ms = [cutegrad.zeros(*p.shape, dtype=dtype, device="cuda") for p in params]
    vs = [cutegrad.zeros(*p.shape, dtype=dtype, device="cuda") for p in params]
    shared = cutegrad.zeros((), dtype=dt.float32, device="cuda")
    counters = [cutegrad.zeros((), dtype=dt.float32, device="cuda") for _ in params]
    lr_t = cutegrad.full((), float("nan"), dtype=dt.float32, device="cuda")
    for step, gs in enumerate(gss, 1):
        grads = [cutegrad.tensor(g, dtype=dtype, device="cuda") for g in gs]
        lr_t.fill_(LRS[step - 1])
        lr = lr_t if lr_tensor else LRS[step - 1]
        if step_mode == "shared":
            shared.add_(1.0)
        st = {"host": step, "shared": shared, "counters": counters}[step_mode]
        adamw_multi_tensor(params, grads, ms, vs, lr, 0.9, 0.95, 1e-8, 0.1, st, decoupled=decoupled,
                           increment_step=step_mode == "counters")
    assert_params_close(params, ref, dtype)
    if step_mode == "counters":
        assert [float(c) for c in counters] == [float(len(gss))] * len(params)


@pytest.mark.parametrize("momentum,dampening,nesterov,wd", [(0.0, 0.0, False, 0.0), (0.9, 0.0, False, 1e-2),
                                                            (0.9, 0.0, True, 0.0), (0.8, 0.3, False, 0.0)])
@pytest.mark.parametrize("lr_tensor", [False, True])
def test_fused_sgd_matches_optim_sgd(momentum, dampening, nesterov, wd, lr_tensor):
    from cutegrad.backends.cuda import sgd_multi_tensor
    rng = np.random.default_rng(1)
    ws, gss = make(rng, dt.float32)
    lrs = [10 * x for x in LRS]
    ref = run_reference(cutegrad.optim.SGD, ws, gss, lrs=lrs, lr=lrs[0], momentum=momentum, dampening=dampening,
                        weight_decay=wd, nesterov=nesterov)
    params = [cutegrad.tensor(w, dtype=dt.float32, device="cuda") for w in ws]
    bufs = [cutegrad.zeros(*p.shape, device="cuda") for p in params] if momentum else None
    lr_t = cutegrad.zeros((), dtype=dt.float32, device="cuda")
    for step, gs in enumerate(gss):
        grads = [cutegrad.tensor(g, dtype=dt.float32, device="cuda") for g in gs]
        lr_t.fill_(lrs[step])
        sgd_multi_tensor(params, grads, bufs, lr_t if lr_tensor else lrs[step], momentum, dampening, wd, nesterov,
                         first_step=step == 0)
    assert_params_close(params, ref, dt.float32)


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16])
def test_grad_norm_clip_and_scaled_step(dtype):
    from cutegrad.backends.cuda import grad_norm_clip, sgd_multi_tensor
    rng = np.random.default_rng(2)
    gs = [rng.standard_normal(s) for s in SHAPES]
    grads = [cutegrad.tensor(g, dtype=dtype, device="cuda") for g in gs]
    host = [g.cpu().to(dt.float64).numpy() for g in grads]
    norm = np.sqrt(sum(float((h * h).sum()) for h in host))
    for max_norm in (1.0, 1e6):
        out = grad_norm_clip(grads, max_norm).cpu().numpy()
        np.testing.assert_allclose(out[0], norm, rtol=1e-5)
        np.testing.assert_allclose(out[1], min(1.0, max_norm / (norm + 1e-6)), rtol=1e-5)
    # the same bits on every run: a fixed summation order
    a = grad_norm_clip(grads, 1.0).cpu().numpy()
    b = grad_norm_clip(grads, 1.0).cpu().numpy()
    np.testing.assert_array_equal(a, b)
    # clipping without a host sync: the step reads the coefficient on the device
    params = [cutegrad.zeros(*g.shape, device="cuda") for g in grads]
    coef = grad_norm_clip(grads, 1.0)[1:]
    sgd_multi_tensor(params, grads, None, 1.0, grad_scale=coef.contiguous())
    for p, h in zip(params, host):
        np.testing.assert_allclose(p.cpu().numpy(), -h / (norm + 1e-6), rtol=2e-5 if dtype is dt.float32 else 1e-2,
                                   atol=1e-6)


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.float16])
def test_multi_tensor_scale(dtype):
    from cutegrad.backends.cuda import multi_tensor_scale
    rng = np.random.default_rng(3)
    xs = [cutegrad.tensor(rng.standard_normal(s), dtype=dtype, device="cuda") for s in SHAPES]
    before = [x.cpu().to(dt.float64).numpy() for x in xs]
    scale = cutegrad.full((), 0.37, dtype=dt.float32, device="cuda")
    multi_tensor_scale(xs, scale)
    tol = 1e-6 if dtype is dt.float32 else 1e-2
    for x, b in zip(xs, before):
        np.testing.assert_allclose(x.cpu().to(dt.float64).numpy(), b * np.float32(0.37), rtol=tol, atol=0)


def test_grad_norm_clip_propagates_nan():
    from cutegrad.backends.cuda import grad_norm_clip
    g = cutegrad.tensor([1.0, float("nan"), 3.0], device="cuda")
    norm, coef = grad_norm_clip([g], 1.0).cpu().numpy()
    assert np.isnan(norm) and np.isnan(coef)  # as torch's clamp(max=1) keeps NaN


def test_fused_optimizer_argument_errors():
    from cutegrad.backends.cuda import adamw_multi_tensor, multi_tensor_scale, sgd_multi_tensor
    p = [cutegrad.zeros(3, device="cuda")]
    with pytest.raises(ValueError, match="differ in length"):
        adamw_multi_tensor(p, [], p, p, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="contiguous CUDA tensor"):
        adamw_multi_tensor(p, [cutegrad.zeros(3)], p, p, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        adamw_multi_tensor(p, p, [cutegrad.zeros(3, device="cuda")], [cutegrad.zeros(3, device="cuda")], 1e-3, 0.9,
                           0.999, 1e-8, 0.0, 0)
    one = cutegrad.zeros((), dtype=dt.float32, device="cuda")
    with pytest.raises(ValueError, match="increment_step needs a list of step counters"):
        adamw_multi_tensor(p, p, [cutegrad.zeros(3, device="cuda")], [cutegrad.zeros(3, device="cuda")], 1e-3, 0.9,
                           0.999, 1e-8, 0.0, one, increment_step=True)
    two = [cutegrad.zeros(3, device="cuda") for _ in range(2)]
    with pytest.raises(ValueError, match="distinct step counter per parameter"):
        adamw_multi_tensor(two, two, [cutegrad.zeros(3, device="cuda") for _ in range(2)],
                           [cutegrad.zeros(3, device="cuda") for _ in range(2)], 1e-3, 0.9, 0.999, 1e-8, 0.0,
                           [one, one], increment_step=True)
    with pytest.raises(ValueError, match="lr must be a one-element float32 CUDA tensor"):
        sgd_multi_tensor(p, p, None, cutegrad.zeros((), dtype=dt.float64, device="cuda"))
    with pytest.raises(ValueError, match="scale must be a one-element float32 CUDA tensor"):
        multi_tensor_scale(p, cutegrad.ones(1))
