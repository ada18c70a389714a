"""Optimizers and LR schedules step-for-step against torch.optim."""
import contextlib

import numpy as np
import pytest

import cutegrad as cg
from cutegrad.device import CPU, CUDA
from cutegrad.dispatch import kernel

torch = pytest.importorskip("torch", reason="PyTorch CPU is the differential reference")


def _run(make_ours, make_ref, steps=12, shapes=((5, 3), (7,)), skip_at=3):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ps = [cg.tensor(a, requires_grad=True) for a in init]
    tps = [torch.tensor(a, requires_grad=True) for a in init]
    opt, topt = make_ours(ps), make_ref(tps)
    for step in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if step == skip_at:
            grads[1] = None  # a parameter without a gradient is skipped
        for p, tp, g in zip(ps, tps, grads):
            p.grad = None if g is None else cg.tensor(g)
            tp.grad = None if g is None else torch.from_numpy(g)
        opt.step()
        topt.step()
        for p, tp in zip(ps, tps):
            np.testing.assert_allclose(p.detach().numpy(), tp.detach().numpy(), rtol=2e-6, atol=2e-6,
                                       err_msg=f"step {step}")
    return opt, ps


@pytest.mark.parametrize("kw", [
    dict(lr=0.1), dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=0.01), dict(lr=0.1, maximize=True),
])
def test_sgd_matches_torch(kw):
    _run(lambda p: cg.optim.SGD(p, **kw), lambda p: torch.optim.SGD(p, **kw))


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2), dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1), dict(lr=1e-2, amsgrad=True),
    dict(lr=1e-2, eps=1e-6, weight_decay=0.0, maximize=True),
])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_family_matches_torch(name, kw):
    _run(lambda p: getattr(cg.optim, name)(p, **kw), lambda p: getattr(torch.optim, name)(p, **kw))


