"""StepLR, MultiStepLR, ExponentialLR, OneCycleLR, ReduceLROnPlateau: lr (and momentum) sequences against
torch.optim.lr_scheduler, step for step."""
import numpy as np
import pytest

import cutegrad as cg

torch = pytest.importorskip("torch", reason="PyTorch CPU is the differential reference")
S, TS = cg.optim.lr_scheduler, torch.optim.lr_scheduler

STEPS = 40


def _pair(opt_name, opt_kw, groups=1):
    ps = [cg.zeros(2, requires_grad=True) for _ in range(groups)]
    tps = [torch.zeros(2, requires_grad=True) for _ in range(groups)]
    extra = [{"lr": opt_kw["lr"] * (i + 1)} for i in range(groups)]
    opt = getattr(cg.optim, opt_name)([dict(params=[p], **e) for p, e in zip(ps, extra)], **opt_kw)
    topt = getattr(torch.optim, opt_name)([dict(params=[p], **e) for p, e in zip(tps, extra)], **opt_kw)
    return opt, topt


def _trace(opt, sched, n, metrics=None):
    """Per step: every group's lr and momentum/beta1 as the optimizer sees them, then one scheduler step."""
    out = []
    for i in range(n):
        out.append([(float(g["lr"]), g.get("momentum"), g.get("betas", (None,))[0]) for g in opt.param_groups])
        out.append(list(sched.get_last_lr()))
        opt.step()
        sched.step(*([] if metrics is None else [metrics[i]]))
    return out


def _compare(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.array(a, dtype=float), np.array(b, dtype=float), rtol=1e-12, atol=0)


CASES = [
    ("StepLR", dict(step_size=7), "SGD", dict(lr=0.3)),
    ("StepLR", dict(step_size=1, gamma=0.5), "AdamW", dict(lr=0.01)),
    ("MultiStepLR", dict(milestones=[3, 10, 10, 25], gamma=0.3), "SGD", dict(lr=0.1, momentum=0.9)),
    ("MultiStepLR", dict(milestones=[30, 5]), "Adam", dict(lr=1e-3)),
    ("ExponentialLR", dict(gamma=0.9), "SGD", dict(lr=0.2)),
    ("ExponentialLR", dict(gamma=1.01), "Adam", dict(lr=1e-3)),
    ("OneCycleLR", dict(max_lr=0.5, total_steps=STEPS), "SGD", dict(lr=0.1, momentum=0.9)),
    ("OneCycleLR", dict(max_lr=[0.5, 0.2], epochs=4, steps_per_epoch=10, anneal_strategy="linear", pct_start=0.25),
     "SGD", dict(lr=0.1, momentum=0.9)),
    ("OneCycleLR", dict(max_lr=1e-2, total_steps=STEPS, three_phase=True, div_factor=10.0, final_div_factor=100.0),
     "AdamW", dict(lr=1e-3, betas=(0.9, 0.99))),
    ("OneCycleLR", dict(max_lr=1e-2, total_steps=STEPS + 5, cycle_momentum=False, base_momentum=0.8), "Adam",
     dict(lr=1e-3)),
]


@pytest.mark.parametrize("name, kw, opt_name, opt_kw", CASES)
@pytest.mark.parametrize("groups", [1, 2])
def test_closed_form_schedules_match_torch(name, kw, opt_name, opt_kw, groups):
    if groups == 1 and isinstance(kw.get("max_lr"), list):
        kw = dict(kw, max_lr=kw["max_lr"][0])
    opt, topt = _pair(opt_name, opt_kw, groups)
    _compare(_trace(opt, getattr(S, name)(opt, **kw), STEPS), _trace(topt, getattr(TS, name)(topt, **kw), STEPS))


def test_one_cycle_writes_torchs_group_keys_and_stops_at_total_steps():
    opt, topt = _pair("SGD", dict(lr=0.1, momentum=0.9))
    sched, tsched = S.OneCycleLR(opt, max_lr=1.0, total_steps=5), TS.OneCycleLR(topt, max_lr=1.0, total_steps=5)
    for k in ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "momentum"):
        assert opt.param_groups[0][k] == pytest.approx(topt.param_groups[0][k], rel=1e-15), k
    for _ in range(5):
        sched.step()
    with pytest.raises(ValueError, match="Tried to step 6 times. The specified number of total steps is 5"):
        sched.step()
    with pytest.raises(ValueError, match="momentum or beta1"):
        S.OneCycleLR(cg.optim.Optimizer([cg.zeros(1, requires_grad=True)], {"lr": 0.1}), max_lr=1.0, total_steps=3)
    with pytest.raises(ValueError, match="total_steps"):
        S.OneCycleLR(opt, max_lr=1.0)
    with pytest.raises(ValueError, match="pct_start"):
        S.OneCycleLR(opt, max_lr=1.0, total_steps=4, pct_start=2)
    with pytest.raises(ValueError, match="expected 1 values for max_lr"):
        S.OneCycleLR(opt, max_lr=[1.0, 2.0], total_steps=4)


