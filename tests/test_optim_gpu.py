"""The optimizers' fused CUDA path, clip_grad_norm_ on CUDA, and both captured in a CUDA graph.

Fused Adam/AdamW/SGD (fused=True: the multi-tensor kernels, device step
counters, a device lr when the group's lr is a tensor) against the composite
path (fused=False) on the same GPU and against torch.optim on the same GPU,
over several steps, in float32 and bfloat16. The parameter list has odd sizes,
tensors longer than one kernel chunk (8192 elements) and more tensors than one
launch takes (48), and one parameter skips a step (no gradient), so per-tensor
step counts, chunking and launch grouping are all exercised.

clip_grad_norm_ (fused: grad_norm_clip + multi_tensor_scale) against torch and
the composite path; then `clip + step` captured with cutegrad.graphs.graphed and
replayed with the lr changed by a schedule between replays, against the same
steps run eagerly.
"""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad import dtypes as dt
from test_cuda_ops import _SKIP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

SHAPES = [(1,), (7, 3), (8193,), (3, 5, 11), (20000,)] + [(i % 5 + 1, 3) for i in range(50)]
STEPS = 5
SKIPPER, SKIP_AT = 3, 2  # parameter 3 has no gradient at step 2


def _torch():
    torch = pytest.importorskip("torch", reason="PyTorch on the same GPU is the reference")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch was built without CUDA")
    return torch


def _data(seed):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = []
    for step in range(STEPS):
        gs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        if step == SKIP_AT:
            gs[SKIPPER] = None
        grads.append(gs)
    return init, grads


def _run_cutegrad(cls, kw, init, grads, dtype, fused, lr_tensor):
    params = [cg.tensor(w, dtype=dtype, device="cuda", requires_grad=True) for w in init]
    kw = dict(kw)
    if lr_tensor:
        kw["lr"] = cg.full((), kw["lr"], dtype=dt.float32, device="cuda")
    opt = getattr(cg.optim, cls)(params, fused=fused, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else cg.tensor(g, dtype=dtype, device="cuda")
        opt.step()
    return [p.detach().cpu().to(dt.float64).numpy() for p in params], opt, params


def _run_torch(cls, kw, init, grads, dtype):
    torch = _torch()
    tdt = {dt.float32: torch.float32, dt.bfloat16: torch.bfloat16}[dtype]
    params = [torch.tensor(w, device="cuda").to(tdt).requires_grad_() for w in init]
    # bfloat16: torch's fused kernels also compute in fp32 with states in bf16, as ours do
    extra = {"fused": True} if dtype is dt.bfloat16 else {"foreach": False}
    opt = getattr(torch.optim, cls)(params, **kw, **extra)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else torch.tensor(g, device="cuda").to(tdt)
        opt.step()
    return [p.detach().double().cpu().numpy() for p in params]


def _close(got, ref, rtol, atol, what):
    for i, (g, r) in enumerate(zip(got, ref)):
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=f"{what}: parameter {i} {SHAPES[i]}")


TOL = {dt.float32: (2e-5, 2e-5), dt.bfloat16: (1e-2, 1e-2)}
# the composite path rounds every intermediate tensor to bf16
COMPOSITE_TOL = {dt.float32: (2e-5, 2e-5), dt.bfloat16: (5e-2, 5e-2)}

ADAM_CASES = [
    ("AdamW", dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)),
    ("Adam", dict(lr=1e-2, weight_decay=0.05)),
    ("AdamW", dict(lr=3e-3, eps=1e-6, weight_decay=0.0, maximize=True)),
]
SGD_CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.8, dampening=0.3, maximize=True)),
]


@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16])
@pytest.mark.parametrize("cls,kw", ADAM_CASES + SGD_CASES)
def test_fused_step_matches_composite_and_torch(cls, kw, dtype, lr_tensor):
    init, grads = _data(0)
    fused, opt, params = _run_cutegrad(cls, kw, init, grads, dtype, True, lr_tensor)
    composite, copt, _ = _run_cutegrad(cls, kw, init, grads, dtype, False, lr_tensor)
    ref = _run_torch(cls, kw, init, grads, dtype)
    _close(fused, ref, *TOL[dtype], "fused vs torch")
    _close(fused, composite, *COMPOSITE_TOL[dtype], "fused vs composite")
    if cls.startswith("Adam"):
        for i, p in enumerate(params):
            step = opt.state[p]["step"]
            assert step.device.type == "cuda" and step.dtype is dt.float32 and step.numel() == 1
            assert float(step) == STEPS - (i == SKIPPER)
        assert all(isinstance(s["step"], int) for s in copt.state.values())  # composite: host counts
    if lr_tensor:
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(kw["lr"])