def test_param_groups_and_state_dict_resume():
    rng = np.random.default_rng(1)
    a = cg.tensor(rng.standard_normal(4).astype(np.float32), requires_grad=True)
    b = cg.tensor(rng.standard_normal(3).astype(np.float32), requires_grad=True)
    opt = cg.optim.AdamW([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5]
    for _ in range(3):
        a.grad, b.grad = cg.ones(4), cg.ones(3)
        opt.step()
    sd = opt.state_dict()
    assert set(sd["state"]) == {0, 1} and sd["state"][0]["step"] == 3
    a2 = cg.tensor(a.detach().numpy().copy(), requires_grad=True)
    b2 = cg.tensor(b.detach().numpy().copy(), requires_grad=True)
    opt2 = cg.optim.AdamW([{"params": [a2]}, {"params": [b2], "lr": 0.5}], lr=0.01)
    opt2.load_state_dict(sd)
    for o, (x, y) in ((opt, (a, b)), (opt2, (a2, b2))):
        x.grad, y.grad = cg.full((4,), 0.3), cg.full((3,), -0.2)
        o.step()
    np.testing.assert_array_equal(a.detach().numpy(), a2.detach().numpy())
    np.testing.assert_array_equal(b.detach().numpy(), b2.detach().numpy())


def test_optimizer_input_errors():
    p = cg.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        cg.optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        cg.optim.AdamW([p], lr=-1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        cg.optim.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)
    with pytest.raises(ValueError, match="non-leaf"):
        cg.optim.SGD([p * 2], lr=0.1)
    with pytest.raises(ValueError, match="required optimization parameter lr"):
        cg.optim.SGD([p])


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_torch():
    def pair(make, tmake):
        p, tp = cg.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        o, to = cg.optim.SGD([p], lr=0.2), torch.optim.SGD([tp], lr=0.2)
        return _lrs(make(o), o, 25), _lrs(tmake(to), to, 25)

    ours, ref = pair(lambda o: cg.optim.lr_scheduler.CosineAnnealingLR(o, 10, eta_min=0.01),
                     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, eta_min=0.01))
    np.testing.assert_allclose(ours[:11], ref[:11], rtol=1e-9)
    ours, ref = pair(lambda o: cg.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 7),
                     lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 7))
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    ours, ref = pair(lambda o: cg.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t),
                     lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t))
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_warmup_cosine_shape():
    p = cg.zeros(1, requires_grad=True)
    opt = cg.optim.AdamW([p], lr=1.0)
    sched = cg.optim.lr_scheduler.WarmupCosineLR(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = _lrs(sched, opt, 20)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[14:] == pytest.approx([0.1] * 6)
    assert all(x >= y for x, y in zip(lrs[3:], lrs[4:]))
    with pytest.raises(ValueError, match="warmup_steps"):
        cg.optim.lr_scheduler.WarmupCosineLR(opt, warmup_steps=20, total_steps=10)


# --- the fused path's frontend on CPU ---------------------------------------------------------
# The multi-tensor kernels need a GPU (tests/test_cuda_ops_optim.py, tests/test_optim_gpu.py). Here
# CPU tensors are declared eligible and the kernels are replaced by NumPy versions of their
# documented contract (cutegrad/backends/cuda.py), so what the optimizers hand to the kernels --
# buckets, state layout, per-parameter step counters, first-step momentum buffers, the lr tensor --
# is checked against torch.optim on a CPU.

class FakeKernels:
    def __init__(self):
        self.calls = []

    @staticmethod
    def _arr(t):
        return t.detach().numpy()  # shares memory: writes update the tensor

    def adamw(self, params, grads, ms, vs, lr, b1, b2, eps, wd, step, maximize=False, grad_scale=None,
              decoupled=True, increment_step=False, shadows=None, shadow_dtype=None):
        assert isinstance(step, list) and increment_step, "the optimizers pass per-parameter device counters"
        self.calls.append(("adamw", len(params), decoupled))
        lr = float(lr)
        scale = float(grad_scale) if grad_scale is not None else 1.0
        for p, g, m, v, st in zip(params, grads, ms, vs, step):
            a, mm, vv, sa = self._arr(p), self._arr(m), self._arr(v), self._arr(st)
            sa += 1
            t = float(sa)
            g = self._arr(g).astype(np.float64) * (-1 if maximize else 1) * scale
            if not decoupled:
                g = g + wd * a
            pv = a * (1 - lr * wd) if decoupled else a.astype(np.float64)
            mm += (g - mm) * (1 - b1)
            vv *= b2
            vv += (1 - b2) * g * g
            a[...] = pv - lr / (1 - b1 ** t) * mm / (np.sqrt(vv) / np.sqrt(1 - b2 ** t) + eps)

    def sgd(self, params, grads, bufs, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
            first_step=False, maximize=False, grad_scale=None, shadows=None, shadow_dtype=None):
        self.calls.append(("sgd", len(params), first_step))
        lr = float(lr)
        scale = float(grad_scale) if grad_scale is not None else 1.0
        for i, (p, g) in enumerate(zip(params, grads)):
            a = self._arr(p)
            d = self._arr(g).astype(np.float64) * (-1 if maximize else 1) * scale + weight_decay * a
            if bufs is not None:
                b = self._arr(bufs[i])
                b[...] = d if first_step else momentum * b + (1 - dampening) * d
                d = d + momentum * b if nesterov else b.astype(np.float64)
            a -= lr * d


@contextlib.contextmanager
def registered(fakes):
    """Kernels {(name, backend): fn} swapped into the registry (the optimizers and clipping look
    their kernels up there) for the duration of the block."""
    saved = {key: kernel(key[0]).impl[key[1]] for key in fakes}
    for (name, backend), fn in fakes.items():
        kernel(name).impl[backend] = fn
    try:
        yield
    finally:
        for (name, backend), fn in saved.items():
            kernel(name).impl[backend] = fn


@pytest.fixture
def fake_fused(monkeypatch):
    from cutegrad.optim import fused
    fake = FakeKernels()
    monkeypatch.setattr(fused, "param_blocker", lambda i, p: None)
    monkeypatch.setattr(fused, "lr_blocker", lambda lr, devices: None)
    with registered({("adamw_multi_tensor", CPU): fake.adamw, ("sgd_multi_tensor", CPU): fake.sgd}):
        yield fake


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
                                dict(lr=1e-2, eps=1e-6, weight_decay=0.05, maximize=True)])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_fused_adam_frontend_matches_torch(fake_fused, name, kw):
    opt, ps = _run(lambda p: getattr(cg.optim, name)(p, fused=True, **kw),
                   lambda p: getattr(torch.optim, name)(p, **kw))
    assert fake_fused.calls == [("adamw", 2, name == "AdamW")] * 3 + [("adamw", 1, name == "AdamW")] + \
        [("adamw", 2, name == "AdamW")] * 8  # one launch per step; step 3 has one gradient
    steps = [opt.state[p]["step"] for p in ps]
    assert all(isinstance(s, cg.Tensor) and s.dtype is cg.float32 and s.numel() == 1 for s in steps)
    assert [float(s) for s in steps] == [12.0, 11.0]


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=0.01),
                                dict(lr=0.05, momentum=0.9, nesterov=True),
                                dict(lr=0.1, momentum=0.5, dampening=0.3, maximize=True)])
