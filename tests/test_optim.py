"""Optimizers and LR schedules step-for-step against torch.optim."""
import numpy as np
import pytest

import cutegrad as cg

torch = pytest.importorskip("torch", reason="PyTorch CPU is the differential reference")


def _run(make_ours, make_ref, steps=12, shapes=((5, 3), (7,))):
    rng = np.random.default_rng(0)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ps = [cg.tensor(a, requires_grad=True) for a in init]
    tps = [torch.tensor(a, requires_grad=True) for a in init]
    opt, topt = make_ours(ps), make_ref(tps)
    for step in range(steps):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if step == 3:
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