def test_fused_auto_takes_the_fused_path_and_falls_back():
    """fused=None: CUDA parameters go through the kernels (the device step counter shows it);
    a non-contiguous gradient sends that step to the composite path, which still matches."""
    init, grads = _data(1)
    _, opt, params = _run_cutegrad("AdamW", dict(lr=1e-2), init, grads, dt.float32, None, False)
    assert isinstance(opt.state[params[0]]["step"], cg.Tensor)
    p = cg.tensor(np.ones((4, 3), np.float32), device="cuda", requires_grad=True)
    q = cg.tensor(np.ones((4, 3), np.float32), device="cuda", requires_grad=True)
    g = cg.tensor(np.arange(12, dtype=np.float32).reshape(3, 4), device="cuda")
    auto, forced = cg.optim.SGD([p], lr=0.1), cg.optim.SGD([q], lr=0.1, fused=True)
    p.grad = g.t()
    auto.step()
    np.testing.assert_allclose(p.detach().cpu().numpy(), 1 - 0.1 * np.arange(12).reshape(3, 4).T, rtol=1e-6)
    q.grad = g.t()
    with pytest.raises(ValueError, match=r"SGD\(fused=True\): the gradient of parameter 0 is not contiguous"):
        forced.step()
    np.testing.assert_array_equal(q.detach().cpu().numpy(), np.ones((4, 3)))  # nothing launched


def test_fused_state_dict_round_trip():
    """A fused run's state (device step tensors, tensor lr) saved and loaded resumes identically."""
    init, grads = _data(2)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    _, opt, params = _run_cutegrad("AdamW", kw, init, grads, dt.float32, True, True)
    sd = opt.state_dict()
    assert isinstance(sd["state"][0]["step"], cg.Tensor) and float(sd["state"][0]["step"]) == STEPS
    twins = [cg.tensor(p.detach().cpu().numpy(), device="cuda", requires_grad=True) for p in params]
    lr2 = cg.full((), 0.5, dtype=dt.float32, device="cuda")
    opt2 = cg.optim.AdamW(twins, lr=lr2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] is lr2 and float(lr2) == pytest.approx(1e-2)
    rng = np.random.default_rng(3)
    for _ in range(2):
        gs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
        for o, ps in ((opt, params), (opt2, twins)):
            for p, g in zip(ps, gs):
                p.grad = cg.tensor(g, device="cuda")
            o.step()
    for a, b in zip(params, twins):
        np.testing.assert_array_equal(a.detach().cpu().numpy(), b.detach().cpu().numpy())


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16])
@pytest.mark.parametrize("max_norm", [1.0, 1e6])
def test_clip_grad_norm_matches_torch_and_composite(dtype, max_norm):
    torch = _torch()
    tdt = {dt.float32: torch.float32, dt.bfloat16: torch.bfloat16}[dtype]
    rng = np.random.default_rng(4)
    gs = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]

    def ours(error_if_nonfinite):
        ps = [cg.zeros(*s, dtype=dtype, device="cuda", requires_grad=True) for s in SHAPES]
        for p, g in zip(ps, gs):
            p.grad = cg.tensor(g, dtype=dtype, device="cuda")
        # error_if_nonfinite=True keeps the composite path (it must read the norm on the host)
        total = cg.nn.utils.clip_grad_norm_(ps, max_norm, error_if_nonfinite=error_if_nonfinite)
        return total, [p.grad.cpu().to(dt.float64).numpy() for p in ps]

    tps = [torch.zeros(s, device="cuda", dtype=tdt, requires_grad=True) for s in SHAPES]
    for p, g in zip(tps, gs):
        p.grad = torch.tensor(g, device="cuda").to(tdt)
    ttotal = torch.nn.utils.clip_grad_norm_(tps, max_norm)
    tgrads = [p.grad.double().cpu().numpy() for p in tps]
    total, fused = ours(False)
    ctotal, composite = ours(True)
    assert total.device.type == "cuda" and total.dtype is dtype and tuple(total.shape) == ()
    rtol = 1e-5 if dtype is dt.float32 else 1e-2
    assert float(total) == pytest.approx(float(ttotal), rel=rtol)
    assert float(total) == pytest.approx(float(ctotal), rel=rtol)
    atol = 1e-7 if dtype is dt.float32 else 1e-3
    for i, (a, b, c) in enumerate(zip(fused, tgrads, composite)):
        np.testing.assert_allclose(a, b, rtol=2 * rtol, atol=atol, err_msg=f"fused vs torch, grad {i}")
        np.testing.assert_allclose(a, c, rtol=2 * rtol, atol=atol, err_msg=f"fused vs composite, grad {i}")


