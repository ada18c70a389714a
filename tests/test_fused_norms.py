"""ops.add_layer_norm / ops.add_rms_norm and nn.AddLayerNorm / nn.AddRMSNorm on the
CPU (the float64 reference): values and gradients equal the unfused ops', gradchecks
(first and second order), autocast's output dtype, partial use of the two outputs,
errors for bad input, and the bias gradient of a Linear feeding the add+norm taken
from the norm backward (ops/grad_column_sums.py) only where it is exactly that sum."""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad.autograd import gradcheck, gradgradcheck

R = np.random.default_rng(11)


def t(*shape, dtype=cg.float64, scale=1.0, shift=0.0):
    return cg.tensor(R.normal(shift, scale, size=shape), dtype=dtype, requires_grad=True)


def _unfused(x, res, w, b, eps, rms):
    s = x + res if res is not None else x
    n = x.shape[-1]
    y = cg.rms_norm(s, (n,), w, eps) if rms else cg.layer_norm(s, (n,), w, b, eps)
    return y, s


def _fused(x, res, w, b, eps, rms):
    return cg.add_rms_norm(x, res, w, eps) if rms else cg.add_layer_norm(x, res, w, b, eps)


CASES = [(rms, shape, with_res, with_w, with_b)
         for rms in (False, True) for shape in ((5, 7), (2, 3, 13), (1, 1))
         for with_res in (True, False) for with_w in (True, False) for with_b in (True, False)
         if not (rms and with_b) and not (with_b and not with_w)]


@pytest.mark.parametrize("rms,shape,with_res,with_w,with_b", CASES)
def test_values_and_gradients_equal_the_unfused_ops(rms, shape, with_res, with_w, with_b):
    n = shape[-1]
    x = t(*shape, scale=2.0, shift=0.5)
    res = t(*shape) if with_res else None
    w = t(n, shift=1.0) if with_w else None
    b = t(n) if with_b else None
    inputs = [v for v in (x, res, w, b) if v is not None]
    dy, ds = R.normal(size=shape), R.normal(size=shape)
    results = []
    for fn in (_fused, _unfused):
        for v in inputs:
            v.grad = None
        y, s = fn(x, res, w, b, 1e-5, rms)
        (y * cg.tensor(dy)).sum().add((s * cg.tensor(ds)).sum()).backward()
        results.append([y.detach().numpy(), s.detach().numpy()] + [v.grad.numpy() for v in inputs])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("with_res", [True, False])
def test_gradcheck_and_gradgradcheck(rms, with_res):
    x, w, b = t(3, 6, scale=1.5), t(6, shift=1.0), t(6)
    res = t(3, 6)

    def fn(x, res, w, b):
        y, s = _fused(x, res if with_res else None, w, None if rms else b, 1e-5, rms)
        return y * 1.3 + s * s

    assert gradcheck(fn, (x, res, w, b))
    assert gradgradcheck(fn, (x, res, w, b))


@pytest.mark.parametrize("rms", [False, True])
def test_only_one_output_used(rms):
    x, res, w, b = t(4, 5), t(4, 5), t(5, shift=1.0), t(5)
    bias = None if rms else b
    y, s = _fused(x, res, w, bias, 1e-5, rms)
    s.sum().backward()  # the norm is unused: both inputs get the residual's gradient, the weights none
    np.testing.assert_array_equal(x.grad.numpy(), np.ones((4, 5)))
    np.testing.assert_array_equal(res.grad.numpy(), np.ones((4, 5)))
    assert w.grad is None
    x.grad = res.grad = None
    y, s = _fused(x, res, w, bias, 1e-5, rms)
    (y * y).sum().backward()
    ry, _ = _unfused(x.detach().requires_grad_(), res.detach(), w.detach(), None if rms else b.detach(), 1e-5, rms)
    np.testing.assert_allclose(y.detach().numpy(), ry.detach().numpy(), rtol=1e-12)
    assert x.grad is not None and w.grad is not None


def test_new_residual_without_residual_is_x_and_carries_its_gradient():
    x, w = t(2, 4), t(4, shift=1.0)
    y, s = cg.add_layer_norm(x, None, w)
    np.testing.assert_array_equal(s.detach().numpy(), x.detach().numpy())
    assert s is not x and s.grad_fn is not None
    (s * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.full((2, 4), 3.0))


