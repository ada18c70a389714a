"""cutegrad.amp against torch.amp on the CPU: the loss-scale sequence, skipped
steps under injected overflow (parameters and optimizer state bit-equal to
torch's after every step), the masked (device-flag) step CUDA uses, run here
on CPU tensors, state_dict round trips, the disabled scaler, and the aliases.
GPU variants (float16 autocast with real overflow, the masked step inside a
captured graph) are at the end, marker gpu.
"""
import warnings

import numpy as np
import pytest

import cutegrad
import cutegrad.cuda as cuda
from cutegrad.amp import grad_scaler as gs

torch = pytest.importorskip("torch")


def make_pair(rng, opt_name):
    """A 2-layer MLP with the same float32 weights in cutegrad and torch, and an optimizer on each."""
    w1, b1 = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    w2 = rng.standard_normal((3, 8)).astype(np.float32)

    def build(lib, make_opt):
        m = lib.nn.Sequential(lib.nn.Linear(5, 8), lib.nn.Tanh(), lib.nn.Linear(8, 3, bias=False))
        with lib.no_grad():
            m[0].weight.copy_(lib.tensor(w1))
            m[0].bias.copy_(lib.tensor(b1))
            m[2].weight.copy_(lib.tensor(w2))
        return m, make_opt(lib, m.parameters())

    def make_opt(lib, params):
        if opt_name == "adamw":
            return lib.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        return lib.optim.SGD(params, lr=0.05, momentum=0.9)

    return build(cutegrad, make_opt), build(torch, make_opt)


def train(lib, model, opt, scaler, xs, ys, overflow_at, masked=False):
    """Steps of scaled training; a step in overflow_at multiplies its loss by 1e38 (its gradients overflow)."""
    scales, trackers = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        opt.zero_grad()
        loss = ((model(lib.tensor(x)) - lib.tensor(y)) ** 2).mean()
        if i in overflow_at:
            loss = loss * 1e38
        scaler.scale(loss).backward()
        if masked:  # the CUDA path (device flag, no host read), on CPU tensors
            scaler.unscale_(opt)
            st = scaler._state_of(opt)
            st["stage"] = gs.OptState.STEPPED
            gs.masked_step(opt, next(iter(st["found_inf_per_device"].values())))
        else:
            scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        trackers.append(scaler._get_growth_tracker())
    return scales, trackers


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
@pytest.mark.parametrize("masked", [False, True], ids=["host_flag", "masked_step"])
@pytest.mark.parametrize("overflow_at", [(0,), (2, 3, 7), ()], ids=["first", "several", "none"])
def test_scale_sequence_and_skips_match_torch(rng, opt_name, masked, overflow_at):
    (cm, copt), (tm, topt) = make_pair(rng, opt_name)
    xs = [rng.standard_normal((4, 5)).astype(np.float32) for _ in range(10)]
    ys = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(10)]
    kw = dict(init_scale=2.0 ** 10, growth_factor=2.0, backoff_factor=0.25, growth_interval=3)
    cs = cutegrad.amp.GradScaler("cpu", **kw)
    ts = torch.amp.GradScaler("cpu", **kw)
    c_scales, c_tr = train(cutegrad, cm, copt, cs, xs, ys, overflow_at, masked)
    t_scales, t_tr = train(torch, tm, topt, ts, xs, ys, overflow_at)
    assert c_scales == t_scales
    assert c_tr == t_tr
    # float32 rounding of matmuls differs between the libraries and momentum carries it over 10 steps
    for cp, tp in zip(cm.parameters(), tm.parameters()):
        np.testing.assert_allclose(cp.detach().numpy(), tp.detach().numpy(), rtol=1e-4, atol=1e-6)
    # the optimizer state holds no trace of the skipped steps (step counts, moments, momentum)
    for cp, tp in zip(cm.parameters(), tm.parameters()):
        cst, tst = copt.state.get(cp, {}), topt.state.get(tp, {})
        assert set(cst) == set(tst)
        for k in tst:
            np.testing.assert_allclose(np.asarray(cutegrad.tensor(cst[k]).numpy(), dtype=np.float64),
                                       tst[k].detach().double().numpy(), rtol=1e-4, atol=1e-6)
    assert cs.state_dict() == ts.state_dict()


def test_update_rule_matches_torch_kernel():
    """update_scale_ against torch._amp_update_scale_ over overflow/clean patterns, incl. growth to inf."""
    for pattern in ([0, 0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1], [0] * 9):
        for init in (2.0 ** 16, 3.0e38):
            cs, ct = cutegrad.full((), init), cutegrad.full((), 0, dtype=cutegrad.int32)
            ts, tt = torch.full((), init), torch.full((), 0, dtype=torch.int32)
            for f in pattern:
                gs.update_scale_(cs, ct, cutegrad.full((), float(f)), 2.0, 0.5, 3)
                torch._amp_update_scale_(ts, tt, torch.full((), float(f)), 2.0, 0.5, 3)
                assert float(cs) == float(ts) and int(ct) == int(tt)
            assert cs.dtype is cutegrad.float32 and ct.dtype is cutegrad.int32