def test_clip_grad_norm_nan_poisons_every_gradient_as_torch():
    ps = [cg.zeros(5, device="cuda", requires_grad=True), cg.zeros(3, device="cuda", requires_grad=True)]
    ps[0].grad = cg.tensor([1.0, float("nan"), 2.0, 3.0, 4.0], device="cuda")
    ps[1].grad = cg.ones(3, device="cuda")
    total = cg.nn.utils.clip_grad_norm_(ps, 1.0)
    assert np.isnan(float(total))
    assert np.isnan(ps[1].grad.cpu().numpy()).all()


def _graph_setup(cls, kw, seed):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    batches = [[rng.standard_normal(s).astype(np.float32) * 5 for s in SHAPES] for _ in range(6)]

    def make():
        ps = [cg.tensor(w, device="cuda", requires_grad=True) for w in init]
        for p in ps:
            p.grad = cg.zeros(*p.shape, device="cuda")
        lr = cg.full((), kw["lr"], dtype=dt.float32, device="cuda")
        opt = getattr(cg.optim, cls)(ps, **dict(kw, lr=lr), fused=True)
        sched = cg.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
        return ps, opt, sched

    return make, [[cg.tensor(g, device="cuda") for g in b] for b in batches]


@pytest.mark.parametrize("cls,kw", [("AdamW", dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)),
                                    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2))])
def test_graphed_clip_and_step_follow_the_schedule(cls, kw):
    import cutegrad.graphs as graphs
    make, batches = _graph_setup(cls, kw, 5)
    warmup = 2

    # graphed: the step copies the batch's gradients into .grad, clips, steps
    ps, opt, sched = make()

    def step(*grads):
        for p, g in zip(ps, grads):
            p.grad.copy_(g)
        total = cg.nn.utils.clip_grad_norm_(ps, 1.0)
        opt.step()
        return (total,)

    g = graphs.graphed(step, tuple(batches[0]), warmup=warmup)

    # eager: the same steps, the warm-up ones included
    eps, eopt, esched = make()

    def eager(grads):
        for p, gr in zip(eps, grads):
            p.grad.copy_(gr)
        total = cg.nn.utils.clip_grad_norm_(eps, 1.0)
        eopt.step()
        return total

    for _ in range(warmup):
        eager(batches[0])
    for a, b in zip(ps, eps):  # the warm-up ran the same steps
        np.testing.assert_allclose(a.detach().cpu().numpy(), b.detach().cpu().numpy(), rtol=1e-6, atol=1e-7)

    for i, batch in enumerate(batches[1:], 1):
        sched.step()
        esched.step()
        (total,) = g(*batch)
        etotal = eager(batch)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(kw["lr"] * 0.5 ** i)
        assert float(total) == pytest.approx(float(etotal), rel=1e-6)
        for j, (a, b) in enumerate(zip(ps, eps)):
            np.testing.assert_allclose(a.detach().cpu().numpy(), b.detach().cpu().numpy(), rtol=1e-6, atol=1e-7,
                                       err_msg=f"replay {i}, parameter {j}")
    if cls == "AdamW":
        assert float(opt.state[ps[0]]["step"]) == warmup + len(batches) - 1
    g.reset()