def test_autocast_writes_the_normed_output_in_the_autocast_dtype():
    x = t(6, 8, dtype=cg.bfloat16)
    res, w, b = t(6, 8, dtype=cg.float32), t(8, dtype=cg.float32, shift=1.0), t(8, dtype=cg.float32)
    with cg.autocast("cpu", dtype=cg.bfloat16):
        y, s = cg.add_layer_norm(x, res, w, b)
        ry = cg.layer_norm(x + res, (8,), w, b)  # float32 (an fp32 op), cast by the next linear
        yr, _ = cg.add_rms_norm(x, res, w)
    assert y.dtype is cg.bfloat16 and s.dtype is cg.float32 and ry.dtype is cg.float32 and yr.dtype is cg.bfloat16
    np.testing.assert_array_equal(y.float().detach().numpy(), ry.to(cg.bfloat16).float().detach().numpy())
    y.float().sum().backward()
    assert x.grad.dtype is cg.bfloat16 and res.grad.dtype is cg.float32 and w.grad.dtype is cg.float32
    y2, _ = cg.add_layer_norm(x, res, w, b, out_dtype=cg.float32)
    assert y2.dtype is cg.float32


def test_modules_share_parameter_names_with_the_plain_norms():
    ln, fused = cg.nn.LayerNorm(6), cg.nn.AddLayerNorm(6)
    assert list(ln.state_dict()) == list(fused.state_dict())
    assert list(cg.nn.RMSNorm(6).state_dict()) == list(cg.nn.AddRMSNorm(6).state_dict())
    x, res = t(2, 6), t(2, 6)
    y, s = fused(x, res)
    np.testing.assert_allclose(y.detach().numpy(), ln(x + res).detach().numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="last dimension only"):
        cg.nn.AddLayerNorm((2, 3))


def test_bad_input_is_named():
    x, w = t(3, 4), t(4)
    with pytest.raises(RuntimeError, match="residual of shape"):
        cg.add_layer_norm(x, t(3, 5), w)
    with pytest.raises(RuntimeError, match="weight of shape"):
        cg.add_rms_norm(x, None, t(5))
    with pytest.raises(RuntimeError, match="floating point"):
        cg.add_layer_norm(cg.tensor([[1, 2]]), None)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    x, res, w, b = t(4, 10), t(4, 10), t(10, shift=1.0), t(10)
    y, s = cg.add_layer_norm(x, res, w, b)
    tx, tr, tw, tb = (torch.tensor(v.detach().numpy().copy(), requires_grad=True) for v in (x, res, w, b))
    ts = tx + tr
    ty = torch.nn.functional.layer_norm(ts, (10,), tw, tb)
    np.testing.assert_allclose(y.detach().numpy(), ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    (y.sum() + (s * s).sum()).backward()
    (ty.sum() + (ts * ts).sum()).backward()
    for mine, ref in ((x, tx), (res, tr), (w, tw), (b, tb)):
        np.testing.assert_allclose(mine.grad.numpy(), ref.grad.numpy(), rtol=1e-10, atol=1e-10)


# ---- a Linear feeding the add+norm takes its bias gradient from the norm backward ----------------

def _branch(kind, h, params):
    """The branch whose output x feeds the add+norm: one Linear, or the fused MLP (fc2's bias)."""
    import cutegrad.nn.functional as F
    if kind == "linear":
        return F.linear(h, params[0], params[1])
    return F.mlp_gelu(h, *params)


def _branch_params(kind, n, width):
    if kind == "linear":
        return [t(n, width, scale=0.3), t(n)]
    return [t(2 * width, width, scale=0.3), t(2 * width), t(n, 2 * width, scale=0.3), t(n)]


@pytest.fixture
def recorded(monkeypatch):
    """The column sums the add+norm backward recorded and the Linear backward took."""
    from cutegrad.ops import grad_column_sums
    log = {"recorded": 0, "taken": 0}
    record, take = grad_column_sums.record, grad_column_sums.take

    def counting_record(grad, column_sum):
        log["recorded"] += 1
        record(grad, column_sum)

    def counting_take(grad):
        out = take(grad)
        log["taken"] += out is not None
        return out

    monkeypatch.setattr(grad_column_sums, "record", counting_record)
    monkeypatch.setattr(grad_column_sums, "take", counting_take)
    return log


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 9)])
def test_linear_bias_gradient_from_the_norm_backward_equals_the_unfused_ops(kind, rms, shape, recorded):
    n = shape[-1]
    h, res = t(*shape[:-1], 6), t(*shape)
    params = _branch_params(kind, n, 6)
    w, b = t(n, shift=1.0), (None if rms else t(n))
    leaves = [h, res, w] + ([b] if b is not None else []) + params
    dy, ds = R.normal(size=shape), R.normal(size=shape)
    results = []
    for fn in (_fused, _unfused):
        for v in leaves:
            v.grad = None
        y, s = fn(_branch(kind, h, params), res, w, b, 1e-5, rms)
        (y * cg.tensor(dy)).sum().add((s * cg.tensor(ds)).sum()).backward()
        results.append([v.grad.numpy() for v in leaves])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert recorded == {"recorded": 1, "taken": 1}


