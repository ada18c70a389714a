"""ops.add_layer_norm / add_rms_norm on a GPU (`-m gpu`): the CuTeDSL kernels
(kernels/cute/norms.py) for every specialized dtype combination and several row
lengths, and the CUDA C++ fallback (row lengths and dtypes without a
specialization), against the NumPy model of the kernels' exact algorithm
(kernels/reference/norms.py) and the float64 CPU reference, outputs poisoned
with NaN, rows not a multiple of a CTA's row slots; capture and replay in a
CUDA graph; and the kernel that ran is the one expected.  The backward's column
sum of dx (a Linear's bias gradient when x is its output) against the model and
the float64 sum of the dx tensor returned, and end to end through a Linear."""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad import dtypes as dt

from norms_loading import load_norms_module

model = load_norms_module("reference")
family = load_norms_module("cute")
_NAME = {dt.bfloat16: "bf16", dt.float32: "fp32"}


def _skip_reason():
    try:
        import cutegrad.cuda as cuda
        if not cuda.is_available():
            return "needs a CUDA GPU and driver"
        from cutegrad import _C
        if not hasattr(_C, "cute_norm"):
            return "cutegrad._C was built without the CuTeDSL norms"
    except Exception as exc:  # no driver library, or the extension is not built
        return f"needs a CUDA GPU and cutegrad._C: {type(exc).__name__}: {exc}"
    return None


_SKIP = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    from cutegrad.backends import cuda as backend
    backend.set_poison_outputs(True)
    yield
    backend.set_poison_outputs(False)


def _host(t):
    return t.detach().cpu().to(dt.float64).numpy()


def _rand(rng, shape, dtype, scale=1.0, shift=0.0):
    return cg.tensor(rng.normal(shift, scale, size=shape), dtype=dtype)


