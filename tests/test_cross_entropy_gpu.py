"""cross_entropy's two paths: the fused row kernels (CUDA) and the composite (everything else).

CPU tests: the composite path is what the CPU backend runs, and it is right;
the fused path's frontend logic (class dim made last, reductions,
ignore_index, label smoothing, the backward's row weights, the create_graph
fallback, output dtypes) is exercised on the CPU by registering a NumPy
double of the row kernels for the CPU backend.

GPU tests (`-m gpu`): the fused path against the CPU backend in float64 on
the same (already rounded) logits and against torch on the same GPU, odd
shapes (rows 1, 3, 1000; classes 2, 33, 50257), ignore_index, label
smoothing, float32/bfloat16/float16 logits, outputs poisoned with NaN.
"""
import numpy as np
import pytest

import cutegrad
import cutegrad.nn.functional as F
from cutegrad import dtypes as dt
from cutegrad.device import CPU
from cutegrad.dispatch import kernel
from cutegrad.ops import nn as nn_ops

TOL = {dt.float32: 1e-4, dt.bfloat16: 1.6e-2, dt.float16: 2e-3, dt.float64: 1e-10}


def vals(t):
    return t.detach().cpu().to(dt.float64).numpy()


def ref_loss_rows(x, t, ignore_index, ls):
    """float64 NumPy: per-row loss of logits x (rows, C), NaN for an out-of-range target."""
    m = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    out = np.zeros(x.shape[0])
    for i, ti in enumerate(t):
        if ti == ignore_index:
            continue
        out[i] = np.nan if not 0 <= ti < x.shape[1] else lse[i] - (1 - ls) * x[i, ti] - ls * x[i].mean()
    return out, lse


# --- the composite path on the CPU ----------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ls", [0.0, 0.15])
def test_cpu_runs_the_composite_and_it_is_right(reduction, ls, rng):
    x0 = rng.uniform(-4, 4, size=(7, 5))
    t0 = rng.integers(0, 5, size=7)
    t0[2] = -100
    x = cutegrad.tensor(x0, dtype=dt.float64, requires_grad=True)
    loss = F.cross_entropy(x, cutegrad.tensor(t0), reduction=reduction, label_smoothing=ls)
    assert type(loss.grad_fn).__name__ != "CrossEntropyBackward"
    rows, _ = ref_loss_rows(x0, t0, -100, ls)
    ref = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / 6}[reduction]
    np.testing.assert_allclose(vals(loss), ref, rtol=1e-12, atol=1e-12)
    assert cutegrad.autograd.gradcheck(
        lambda x: F.cross_entropy(x, cutegrad.tensor(t0), reduction=reduction, label_smoothing=ls), (x,))


# --- the fused path's frontend, over a NumPy double of the row kernels --------------------------
class FakeRows:
    """The row kernels' contract (cross_entropy_rows / _backward in backends/cuda.py) in NumPy."""

    def __init__(self):
        self.calls = {"forward": 0, "backward": 0}

    def _out_dtype(self, logits):
        return dt.float64 if logits.dtype is dt.float64 else dt.float32  # float64 only for gradcheck

    def forward(self, logits, target, ignore_index=-100, label_smoothing=0.0):
        self.calls["forward"] += 1
        assert len(logits.shape) == 2 and tuple(target.shape) == (logits.shape[0],)
        loss, lse = ref_loss_rows(vals(logits), target.numpy(), ignore_index, label_smoothing)
        od = self._out_dtype(logits)
        return cutegrad.tensor(loss, dtype=od), cutegrad.tensor(lse, dtype=od)

    def backward(self, logits, target, lse, grad_rows, ignore_index=-100, label_smoothing=0.0):
        self.calls["backward"] += 1
        x, t, g = vals(logits), target.numpy(), vals(grad_rows)
        assert g.shape == (x.shape[0],)
        d = np.exp(x - vals(lse)[:, None]) - label_smoothing / x.shape[1]
        d[np.arange(len(t)), np.clip(t, 0, x.shape[1] - 1)] -= np.where(t == ignore_index, 0, 1 - label_smoothing)
        d *= np.where(t == ignore_index, 0.0, g)[:, None]
        return cutegrad.tensor(d, dtype=logits.dtype)