def test_gradient_summed_with_another_use_is_reduced_again(recorded):
    import cutegrad.nn.functional as F
    h, res, w, b = t(4, 6), t(4, 5), t(5, shift=1.0), t(5)
    lw, lb = t(5, 6, scale=0.3), t(5)
    x = F.linear(h, lw, lb)
    y, s = cg.add_layer_norm(x, res, w, b)
    (y.sum() + (x * 3.0).sum()).backward()  # x's gradient: the norm's dx plus 3
    got = lb.grad.numpy().copy()
    lb.grad = None
    x = F.linear(h, lw, lb)
    y, s = _unfused(x, res, w, b, 1e-5, False)
    (y.sum() + (x * 3.0).sum()).backward()
    np.testing.assert_allclose(got, lb.grad.numpy(), rtol=1e-12, atol=1e-12)
    assert recorded["recorded"] == 1 and recorded["taken"] == 0


def _double_in_place(g):
    g.mul_(2.0)


@pytest.mark.parametrize("in_place", [True, False])
def test_a_hook_that_changes_the_gradient_is_seen_by_the_bias_gradient(in_place, recorded):
    import cutegrad.nn.functional as F
    h, res, w, b = t(3, 4), t(3, 5), t(5, shift=1.0), t(5)
    lw, lb = t(5, 4, scale=0.3), t(5)
    grads = []
    for doubled in (True, False):
        lb.grad = None
        x = F.linear(h, lw, lb)
        if doubled:
            x.register_hook(_double_in_place if in_place else (lambda g: g * 2.0))
        y, s = cg.add_layer_norm(x, res, w, b)
        (y * y).sum().backward()
        grads.append(lb.grad.numpy().copy())
    np.testing.assert_allclose(grads[0], 2.0 * grads[1], rtol=1e-12, atol=1e-12)
    assert recorded["recorded"] == 2 and recorded["taken"] == 1  # only the unhooked run takes its sum


def test_bias_gradient_accumulates_over_backward_calls():
    import cutegrad.nn.functional as F
    h, res, w, b = t(3, 4), t(3, 5), t(5, shift=1.0), t(5)
    lw, lb = t(5, 4, scale=0.3), t(5)
    for _ in range(2):
        y, s = cg.add_layer_norm(F.linear(h, lw, lb), res, w, b)
        (y * y).sum().backward()
    twice = lb.grad.numpy().copy()
    lb.grad = None
    y, s = cg.add_layer_norm(F.linear(h, lw, lb), res, w, b)
    (y * y).sum().backward()
    np.testing.assert_allclose(twice, 2.0 * lb.grad.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("rms", [False, True])
def test_linear_into_add_norm_gradcheck(kind, rms):
    h, res, w, b = t(3, 4), t(3, 5), t(5, shift=1.0), t(5)
    params = _branch_params(kind, 5, 4)

    def fn(h, res, w, b, *params):
        y, s = _fused(_branch(kind, h, params), res, w, None if rms else b, 1e-5, rms)
        return y * 1.3 + s * s

    assert gradcheck(fn, (h, res, w, b, *params))
    assert gradgradcheck(fn, (h, res, w, b, *params))


def test_no_column_sum_is_recorded_where_no_linear_takes_it(recorded):
    import cutegrad.nn.functional as F
    h, res, w = t(3, 4), t(3, 5), t(5, shift=1.0)
    lw = t(5, 4, scale=0.3)
    y, _ = cg.add_layer_norm(F.linear(h, lw, None), res, w)  # no bias
    y.sum().backward()
    y, _ = cg.add_layer_norm(F.linear_gelu(h, lw, t(5)), res, w)  # its bias gradient needs the GELU backward
    y.sum().backward()
    y, _ = cg.add_layer_norm(h * 2.0, None, t(4))
    y.sum().backward()
    assert recorded["recorded"] == 0


def test_recorded_sum_belongs_to_its_tensor_only():
    from cutegrad.ops import grad_column_sums
    g, other, total = (v.detach() for v in (t(2, 3), t(2, 3), t(3)))
    grad_column_sums.record(g, total)
    assert grad_column_sums.take(other) is None
    assert grad_column_sums.take(g) is total
    assert grad_column_sums.take(g) is None  # taken once
    grad_column_sums.record(g, total)
    g.mul_(1.0)  # any in-place change, even one that keeps the values
    assert grad_column_sums.take(g) is None
    grad_column_sums.record(other, total)
    key = id(other)
    del other
    assert key not in grad_column_sums._known
