"""Resuming training from a checkpoint gives exactly the run that never stopped.

Train N steps, cutegrad.save model + optimizer + scheduler state to a file, rebuild everything from other
random weights, cutegrad.load and load_state_dict, train M more steps: the losses and the final weights equal
those of N+M uninterrupted steps, bit for bit (CPU). Every optimizer and every schedule; the fused path's state
layout (device step counters) through the NumPy stand-in kernels of test_optim.
"""
import numpy as np
import pytest

import cutegrad as cg
from test_optim import fake_fused  # noqa: F401  (fixture)

S = cg.optim.lr_scheduler
N, M = 4, 5
RNG = np.random.default_rng(0)
DATA = [(RNG.standard_normal((6, 5)).astype(np.float32), RNG.standard_normal((6, 3)).astype(np.float32))
        for _ in range(N + M)]

OPTIMIZERS = {
    "sgd": lambda ps: cg.optim.SGD(ps, lr=0.05),
    "sgd_nesterov_wd": lambda ps: cg.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam_amsgrad": lambda ps: cg.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adamw": lambda ps: cg.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
    "adamw_groups": lambda ps: cg.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3,
                                                                    "weight_decay": 0.0}], lr=1e-2),
}
SCHEDULES = {
    "none": None,
    "step": lambda o: S.StepLR(o, step_size=3, gamma=0.5),
    "multistep": lambda o: S.MultiStepLR(o, milestones=[2, 5, 6], gamma=0.5),
    "exponential": lambda o: S.ExponentialLR(o, gamma=0.8),
    "onecycle": lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=N + M),
    "plateau": lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=0.5),
    "lambda": lambda o: S.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    "linear": lambda o: S.LinearLR(o, start_factor=0.2, total_iters=6),
    "cosine": lambda o: S.CosineAnnealingLR(o, T_max=7, eta_min=1e-4),
    "sequential": lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.5, 1.0, 2), S.ExponentialLR(o, 0.7)], [3]),
    "warmup_cosine": lambda o: S.WarmupCosineLR(o, warmup_steps=3, total_steps=N + M, min_lr_ratio=0.1),
}


def _build(seed, opt_name, sched_name, **opt_kw):
    cg.manual_seed(seed)
    model = cg.nn.Sequential(cg.nn.Linear(5, 8), cg.nn.ReLU(), cg.nn.Linear(8, 3))
    opt = OPTIMIZERS[opt_name](list(model.parameters()))
    for g in opt.param_groups:
        g.update(opt_kw)
    make = SCHEDULES[sched_name]
    return model, opt, (make(opt) if make else None)