@pytest.fixture
def fake_rows():
    fake = FakeRows()
    fwd, bwd = kernel("cross_entropy_rows").impl, kernel("cross_entropy_rows_backward").impl
    saved = fwd[CPU], bwd[CPU]
    fwd[CPU], bwd[CPU] = fake.forward, fake.backward
    yield fake
    fwd[CPU], bwd[CPU] = saved


def _composite(x, t, **kw):
    """The composite's answer on the same values in float64 (a dtype the fused path does not take)."""
    xr = x.detach().to(dt.float64).requires_grad_(True)
    return F.cross_entropy(xr, t, **kw), xr


@pytest.mark.parametrize("shape", [(7, 5), (5,), (3, 6, 4), (2, 5, 3, 2), (1, 2)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_fused_frontend_matches_composite(fake_rows, shape, reduction, ls, rng):
    x = cutegrad.tensor(rng.uniform(-3, 3, size=shape), dtype=dt.float32, requires_grad=True)
    item_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    n_cls = shape[0] if len(shape) == 1 else shape[1]
    t0 = rng.integers(0, n_cls, size=item_shape)
    if t0.size > 2:
        t0.reshape(-1)[1] = 3  # ignore_index below
    t = cutegrad.tensor(t0)
    loss = F.cross_entropy(x, t, reduction=reduction, label_smoothing=ls, ignore_index=3)
    assert type(loss.grad_fn).__name__ == "CrossEntropyBackward" and fake_rows.calls["forward"] == 1
    assert loss.dtype is dt.float32 and tuple(loss.shape) == (item_shape if reduction == "none" else ())
    g0 = rng.uniform(-1, 1, size=loss.shape)
    (loss * cutegrad.tensor(g0, dtype=dt.float32)).sum().backward()
    assert fake_rows.calls["backward"] == 1
    ref, xr = _composite(x, t, reduction=reduction, label_smoothing=ls, ignore_index=3)
    assert type(ref.grad_fn).__name__ != "CrossEntropyBackward"
    (ref * cutegrad.tensor(g0, dtype=dt.float64)).sum().backward()
    np.testing.assert_allclose(vals(loss), vals(ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vals(x.grad), vals(xr.grad), rtol=1e-5, atol=1e-6)


def test_fused_frontend_gradcheck_and_create_graph(fake_rows, monkeypatch, rng):
    """First derivatives through the fused node, and second derivatives through its composite fallback."""
    monkeypatch.setattr(nn_ops, "_CE_FUSED_DTYPES", nn_ops._CE_FUSED_DTYPES + (dt.float64,))
    x = cutegrad.tensor(rng.uniform(-2, 2, size=(4, 3, 2)), dtype=dt.float64, requires_grad=True)
    t = cutegrad.tensor(np.array([[0, 2], [1, -100], [2, 2], [0, 1]]))
    for reduction in ("none", "mean"):
        fn = lambda x: F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)  # noqa: E731
        assert type(fn(x).grad_fn).__name__ == "CrossEntropyBackward"
        assert cutegrad.autograd.gradcheck(fn, (x,))
        assert cutegrad.autograd.gradgradcheck(fn, (x,))
    backward_calls = fake_rows.calls["backward"]
    loss = F.cross_entropy(x, t, label_smoothing=0.1)
    (g,) = cutegrad.autograd.grad([loss], [x], create_graph=True)
    assert fake_rows.calls["backward"] == backward_calls  # create_graph never reaches the kernel
    assert g.requires_grad


def test_fused_frontend_dtypes(fake_rows, rng):
    x = cutegrad.tensor(rng.uniform(-3, 3, size=(6, 9)), dtype=dt.bfloat16, requires_grad=True)
    t = cutegrad.tensor(rng.integers(0, 9, size=6))
    loss = F.cross_entropy(x, t)
    assert loss.dtype is dt.bfloat16  # torch: the logits' dtype
    loss.backward()
    assert x.grad.dtype is dt.bfloat16
    x.grad = None
    with cutegrad.autocast("cpu"):
        loss = F.cross_entropy(x, t)  # an fp32-list op: float32, without an upcast copy of the logits
    assert loss.dtype is dt.float32 and type(loss.grad_fn).__name__ == "CrossEntropyBackward"
    assert fake_rows.calls["forward"] == 2
    loss.backward()
    assert x.grad.dtype is dt.bfloat16
    rows, _ = ref_loss_rows(vals(x), t.numpy(), -100, 0.0)
    np.testing.assert_allclose(vals(loss), rows.mean(), rtol=1e-6)


def test_fused_frontend_edge_cases(fake_rows, rng):
    x = cutegrad.tensor(rng.uniform(-3, 3, size=(3, 4)), dtype=dt.float32, requires_grad=True)
    all_ignored = cutegrad.tensor([-100, -100, -100])
    assert np.isnan(vals(F.cross_entropy(x, all_ignored)))  # torch: 0 / 0
    assert vals(F.cross_entropy(x, all_ignored, reduction="sum")) == 0.0
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        F.cross_entropy(x, cutegrad.tensor([0, 4, 1]))
    empty = F.cross_entropy(cutegrad.zeros(0, 4, requires_grad=True), cutegrad.zeros(0, dtype=dt.int64),
                            reduction="sum")
    assert vals(empty) == 0.0


def test_other_cases_keep_the_composite(fake_rows, rng):
    x = cutegrad.tensor(rng.uniform(-3, 3, size=(4, 5)), dtype=dt.float32, requires_grad=True)
    t = cutegrad.tensor(rng.integers(0, 5, size=4))
    probs = cutegrad.softmax(cutegrad.randn(4, 5), 1)
    cases = [F.cross_entropy(x, t, weight=cutegrad.ones(5)), F.cross_entropy(x, probs),
             F.cross_entropy(x.to(dt.float64), t), F.nll_loss(cutegrad.log_softmax(x, 1), t)]
    assert fake_rows.calls["forward"] == 0
    assert all(type(c.grad_fn).__name__ != "CrossEntropyBackward" for c in cases)


# --- the fused path on a GPU ----------------------------------------------------------------------
def _gpu_skip_reason():
    try:
        import cutegrad.cuda as cuda
        if not cuda.is_available():
            return "needs a CUDA GPU and driver"
        from cutegrad import _C
        if not hasattr(_C, "cross_entropy"):
            return "cutegrad._C was built without the cross-entropy kernels"
    except Exception as exc:  # no driver library, or the extension is not built
        return f"needs a CUDA GPU and cutegrad._C: {type(exc).__name__}: {exc}"
    return None


_SKIP = _gpu_skip_reason()


@pytest.fixture
def poisoned_outputs():
    from cutegrad.backends import cuda as backend
    backend.set_poison_outputs(True)
    yield
    backend.set_poison_outputs(False)


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA for the reference")
    return torch


def _to_torch(torch, t, dtype=None, requires_grad=False):
    arr = vals(t) if t.dtype.is_floating_point else t.numpy()
    out = torch.tensor(arr, device="cuda")
    if dtype is not None:
        out = out.to(getattr(torch, dtype.name))
    return out.requires_grad_(requires_grad)


def _check(got, ref, dtype, scale):
    g, r = vals(got), vals(ref)
    assert g.shape == r.shape
    np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
    ok = ~np.isnan(r)
    np.testing.assert_allclose(g[ok], r[ok], rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("rows", [1, 3, 1000])
@pytest.mark.parametrize("classes", [2, 33, 50257])
def test_fused_against_float64_and_torch(dtype, rows, classes):
    torch = _torch_cuda()
    TF = torch.nn.functional
    rng = np.random.default_rng(rows * 100003 + classes)
    x_cpu = cutegrad.tensor(rng.uniform(-8, 8, size=(rows, classes)), dtype=dtype)  # rounded to dtype
    t0 = rng.integers(0, classes, size=rows)
    if rows > 2:
        t0[1] = -100
        t0[-1] = 0
    t_cpu, t_dev, t_torch = cutegrad.tensor(t0), cutegrad.tensor(t0, device="cuda"), torch.tensor(t0, device="cuda")
    x_dev = x_cpu.to("cuda")
    x64_torch = _to_torch(torch, x_cpu, dt.float64)
    small = rows * classes <= 200_000
    for reduction, ls in (("none", 0.0), ("none", 0.1), ("sum", 0.1), ("mean", 0.0), ("mean", 0.1)):
        kw = dict(reduction=reduction, label_smoothing=ls)
        x = x_dev.detach().requires_grad_(True)
        loss = F.cross_entropy(x, t_dev, **kw)
        assert type(loss.grad_fn).__name__ == "CrossEntropyBackward"
        assert loss.dtype is dtype and loss.device.type == "cuda"
        # the upstream gradient as the GPU sees it (rounded to dtype), so the references use the same one
        g0 = vals(cutegrad.tensor(rng.uniform(-1, 1, size=loss.shape), dtype=dtype))
        (loss * cutegrad.tensor(g0, dtype=dtype, device="cuda")).sum().backward()
        assert x.grad.dtype is dtype
        lscale = 1.0 if reduction == "none" else float(rows)
        gscale = float(np.abs(g0).max()) / (max(1, int((t0 != -100).sum())) if reduction == "mean" else 1)
        # float64 references on the same rounded logits: torch on the GPU always, the CPU backend where small
        tx = x64_torch.detach().requires_grad_(True)
        tref = TF.cross_entropy(tx, t_torch, **kw)
        (tref * torch.tensor(g0, device="cuda")).sum().backward()
        _check(loss, cutegrad.tensor(tref.detach().cpu().numpy()), dtype, lscale)
        _check(x.grad, cutegrad.tensor(tx.grad.cpu().numpy()), dtype, gscale)
        if small:
            xr = x_cpu.to(dt.float64).requires_grad_(True)
            ref = F.cross_entropy(xr, t_cpu, **kw)
            (ref * cutegrad.tensor(g0, dtype=dt.float64)).sum().backward()
            _check(loss, ref, dtype, lscale)
            _check(x.grad, xr.grad, dtype, gscale)
        # torch in the same dtype rounds its log-probabilities to 16 bits: a looser bound
        ts = _to_torch(torch, x_cpu, dtype, requires_grad=True)
        tsame = TF.cross_entropy(ts, t_torch, **kw)
        if not bool(torch.isfinite(tsame).all()):
            # torch's label smoothing sums log-probabilities (over a row's
            # classes, then over rows) in the logits' dtype: float16 overflows
            assert dtype is dt.float16 and ls
            continue
        (tsame * torch.tensor(g0, device="cuda", dtype=ts.dtype)).sum().backward()
        loose = 4 * TOL[dtype] if dtype is not dt.float32 else TOL[dtype]
        np.testing.assert_allclose(vals(loss), tsame.detach().double().cpu().numpy(), rtol=loose,
                                   atol=loose * lscale)
        np.testing.assert_allclose(vals(x.grad), ts.grad.double().cpu().numpy(), rtol=loose,
                                   atol=loose * gscale)


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16], ids=lambda d: d.name)
def test_fused_nd_input_and_custom_ignore_index(dtype):
    rng = np.random.default_rng(5)
    x_cpu = cutegrad.tensor(rng.uniform(-4, 4, size=(3, 33, 5)), dtype=dtype)
    t0 = rng.integers(0, 33, size=(3, 5))
    t0[0, :2] = 7
    t_cpu = cutegrad.tensor(t0)
    for reduction in ("none", "mean"):
        x = x_cpu.to("cuda").detach().requires_grad_(True)
        loss = F.cross_entropy(x, t_cpu.to("cuda"), ignore_index=7, reduction=reduction, label_smoothing=0.05)
        assert type(loss.grad_fn).__name__ == "CrossEntropyBackward"
        loss.sum().backward()
        xr = x_cpu.to(dt.float64).requires_grad_(True)
        ref = F.cross_entropy(xr, t_cpu, ignore_index=7, reduction=reduction, label_smoothing=0.05)
        ref.sum().backward()
        _check(loss, ref, dtype, 1.0)
        _check(x.grad, xr.grad, dtype, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_fused_create_graph_on_gpu_matches_cpu():
    rng = np.random.default_rng(6)
    x0 = rng.uniform(-2, 2, size=(5, 7))
    t0 = np.array([0, 6, -100, 3, 3])
    v0 = rng.uniform(-1, 1, size=(5, 7))
    out = {}
    for device, dtype in (("cuda", dt.float32), ("cpu", dt.float64)):
        x = cutegrad.tensor(x0, dtype=dtype, device=device, requires_grad=True)
        loss = F.cross_entropy(x, cutegrad.tensor(t0, device=device), label_smoothing=0.1)
        (g,) = cutegrad.autograd.grad([loss], [x], create_graph=True)
        (g * cutegrad.tensor(v0, dtype=dtype, device=device)).sum().backward()
        out[device] = (vals(g), vals(x.grad))
    for got, ref in zip(out["cuda"], out["cpu"]):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_fused_out_of_range_target_raises_at_the_next_sync():
    x = cutegrad.randn(3, 4).to("cuda")
    loss = F.cross_entropy(x, cutegrad.tensor([0, 9, 1], device="cuda"), reduction="none")  # no sync here
    with pytest.raises(IndexError, match=r"index 9 is out of bounds for dimension 1 with size 4 \(cross_entropy"):
        cutegrad.cuda.synchronize()
    got = vals(loss)  # the record was cleared: the process and the loss stay usable
    assert np.isnan(got[1]) and np.isfinite(got[[0, 2]]).all()
    ok = F.cross_entropy(x, cutegrad.tensor([0, 3, 1], device="cuda"))
    assert np.isfinite(vals(ok))


@pytest.mark.gpu
@pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
def test_fused_under_autocast_matches_torch():
    torch = _torch_cuda()
    rng = np.random.default_rng(9)
    x_cpu = cutegrad.tensor(rng.uniform(-5, 5, size=(64, 1000)), dtype=dt.bfloat16)
    t0 = rng.integers(0, 1000, size=64)
    t0[5] = -100
    x = x_cpu.to("cuda").requires_grad_(True)
    with cutegrad.autocast("cuda", dtype=dt.bfloat16):
        loss = F.cross_entropy(x, cutegrad.tensor(t0, device="cuda"), label_smoothing=0.1)
    assert loss.dtype is dt.float32 and type(loss.grad_fn).__name__ == "CrossEntropyBackward"
    loss.backward()
    tx = _to_torch(torch, x_cpu, dt.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tloss = torch.nn.functional.cross_entropy(tx, torch.tensor(t0, device="cuda"), label_smoothing=0.1)
    assert tloss.dtype == torch.float32
    tloss.backward()
    rows, _ = ref_loss_rows(vals(x_cpu), t0, -100, 0.1)
    ref = rows.sum() / 63  # float64 from the same bf16 logits: the arbiter for both frameworks
    np.testing.assert_allclose(vals(loss), ref, rtol=2e-5)
    np.testing.assert_allclose(tloss.item(), ref, rtol=1e-3)
    assert x.grad.dtype is dt.bfloat16 and tx.grad.dtype == torch.bfloat16
    np.testing.assert_allclose(vals(x.grad), tx.grad.double().cpu().numpy(), rtol=1e-2, atol=1e-2 / 63)