# Metrics with plateaus, noise-level improvements (below the threshold) and real ones.
METRICS = [1.0, 0.9, 0.9, 0.9, 0.89995, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75,
           0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75]


@pytest.mark.parametrize("kw", [
    dict(), dict(patience=2), dict(patience=1, factor=0.5, cooldown=2), dict(patience=0, min_lr=0.004),
    dict(mode="max", patience=1), dict(threshold=0.05, threshold_mode="abs", patience=1),
    dict(patience=1, min_lr=[0.001, 0.05], factor=0.2), dict(patience=0, factor=0.999999999, eps=1e-3),
])
@pytest.mark.parametrize("opt_name, opt_kw", [("SGD", dict(lr=0.1)), ("Adam", dict(lr=0.1))])
def test_reduce_on_plateau_matches_torch(kw, opt_name, opt_kw):
    groups = len(kw["min_lr"]) if isinstance(kw.get("min_lr"), list) else 1
    opt, topt = _pair(opt_name, opt_kw, groups)
    sched, tsched = S.ReduceLROnPlateau(opt, **kw), TS.ReduceLROnPlateau(topt, **kw)
    # tensors too, as torch takes them
    metrics = [cg.tensor(m, dtype=cg.float64) if i % 3 == 0 else m for i, m in enumerate(METRICS)]
    _compare(_trace(opt, sched, len(METRICS), metrics), _trace(topt, tsched, len(METRICS), METRICS))
    assert sched.best == tsched.best and sched.num_bad_epochs == tsched.num_bad_epochs
    assert sched.last_epoch == tsched.last_epoch


def test_reduce_on_plateau_rejects_bad_options():
    opt, _ = _pair("SGD", dict(lr=0.1))
    with pytest.raises(ValueError, match="Factor should be < 1.0"):
        S.ReduceLROnPlateau(opt, factor=1.0)
    with pytest.raises(ValueError, match="mode avg is unknown"):
        S.ReduceLROnPlateau(opt, mode="avg")
    with pytest.raises(ValueError, match="threshold mode pct is unknown"):
        S.ReduceLROnPlateau(opt, threshold_mode="pct")


def test_step_and_multistep_reject_bad_options():
    opt, _ = _pair("SGD", dict(lr=0.1))
    with pytest.raises(ValueError, match="step_size must be a positive int"):
        S.StepLR(opt, step_size=0)


def test_tensor_lr_is_filled_in_place_by_every_schedule():
    for make in (lambda o: S.StepLR(o, 2), lambda o: S.MultiStepLR(o, [1]), lambda o: S.ExponentialLR(o, 0.5),
                 lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=10)):
        lr = cg.tensor(0.1, dtype=cg.float32)
        opt = cg.optim.SGD([cg.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)
        sched = make(opt)
        for _ in range(3):
            sched.step()
        assert opt.param_groups[0]["lr"] is lr
        assert float(lr) == pytest.approx(sched.get_last_lr()[0], rel=1e-6)
    lr = cg.tensor(0.1, dtype=cg.float32)
    opt = cg.optim.SGD([cg.zeros(1, requires_grad=True)], lr=lr)
    sched = S.ReduceLROnPlateau(opt, patience=0)
    sched.step(1.0)
    sched.step(2.0)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.01, rel=1e-6)


def test_sequential_lr_chains_the_new_schedules_and_refuses_the_others():
    def run(lib):
        p = (cg if lib is S else torch).zeros(1, requires_grad=True)
        opt = (cg.optim if lib is S else torch.optim).SGD([p], lr=0.2)
        sched = lib.SequentialLR(opt, [lib.StepLR(opt, 2, 0.5), lib.ExponentialLR(opt, 0.9),
                                       lib.MultiStepLR(opt, [2, 3], 0.1)], milestones=[5, 9])
        return _trace(opt, sched, 20)

    ours, ref = run(S), run(TS)
    _compare(ours, ref)
    opt, _ = _pair("SGD", dict(lr=0.1))
    with pytest.raises(TypeError, match="OneCycleLR has no closed form"):
        S.SequentialLR(opt, [S.LinearLR(opt), S.OneCycleLR(opt, max_lr=1.0, total_steps=5)], [2])