def test_fused_sgd_frontend_matches_torch(fake_fused, kw):
    # parameter 1 has no gradient at the first step: its momentum buffer starts one step later,
    # in a launch of its own with first_step set
    _run(lambda p: cg.optim.SGD(p, fused=True, **kw), lambda p: torch.optim.SGD(p, **kw), skip_at=0)
    mom = kw.get("momentum", 0) != 0
    assert fake_fused.calls[0] == ("sgd", 1, mom)
    rest = fake_fused.calls[1:]
    if mom:
        assert rest[:2] == [("sgd", 1, False), ("sgd", 1, True)]
        rest = rest[2:]
    assert rest == [("sgd", 2, False)] * 10 + ([] if mom else [("sgd", 2, False)])


def test_fused_rejects_a_gradient_it_cannot_read_before_any_launch(fake_fused):
    p = cg.ones(4, 3, requires_grad=True)
    opt = cg.optim.AdamW([p], lr=0.1, fused=True)
    p.grad = cg.tensor(np.arange(12, dtype=np.float32).reshape(3, 4)).t()
    with pytest.raises(ValueError, match=r"AdamW\(fused=True\): the gradient of parameter 0 is not contiguous"):
        opt.step()
    assert fake_fused.calls == [] and not opt.state
    auto = cg.optim.AdamW([p], lr=0.1)  # fused=None: that step takes the composite path
    auto.step()
    assert fake_fused.calls == [] and auto.state[p]["step"] == 1


def test_fused_true_needs_eligible_parameters():
    p = cg.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"SGD\(fused=True\): parameter 0 is on cpu; the fused kernels need CUDA"):
        cg.optim.SGD([p], lr=0.1, fused=True)
    with pytest.raises(ValueError, match=r"AdamW\(fused=True\): amsgrad is not covered"):
        cg.optim.AdamW([p], amsgrad=True, fused=True)
    opt = cg.optim.Adam([p])
    with pytest.raises(ValueError, match=r"Adam\(fused=True\): parameter 0 is on cpu"):
        opt.add_param_group({"params": [cg.zeros(2, requires_grad=True)], "fused": True})
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        cg.optim.SGD([p], lr=0.1, fused="yes")
    with pytest.raises(ValueError, match="Tensor lr must be a floating-point tensor of one element"):
        cg.optim.AdamW([p], lr=cg.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        cg.optim.SGD([p], lr=cg.tensor(-0.1))


def test_fused_false_and_auto_are_the_composite_path_on_cpu():
    for name, kw in (("AdamW", dict(lr=1e-2, weight_decay=0.1)), ("SGD", dict(lr=0.1, momentum=0.9))):
        runs = []
        for fused in (None, False):
            opt, ps = _run(lambda p: getattr(cg.optim, name)(p, fused=fused, **kw),
                           lambda p: getattr(torch.optim, name)(p, **kw))
            runs.append([p.detach().numpy().copy() for p in ps])
            if name == "AdamW":
                assert all(isinstance(s["step"], int) for s in opt.state.values())
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a, b)