def _train(model, opt, sched, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = cg.nn.functional.mse_loss(model(cg.tensor(x)), cg.tensor(y))
        loss.backward()
        opt.step()
        if isinstance(sched, S.ReduceLROnPlateau):
            sched.step(loss.item())
        elif sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _check_resume(tmp_path, opt_name, sched_name, **opt_kw):
    straight_model, opt, sched = _build(0, opt_name, sched_name, **opt_kw)
    straight = _train(straight_model, opt, sched, DATA)

    model, opt, sched = _build(0, opt_name, sched_name, **opt_kw)
    first = _train(model, opt, sched, DATA[:N])
    path = tmp_path / "resume.safetensors"
    cg.save({"model": model.state_dict(), "optim": opt.state_dict(),
             "sched": sched.state_dict() if sched else None, "step": N}, path)
    del model, opt, sched

    model, opt, sched = _build(1, opt_name, sched_name, **opt_kw)  # other weights: the load must overwrite them
    ckpt = cg.load(path)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    if sched is not None:
        sched.load_state_dict(ckpt["sched"])
    assert ckpt["step"] == N
    resumed = first + _train(model, opt, sched, DATA[N:])
    assert resumed == straight  # exactly, step by step
    for (name, a), (_, b) in zip(model.state_dict().items(), straight_model.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    return opt


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_resume_equals_uninterrupted_for_every_optimizer(tmp_path, opt_name):
    _check_resume(tmp_path, opt_name, "onecycle" if opt_name != "sgd" else "none")


@pytest.mark.parametrize("sched_name", sorted(SCHEDULES))
def test_resume_equals_uninterrupted_for_every_schedule(tmp_path, sched_name):
    _check_resume(tmp_path, "sgd_nesterov_wd", sched_name)


def test_resume_with_a_tensor_lr(tmp_path):
    # the saved lr is a snapshot; loading fills the rebuilt optimizer's own lr tensor in place
    model, opt, sched = _build(0, "adamw", "none", lr=cg.tensor(0.01, dtype=cg.float32))
    lr = opt.param_groups[0]["lr"]
    _train(model, opt, sched, DATA[:N])
    cg.save(opt.state_dict(), tmp_path / "o.safetensors")
    model2, opt2, _ = _build(0, "adamw", "none", lr=cg.tensor(1.0, dtype=cg.float32))
    own = opt2.param_groups[0]["lr"]
    opt2.load_state_dict(cg.load(tmp_path / "o.safetensors"))
    assert opt2.param_groups[0]["lr"] is own and float(own) == float(lr)


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_nesterov_wd"])
def test_resume_of_the_fused_state_layout(tmp_path, fake_fused, opt_name):  # noqa: F811
    opt = _check_resume(tmp_path, opt_name, "step", fused=True)
    if opt_name == "adamw":
        steps = [s["step"] for s in opt.state.values()]
        assert all(isinstance(s, cg.Tensor) and s.dtype is cg.float32 and float(s) == N + M for s in steps)
    assert fake_fused.calls  # the fused path ran


def test_fused_state_resumes_on_the_composite_path(tmp_path, fake_fused):  # noqa: F811
    # A checkpoint written by the fused path (tensor step counters) continues on the composite one,
    # as a GPU checkpoint resumed on a CPU does.
    model, opt, _ = _build(0, "adamw", "none", fused=True)
    _train(model, opt, None, DATA[:N])
    cg.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "f.safetensors")
    ckpt = cg.load(tmp_path / "f.safetensors", map_location="cpu")
    model2, opt2, _ = _build(1, "adamw", "none", fused=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.param_groups[0]["fused"] is True
    for g in opt2.param_groups:
        g["fused"] = False
    _train(model2, opt2, None, DATA[N:])
    assert all(float(s["step"]) == N + M for s in opt2.state.values())


@pytest.mark.parametrize("name, kw", [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
                                      ("Adam", dict(lr=1e-2, amsgrad=True)), ("AdamW", dict(lr=1e-2))])
def test_torch_optimizer_state_dict_resumes_in_cutegrad(name, kw):
    # torch users' state dicts ("state" keyed by index, "param_groups", tensor steps) load as they are
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    init = [rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (3,))]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in init] for _ in range(N + M)]
    tps = [torch.tensor(a, requires_grad=True) for a in init]
    topt = getattr(torch.optim, name)(tps, **kw)
    for step, gs in enumerate(grads):
        if step == N:
            sd = topt.state_dict()
            ps = [cg.tensor(p.detach().numpy().copy(), requires_grad=True) for p in tps]
            opt = getattr(cg.optim, name)(ps, **kw)
            opt.load_state_dict({"state": {i: {k: cg.tensor(v.numpy()) if torch.is_tensor(v) else v
                                               for k, v in s.items()} for i, s in sd["state"].items()},
                                 "param_groups": sd["param_groups"]})
        for p, g in zip(tps, gs):
            p.grad = torch.tensor(g)
        topt.step()
        if step >= N:
            for p, g in zip(ps, gs):
                p.grad = cg.tensor(g)
            opt.step()
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.detach().numpy(), tp.detach().numpy(), rtol=1e-6, atol=1e-7)