def test_unscale_then_clip_then_step(rng):
    """The documented pattern: unscale_, clip_grad_norm_ on true gradients, step; as torch."""
    (cm, copt), (tm, topt) = make_pair(rng, "adamw")
    cs, ts = cutegrad.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    x, y = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    norms = []
    for lib, m, opt, s in ((cutegrad, cm, copt, cs), (torch, tm, topt, ts)):
        s.scale(((m(lib.tensor(x)) - lib.tensor(y)) ** 2).mean()).backward()
        s.unscale_(opt)
        norms.append(float(lib.nn.utils.clip_grad_norm_(m.parameters(), 0.5)))
        s.step(opt)
        s.update()
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    for cp, tp in zip(cm.parameters(), tm.parameters()):
        np.testing.assert_allclose(cp.detach().numpy(), tp.detach().numpy(), rtol=2e-6, atol=2e-7)


def test_scale_nested_outputs_and_errors(rng):
    s = cutegrad.amp.GradScaler("cpu", init_scale=8.0)
    a, b = cutegrad.tensor([1.0, 2.0]), cutegrad.tensor(3.0)
    out = s.scale([a, (b,)])
    assert isinstance(out, list) and isinstance(out[1], tuple)
    np.testing.assert_array_equal(out[0].numpy(), [8.0, 16.0])
    assert float(out[1][0]) == 24.0
    with pytest.raises(ValueError, match="Tensor or an iterable"):
        s.scale(3.0)
    (cm, copt), _ = make_pair(rng, "sgd")
    s2 = cutegrad.amp.GradScaler("cpu")
    with pytest.raises(RuntimeError, match="did not use scaler.scale"):
        s2.step(copt)
    s2.scale(cm(cutegrad.ones(2, 5)).sum()).backward()
    s2.unscale_(copt)
    with pytest.raises(RuntimeError, match="already been called"):
        s2.unscale_(copt)
    s2.step(copt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        s2.step(copt)
    with pytest.raises(RuntimeError, match="after step"):
        s2.unscale_(copt)
    with pytest.raises(RuntimeError, match="Closure"):
        s2.step(copt, closure=lambda: 0)
    s2.update()
    with pytest.raises(ValueError, match="growth_factor"):
        cutegrad.amp.GradScaler("cpu", growth_factor=1.0)
    with pytest.raises(ValueError, match="device"):
        cutegrad.amp.GradScaler("mps")


def test_fp16_gradients_refused_like_torch():
    p = cutegrad.zeros(3, dtype=cutegrad.float16, requires_grad=True)
    opt = cutegrad.optim.SGD([p], lr=0.1)
    s = cutegrad.amp.GradScaler("cpu")
    s.scale((p.float() * 2).sum()).backward()
    with pytest.raises(ValueError, match="FP16 gradients"):
        s.unscale_(opt)


def test_update_new_scale_and_state_dict_round_trip(rng):
    s = cutegrad.amp.GradScaler("cpu", init_scale=4.0, growth_interval=7)
    s.scale(cutegrad.tensor(1.0))
    s.update(new_scale=32.0)
    assert s.get_scale() == 32.0
    s.update(new_scale=cutegrad.tensor([2.0]))
    assert s.get_scale() == 2.0
    with pytest.raises(ValueError, match="new_scale"):
        s.update(new_scale=cutegrad.ones(2))
    sd = s.state_dict()
    assert sd == {"scale": 2.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7,
                  "_growth_tracker": 0}
    t = torch.amp.GradScaler("cpu")
    t.load_state_dict(sd)  # loadable by torch, and back
    s2 = cutegrad.amp.GradScaler("cpu")
    s2.load_state_dict(t.state_dict())
    assert s2.state_dict() == sd
    with pytest.raises(RuntimeError, match="empty"):
        s2.load_state_dict({})


def test_disabled_scaler_is_a_pass_through(rng):
    (cm, copt), _ = make_pair(rng, "sgd")
    s = cutegrad.amp.GradScaler("cpu", enabled=False)
    loss = cm(cutegrad.ones(2, 5)).sum()
    assert s.scale(loss) is loss
    before = [p.detach().clone() for p in cm.parameters()]
    loss.backward()
    s.unscale_(copt)
    s.step(copt)
    s.update()
    assert any(not np.array_equal(a.numpy(), p.detach().numpy()) for a, p in zip(before, cm.parameters()))
    assert s.get_scale() == 1.0 and s.state_dict() == {} and not s.is_enabled()
    s.load_state_dict({})  # a no-op, as torch's


@pytest.mark.skipif(cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_scaler_without_gpu_warns_and_disables():
    with pytest.warns(UserWarning, match="CUDA is not available") as rec:
        s = cutegrad.cuda.amp.GradScaler(enabled=True)
    assert rec[0].filename == __file__  # points at the caller, as torch's warning does
    assert not s.is_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cutegrad.amp.GradScaler("cuda", enabled=False).is_enabled()


def test_aliases():
    assert cutegrad.amp.autocast is cutegrad.autocast
    assert issubclass(cutegrad.cuda.amp.GradScaler, cutegrad.amp.GradScaler)
    ac = cutegrad.cuda.amp.autocast(dtype=cutegrad.bfloat16)
    assert ac.device == "cuda" and ac.fast_dtype is cutegrad.bfloat16
    assert cutegrad.amp.is_autocast_available("cuda") and not cutegrad.amp.is_autocast_available("xla")


def test_amp_autocast_as_decorator_and_context_manager(rng):
    w = cutegrad.tensor(rng.standard_normal((4, 4)), dtype=cutegrad.float32)

    @cutegrad.amp.autocast(device_type="cpu", dtype=cutegrad.bfloat16)
    def f(x):
        return x @ w

    assert f(w).dtype is cutegrad.bfloat16
    assert (w @ w).dtype is cutegrad.float32
    with cutegrad.amp.autocast("cpu"):
        assert (w @ w).dtype is cutegrad.bfloat16


# -- GPU ---------------------------------------------------------------------------------------------

def cuda_pair(rng, lib, dev):
    """A 64-64-10 MLP whose every parameter comes from rng (the same in both libraries), on dev, with AdamW."""
    m = lib.nn.Sequential(lib.nn.Linear(64, 64), lib.nn.GELU(), lib.nn.Linear(64, 10))
    with lib.no_grad():
        for p in m.parameters():
            p.copy_(lib.tensor(rng.standard_normal(tuple(p.shape)).astype(np.float32) * 0.1))
    m = m.to(dev)
    return m, lib.optim.AdamW(m.parameters(), lr=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU and driver")
def test_gpu_float16_skips_like_torch():
    """float16 autocast, overflow injected at steps 1 and 4: same scale sequence as torch on the GPU, and
    the skipped steps leave parameters and Adam state untouched (masked step, fused AdamW)."""
    seqs, finals = [], []
    for lib in (cutegrad, torch):
        lib.manual_seed(0)
        rng_l = np.random.default_rng(1)
        m, opt = cuda_pair(rng_l, lib, "cuda")
        s = lib.amp.GradScaler("cuda", init_scale=2.0 ** 14, growth_interval=2)
        scales = []
        for i in range(8):
            x = lib.tensor(rng_l.standard_normal((32, 64)).astype(np.float32)).to("cuda")
            y = lib.tensor(rng_l.integers(0, 10, 32)).to("cuda")
            opt.zero_grad()
            with lib.autocast("cuda", dtype=lib.float16):
                loss = lib.nn.functional.cross_entropy(m(x), y)
            if i in (1, 4):
                loss = loss * 1e30
            s.scale(loss).backward()
            s.step(opt)
            s.update()
            scales.append(s.get_scale())
        seqs.append(scales)
        finals.append([p.detach().float().cpu().numpy() for p in m.parameters()])
    assert seqs[0] == seqs[1]
    for a, b in zip(*finals):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU and driver")
def test_gpu_scaled_step_captures_and_skips_on_replay(rng):
    """A whole scaled step (scale, backward, step, update) in graphed(): replays with an overflowing input
    leave parameters unchanged and halve the scale; clean replays step."""
    import cutegrad.graphs as graphs
    m, opt = cuda_pair(rng, cutegrad, "cuda")
    s = cutegrad.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=1000)

    def step(x, y, mult):
        opt.zero_grad(set_to_none=False)
        with cutegrad.autocast("cuda", dtype=cutegrad.float16):
            loss = cutegrad.nn.functional.cross_entropy(m(x), y)
        s.scale(loss * mult).backward()
        s.step(opt)
        s.update()
        return loss

    x = cutegrad.randn(32, 64, device="cuda")
    y = cutegrad.randint(0, 10, (32,), device="cuda")
    one = cutegrad.ones((), device="cuda")
    g = graphs.graphed(step, (x, y, one), warmup=2)
    before = [p.detach().clone() for p in m.parameters()]
    scale0 = s.get_scale()
    g(x, y, cutegrad.full((), 1e30, device="cuda"))
    assert s.get_scale() == scale0 * 0.5
    for a, p in zip(before, m.parameters()):
        np.testing.assert_array_equal(a.cpu().numpy(), p.detach().cpu().numpy())
    g(x, y, one)
    assert any(not np.array_equal(a.cpu().numpy(), p.detach().cpu().numpy())
               for a, p in zip(before, m.parameters()))