def test_tensor_lr_is_scheduled_in_place():
    """A tensor lr is filled in place by the schedule (a captured step keeps reading the same memory)
    and steps exactly as a float lr does."""
    def run(lr):
        rng = np.random.default_rng(5)
        p = cg.tensor(rng.standard_normal(6).astype(np.float32), requires_grad=True)
        opt = cg.optim.AdamW([p], lr=lr, weight_decay=0.1)
        sched = cg.optim.lr_scheduler.WarmupCosineLR(opt, warmup_steps=3, total_steps=10, min_lr_ratio=0.1)
        seen = []
        for _ in range(10):
            p.grad = cg.tensor(rng.standard_normal(6).astype(np.float32))
            opt.step()
            sched.step()
            seen.append(float(opt.param_groups[0]["lr"]))
        return p.detach().numpy(), seen, opt, sched

    lr_t = cg.tensor(0.02, dtype=cg.float32)
    p_t, seen_t, opt, sched = run(lr_t)
    p_f, seen_f, _, _ = run(0.02)
    assert opt.param_groups[0]["lr"] is lr_t
    assert isinstance(sched.base_lrs[0], float) and sched.base_lrs[0] == pytest.approx(0.02)
    np.testing.assert_allclose(seen_t, seen_f, rtol=1e-6)  # the tensor holds the float32 rounding
    np.testing.assert_allclose(p_t, p_f, rtol=1e-5, atol=1e-7)


def test_state_dict_with_tensor_lr_and_tensor_steps():
    rng = np.random.default_rng(6)
    init = rng.standard_normal(5).astype(np.float32)
    grads = [rng.standard_normal(5).astype(np.float32) for _ in range(5)]
    lr = cg.tensor(0.05, dtype=cg.float32)
    a = cg.tensor(init, requires_grad=True)
    opt = cg.optim.AdamW([a], lr=lr, weight_decay=0.1)
    for g in grads[:3]:
        a.grad = cg.tensor(g)
        opt.step()
    sd = opt.state_dict()
    saved_lr = sd["param_groups"][0]["lr"]
    assert saved_lr is not lr and float(saved_lr) == pytest.approx(0.05)  # a snapshot
    lr.fill_(0.5)
    assert float(saved_lr) == pytest.approx(0.05)
    # steps stored as tensors (as torch and the fused path store them) resume the composite path
    sd["state"][0]["step"] = cg.tensor(3.0, dtype=cg.float32)
    b = cg.tensor(a.detach().numpy().copy(), requires_grad=True)
    own_lr = cg.tensor(1.0, dtype=cg.float32)
    opt2 = cg.optim.AdamW([b], lr=own_lr, weight_decay=0.1)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] is own_lr and float(own_lr) == pytest.approx(0.05)
    lr.fill_(0.05)
    for g in grads[3:]:
        for p, o in ((a, opt), (b, opt2)):
            p.grad = cg.tensor(g)
            o.step()
    np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert isinstance(opt2.state[b]["step"], cg.Tensor) and float(opt2.state[b]["step"]) == 5.0


def test_load_state_dict_casts_moments_to_the_parameter_dtype():
    p64 = cg.tensor(np.ones(3), dtype=cg.float64, requires_grad=True)
    opt = cg.optim.Adam([p64], lr=0.1)
    p64.grad = cg.ones(3, dtype=cg.float64)
    opt.step()
    p32 = cg.ones(3, requires_grad=True)
    opt32 = cg.optim.Adam([p32], lr=0.1)
    opt32.load_state_dict(opt.state_dict())
    st = opt32.state[p32]
    assert st["exp_avg"].dtype is cg.float32 and st["exp_avg_sq"].dtype is cg.float32 and st["step"] == 1