FWD = [(x, r, o) for x, r, o in family.FWD_COMBOS]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", [128, 384, 768, 2048])
@pytest.mark.parametrize("rows", [1, 7, 1001])
@pytest.mark.parametrize("combo", FWD, ids=lambda c: "-".join(d or "none" for d in c))
def test_forward_and_backward_match_the_model(kind, n, rows, combo):
    rng = np.random.default_rng(rows * 31 + n)
    names = {"bf16": dt.bfloat16, "fp32": dt.float32}
    x_dt, res_dt, out_dt = (names.get(c) for c in combo)
    x = _rand(rng, (rows, n), x_dt, 2.0, 0.5).cuda().requires_grad_()
    res = _rand(rng, (rows, n), res_dt).cuda().requires_grad_() if res_dt else None
    w = _rand(rng, (n,), dt.float32, 0.2, 1.0).cuda().requires_grad_()
    b = _rand(rng, (n,), dt.float32, 0.2).cuda().requires_grad_() if kind == "layer" else None
    fn = cg.add_layer_norm if kind == "layer" else cg.add_rms_norm
    y, s = fn(x, res, w, b, 1e-5, out_dtype=out_dt) if kind == "layer" else fn(x, res, w, 1e-5, out_dtype=out_dt)
    assert y.dtype is out_dt
    my, ms, mmean, mrstd = model.forward(_host(x), _host(res) if res is not None else None, _host(w),
                                         _host(b) if b is not None else None, 1e-5, kind, combo)
    tol = 1e-2 if out_dt is dt.bfloat16 else 1e-5
    np.testing.assert_allclose(_host(y), my, rtol=tol, atol=tol)
    np.testing.assert_allclose(_host(s), ms, rtol=1e-6, atol=1e-6)
    s_dt = res_dt or x_dt
    dy = _rand(rng, (rows, n), out_dt).cuda()
    dres = _rand(rng, (rows, n), s_dt).cuda()
    cg.autograd.backward([y, s], [dy, dres])
    second = _NAME[x_dt] if res_dt and x_dt is not res_dt else ""
    tiling = (_NAME[s_dt], _NAME[out_dt], second)
    ctas = max(1, min(2 * 132, -(-rows // family.row_tiling(n, tiling)[3])))  # as the CUDA backend picks
    ds, dw, db, _ = model.backward(_host(dy), _host(s), _host(dres), _host(w), mmean, mrstd, kind, tiling, ctas)
    gtol = 2e-2 if dt.bfloat16 in (x_dt, s_dt) else 1e-4
    np.testing.assert_allclose(_host(x.grad), ds, rtol=gtol, atol=gtol)
    if res is not None:
        assert res.grad.dtype is res_dt
        np.testing.assert_allclose(_host(res.grad), ds, rtol=gtol, atol=gtol)
    np.testing.assert_allclose(_host(w.grad), dw, rtol=1e-4, atol=1e-4 * np.sqrt(rows))
    if b is not None:
        np.testing.assert_allclose(_host(b.grad), db, rtol=1e-4, atol=1e-4 * np.sqrt(rows))


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n,dtype", [(100, dt.float32), (768, dt.float16), (1536, dt.bfloat16)])
def test_fallback_shapes_and_dtypes_match_the_cpu(kind, n, dtype):
    rng = np.random.default_rng(n)
    xs = [_rand(rng, (9, n), dtype, 1.5) for _ in range(2)]
    w = _rand(rng, (n,), dt.float32, 0.2, 1.0)
    b = _rand(rng, (n,), dt.float32, 0.2)
    outs = []
    for dev in ("cpu", "cuda"):
        x, res = (v.to(dev).requires_grad_() for v in xs)
        wd, bd = w.to(dev).requires_grad_(), b.to(dev).requires_grad_()
        if kind == "layer":
            y, s = cg.add_layer_norm(x, res, wd, bd)
        else:
            y, s = cg.add_rms_norm(x, res, wd)
        (y.float().square().sum() + s.float().sum()).backward()
        outs.append([_host(v) for v in (y, s, x.grad, res.grad, wd.grad)])
    tol = 2e-2 if dtype is not dt.float32 else 1e-4
    for got, want in zip(outs[1], outs[0]):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_specialized_call_runs_the_cute_kernel():
    from cutegrad import _C
    names = {d["name"] for d in _C.cute_norm_specializations()}
    assert family.NormSpec("fwd", "layer", 768, "bf16", "fp32", "bf16").name in names
    x = cg.randn(64, 768, dtype=dt.bfloat16, device="cuda")
    res = cg.randn(64, 768, device="cuda")
    w, b = cg.ones(768, device="cuda"), cg.zeros(768, device="cuda")
    y, s = cg.add_layer_norm(x, res, w, b, out_dtype=dt.bfloat16)
    ref = cg.layer_norm(x.float() + res, (768,), w, b)
    np.testing.assert_allclose(_host(y), _host(ref), rtol=1e-2, atol=1e-2)


def test_capture_and_replay():
    from cutegrad.graphs import CUDAGraph, graph
    from cutegrad import _C
    _C.load_kernels()
    x = cg.randn(256, 256, dtype=dt.bfloat16, device="cuda")
    res = cg.randn(256, 256, device="cuda")
    w, b = cg.randn(256, device="cuda"), cg.randn(256, device="cuda")
    cg.add_layer_norm(x, res, w, b, out_dtype=dt.bfloat16)  # warm up
    g = CUDAGraph()
    with graph(g):
        y, s = cg.add_layer_norm(x, res, w, b, out_dtype=dt.bfloat16)
    x.copy_(cg.randn(256, 256, dtype=dt.bfloat16, device="cuda"))
    g.replay()
    cg.cuda.synchronize()
    ref = cg.layer_norm(x.float() + res, (256,), w, b)
    np.testing.assert_allclose(_host(y), _host(ref), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(_host(s), _host(x.float() + res), rtol=1e-6)


def _backend(name):
    from cutegrad.device import CUDA
    from cutegrad.dispatch import kernel
    return kernel(name).impl[CUDA]


BWD = [(s, dy, dx2) for s, dy, dx2 in family.BWD_COMBOS]


def _stat(t, rows):
    """A saved float32 statistic as the model takes it (RMSNorm saves no mean: zeros)."""
    return np.zeros(rows, np.float32) if t is None else _host(t).ravel().astype(np.float32)


def _bwd_inputs(rng, kind, n, rows, combo, with_dres):
    """(dy, dres, s, w, mean, rstd, x dtype, residual dtype) for the backend's add_norm_backward, the
    statistics from the CuTeDSL forward (the combo's s, dy and second-output dtypes)."""
    names = {"bf16": dt.bfloat16, "fp32": dt.float32}
    s_dt, dy_dt = names[combo[0]], names[combo[1]]
    x_dt = names[combo[2]] if combo[2] else s_dt
    res_dt = s_dt if combo[2] else None
    x = _rand(rng, (rows, n), x_dt, 2.0, 0.5).cuda()
    res = _rand(rng, (rows, n), s_dt).cuda() if res_dt else None
    w = _rand(rng, (n,), dt.float32, 0.2, 1.0).cuda()
    b = _rand(rng, (n,), dt.float32, 0.2).cuda()
    _, s, mean, rstd = _backend("add_norm")(x, res, w, b if kind == "layer" else None, 1e-5, kind == "rms", dy_dt)
    assert s.dtype is s_dt
    dy = _rand(rng, (rows, n), dy_dt).cuda()
    dres = _rand(rng, (rows, n), s_dt).cuda() if with_dres else None
    return dy, dres, s, w, mean, rstd, x_dt, res_dt


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n", [128, 768, 1024, 2048])
@pytest.mark.parametrize("rows", [1, 7, 1001])
@pytest.mark.parametrize("combo", BWD, ids=lambda c: "-".join(d or "none" for d in c))
@pytest.mark.parametrize("with_dres", [False, True])
def test_backward_dx_column_sum_matches_the_model_and_float64(kind, n, rows, combo, with_dres):
    rng = np.random.default_rng(rows * 17 + n)
    dy, dres, s, w, mean, rstd, x_dt, res_dt = _bwd_inputs(rng, kind, n, rows, combo, with_dres)
    dx, dr, dw, db, dx_sum = _backend("add_norm_backward")(dy, dres, s, w, mean, rstd, kind == "rms", x_dt, res_dt,
                                                           True, kind == "layer")
    assert dx_sum is not None, "the CuTeDSL backward did not take the call"
    assert dx_sum.dtype is dt.float32 and dx_sum.shape == (n,) and dx.dtype is x_dt
    got = _host(dx_sum)
    # the column sum of the dx tensor x receives, in float64
    np.testing.assert_allclose(got, _host(dx).sum(0), rtol=1e-5, atol=1e-5 * np.sqrt(rows) * np.abs(_host(dx)).max())
    ctas = max(1, min(2 * 132, -(-rows // family.row_tiling(n, combo)[3])))
    mds, _, _, mdx_sum = model.backward(_host(dy), _host(s), _host(dres) if dres is not None else None, _host(w),
                                        _stat(mean, rows), _stat(rstd, rows), kind, combo, ctas)
    # the model's sum in the kernel's order: equal up to rsqrt's last bits and the roundings they flip
    ulp = 2.0 ** -7 if x_dt is dt.bfloat16 else 2.0 ** -20
    np.testing.assert_allclose(got, mdx_sum, rtol=1e-5, atol=ulp * np.sqrt(rows) * np.abs(mds).max())


def test_linear_bias_gradient_equals_the_column_sum_path_and_float64(monkeypatch):
    """bf16 autocast: a Linear into add_layer_norm; its bias gradient from the norm's finish kernel
    equals the one the column_sum kernel computes when no sum is recorded, and the float64 CPU one."""
    import cutegrad.nn.functional as F
    from cutegrad.ops import grad_column_sums
    rng = np.random.default_rng(8)
    h = _rand(rng, (3, 333, 256), dt.float32).cuda().requires_grad_()
    res = _rand(rng, (3, 333, 768), dt.float32).cuda().requires_grad_()
    lw = _rand(rng, (768, 256), dt.float32, 0.05).cuda().requires_grad_()
    lb = _rand(rng, (768,), dt.float32, 0.1).cuda().requires_grad_()
    nw = _rand(rng, (768,), dt.float32, 0.2, 1.0).cuda().requires_grad_()
    nb = _rand(rng, (768,), dt.float32, 0.2).cuda().requires_grad_()
    dy = _rand(rng, (3, 333, 768), dt.bfloat16).cuda()

    def run():
        lb.grad = None
        with cg.autocast("cuda", dtype=dt.bfloat16):
            x = F.linear(h, lw, lb)
            y, s = cg.add_layer_norm(x, res, nw, nb)
        cg.autograd.backward([y], [dy])
        return _host(lb.grad)

    taken = []
    take = grad_column_sums.take
    monkeypatch.setattr(grad_column_sums, "take", lambda g: taken.append(take(g)) or taken[-1])
    fused = run()
    assert taken and taken[-1] is not None, "the Linear did not take the norm's column sum"
    monkeypatch.setattr(grad_column_sums, "take", lambda g: None)
    unfused = run()
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=1e-3)
    # float64 on the CPU from the same (rounded) inputs: the bias gradient is the sum of the bf16 dx
    hc, lwc = (cg.tensor(_host(v).astype(np.float32)).to(dt.bfloat16).to(dt.float64) for v in (h, lw))
    x64 = F.linear(hc, lwc, cg.tensor(_host(lb)).to(dt.bfloat16).to(dt.float64)).requires_grad_()
    y64, _ = cg.add_layer_norm(x64, cg.tensor(_host(res)), cg.tensor(_host(nw)), cg.tensor(_host(nb)))
    cg.autograd.backward([y64], [cg.tensor(_host(dy))])
    want = _host(x64.grad).reshape(-1, 768).sum(0)
    np.testing.assert_allclose(fused, want, rtol=2e-2, atol=2e-2 * np.sqrt(999))


def test_capture_and_replay_of_the_backward_with_its_column_sum():
    from cutegrad.graphs import CUDAGraph, graph
    from cutegrad import _C
    _C.load_kernels()
    rng = np.random.default_rng(9)
    dy, dres, s, w, mean, rstd, x_dt, res_dt = _bwd_inputs(rng, "layer", 768, 515, ("fp32", "bf16", "bf16"), True)
    bwd = _backend("add_norm_backward")
    bwd(dy, dres, s, w, mean, rstd, False, x_dt, res_dt, True, True)  # warm up
    g = CUDAGraph()
    with graph(g):
        dx, _, _, _, dx_sum = bwd(dy, dres, s, w, mean, rstd, False, x_dt, res_dt, True, True)
    for trial in range(2):
        dy.copy_(_rand(rng, (515, 768), dt.bfloat16).cuda())
        g.replay()
        cg.cuda.synchronize()
        host_dx = _host(dx)
        np.testing.assert_allclose(_host(dx_sum), host_dx.sum(0), rtol=1e-5,
                                   atol=1e-5 * np.sqrt(515) * np.abs(host_dx).max(), err_msg=f"replay {trial}")