def test_clip_grad_norm_fused_path_glue(monkeypatch, request):
    """The fused 2-norm path (kernels faked in NumPy, as above): one norm call, one in-place scale call
    reading the coefficient slot, the total returned as a 0-d tensor; other norms and
    error_if_nonfinite stay composite."""
    from cutegrad.nn.utils import clip_grad
    calls = []

    def grad_norm_clip(grads, max_norm):
        norm = np.sqrt(sum(float((g.numpy().astype(np.float64) ** 2).sum()) for g in grads))
        calls.append("norm")
        return cg.tensor([norm, min(1.0, max_norm / (norm + 1e-6))], dtype=cg.float32)

    def multi_tensor_scale(tensors, scale):
        assert tuple(scale.shape) == (1,)
        calls.append("scale")
        for t in tensors:
            t.numpy()[...] *= float(scale)

    monkeypatch.setattr(clip_grad, "_fusable", lambda grads: True)
    fakes = registered({("grad_norm_clip", CUDA): grad_norm_clip, ("multi_tensor_scale", CUDA): multi_tensor_scale})
    fakes.__enter__()
    request.addfinalizer(lambda: fakes.__exit__(None, None, None))
    rng = np.random.default_rng(7)
    grads = [rng.standard_normal(s).astype(np.float32) * 3 for s in [(3, 4), (7,), (2, 2, 2)]]
    for norm_type, error_if_nonfinite, fused in ((2.0, False, True), (1.0, False, False), (2.0, True, False)):
        calls.clear()
        ps = [cg.zeros(g.shape, requires_grad=True) for g in grads]
        tps = [torch.zeros(g.shape, requires_grad=True) for g in grads]
        for p, tp, g in zip(ps, tps, grads):
            p.grad, tp.grad = cg.tensor(g), torch.from_numpy(g.copy())
        total = cg.nn.utils.clip_grad_norm_(ps, 1.5, norm_type, error_if_nonfinite=error_if_nonfinite)
        ttotal = torch.nn.utils.clip_grad_norm_(tps, 1.5, norm_type)
        assert calls == (["norm", "scale"] if fused else [])
        assert tuple(total.shape) == () and total.item() == pytest.approx(ttotal.item(), rel=1e-5)
        for p, tp in zip(ps, tps):
            np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_fused_kernel_bindings_reject_bad_arguments_before_launch():
    """The native argument checks run before any CUDA call, so they are testable without a GPU
    (the pointers below are never dereferenced)."""
    try:
        from cutegrad import _C
    except ImportError as exc:
        pytest.skip(f"cutegrad._C is not built: {exc}")
    f32 = cg.float32.index
    with pytest.raises(ValueError, match="multi_tensor_scale: scale is a null pointer"):
        _C.multi_tensor_scale([0x1000], [4], f32, 0, 8192, 0)
    with pytest.raises(ValueError, match="adamw: increment_step needs device step counters"):
        _C.adamw([0x1000], [0x2000], [0x3000], [0x4000], [4], f32, f32, 1e-3, 0, 0.9, 0.999, 1e-8, 0.0, True,
                 1.0, [], True, 0, False, 8192, 0, [], 0)
    with pytest.raises(ValueError, match="adamw: the tensor lists differ in length .*steps 2"):
        _C.adamw([0x1000], [0x2000], [0x3000], [0x4000], [4], f32, f32, 1e-3, 0, 0.9, 0.999, 1e-8, 0.0, True,
                 0.0, [0x5000, 0x6000], True, 0, False, 8192, 0, [], 0)
    with pytest.raises(ValueError, match="adamw: step counter 0 is a null pointer"):
        _C.adamw([0x1000], [0x2000], [0x3000], [0x4000], [4], f32, f32, 1e-3, 0, 0.9, 0.999, 1e-8, 0.0, True,
                 0.0, [0], True, 0, False, 8192, 0, [], 0)
    with pytest.raises(ValueError, match="sgd: momentum_buffers and grads must have the same length"):
        _C.sgd([0x1000], [0x2000], [0x3000, 0x4000], [4], f32, f32, 0.1, 0, 0.9, 0.0, 0.0, False, False, 0, False,
               8192, 0, [], 0)
    with pytest.raises(ValueError, match="adamw: shadows must be empty or one per tensor"):
        _C.adamw([0x1000], [0x2000], [0x3000], [0x4000], [4], f32, f32, 1e-3, 0, 0.9, 0.999, 1e-8, 0.0, True,
                 0.0, [0x5000], True, 0, False, 8192, 0, [0x6000, 0x7000], cg.bfloat16.index)
    with pytest.raises(ValueError, match="sgd: shadow copies must be float16 or bfloat16"):
        _C.sgd([0x1000], [0x2000], [], [4], f32, f32, 0.1, 0, 0.0, 0.0, 0.0, False, False, 0, False,
               8192, 0, [0x6000], f32)
    with pytest.raises(ValueError, match="multi_tensor_scale: parameters must be float32, float16 or bfloat16"):
        _C.multi_tensor_scale([0x1000], [4], cg.float64.index, 0x2000, 8192, 0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_optimizer_clip_grad_norm_folds_the_coefficient_into_the_step(fake_fused, monkeypatch, name, fused):
    """Optimizer.clip_grad_norm_ + step() equals torch's clip_grad_norm_ + step(): on the fused path
    the coefficient reaches the kernel as grad_scale and no scaling pass runs; with a composite
    update (fused=False) it is clip_grad_norm_ itself."""
    from cutegrad.nn.utils import clip_grad
    calls = []

    def grad_norm_clip(grads, max_norm):
        norm = np.sqrt(sum(float((g.numpy().astype(np.float64) ** 2).sum()) for g in grads))
        calls.append("norm")
        return cg.tensor([norm, min(1.0, max_norm / (norm + 1e-6))], dtype=cg.float32)

    monkeypatch.setattr(clip_grad, "_fusable", lambda grads: True)
    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(2)
    init = [rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (5,))]
    ps = [cg.tensor(a, requires_grad=True) for a in init]
    tps = [torch.tensor(a, requires_grad=True) for a in init]
    opt, topt = getattr(cg.optim, name)(ps, fused=fused, **kw), getattr(torch.optim, name)(tps, **kw)
    def multi_tensor_scale(tensors, scale):
        calls.append("scale")
        for t in tensors:
            t.numpy()[...] *= float(scale)

    with registered({("grad_norm_clip", CUDA): grad_norm_clip, ("multi_tensor_scale", CUDA): multi_tensor_scale}):
        for _ in range(4):
            grads = [rng.standard_normal(a.shape).astype(np.float32) * 5 for a in init]
            for p, tp, g in zip(ps, tps, grads):
                p.grad, tp.grad = cg.tensor(g), torch.from_numpy(g.copy())
            total = opt.clip_grad_norm_(1.0)
            ttotal = torch.nn.utils.clip_grad_norm_(tps, 1.0)
            assert total.item() == pytest.approx(ttotal.item(), rel=1e-5)
            opt.step()
            topt.step()
            assert opt._grad_scale is None
            for p, tp in zip(ps, tps):
                np.testing.assert_allclose(p.detach().numpy(), tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert calls == (["norm"] if fused else ["norm", "scale"]) * 4


def test_weight_shadows_follow_the_parameter_version():
    from cutegrad.optim import weight_shadows
    p = cg.ones(3, requires_grad=True)
    shadow = p.detach().to(cg.bfloat16)
    weight_shadows.remember(p, shadow)
    assert weight_shadows.lookup(p, cg.bfloat16) is shadow
    assert weight_shadows.lookup(p, cg.float16) is None
    assert weight_shadows.shadows_for([p]) == ([shadow], cg.bfloat16)
    with cg.no_grad():
        p.mul_(2.0)  # an update the optimizers did not make: the copy is stale
    assert weight_shadows.lookup(p, cg.bfloat16) is None
    assert weight_shadows.shadows_for([p]) == ([None], None)
    q = cg.ones(2, requires_grad=True)
    weight_shadows.remember(q, q.detach().to(cg.bfloat16))
    del q
    assert len(weight_shadows._shadows) == 0 or all(e[0]() is not None for e in weight_shadows._shadows.values())


def test_autocast_reuses_the_optimizer_written_copy_on_the_dry_run_device():
    """Under bf16 autocast a training step casts each weight once, the fused AdamW writes the bf16
    copy (its shadow pointers), and the next step's forward launches no weight cast."""
    F = cg.nn.functional
    with cg.cuda.dry_run() as dry:
        lin = cg.nn.Linear(32, 16).to("cuda")
        opt = cg.optim.AdamW(lin.parameters(), lr=1e-3)
        x = cg.randn(8, 32, device="cuda")

        def step():
            opt.zero_grad()
            with cg.autocast("cuda", dtype=cg.bfloat16):
                loss = F.linear(x, lin.weight, lin.bias).float().sum()
            loss.backward()
            opt.step()

        def weight_casts(calls):
            # elementwise copies from float32 to bfloat16 of a parameter's shape
            return [c for c in calls if c[0] == "elementwise" and c[1][0] == 5 and c[1][5] == cg.bfloat16.index
                    and tuple(c[1][3]) in ((16, 32), (16,))]

        step()
        assert len(weight_casts(dry.calls)) == 2
        adamw = [c for c in dry.calls if c[0] == "adamw"]
        assert adamw and all(ptr for ptr in adamw[-1][1][-2]) and adamw[-1][1][-1] == cg.bfloat16.index
        dry.reset()
        step()
        assert weight_casts(dry.calls) == []
        with cg.no_grad():
            lin.weight.mul_(0.5)  # changed outside the optimizer: cast again
        dry.reset()
        step()
        assert len(weight_casts(dry.calls)) == 1
