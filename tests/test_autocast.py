"""cutegrad.autocast against torch.autocast.

On the CPU with bfloat16: per op class, the output dtype and values match
torch.autocast("cpu") where torch's CPU lists agree with cutegrad's (which
are torch's CUDA lists); where they differ (softmax, layer_norm are float32
ops on CUDA only), the result equals the explicitly cast computation.
Gradients reach float32 leaves as float32 and equal those of the explicitly
cast computation. On a GPU, a small model's loss and gradients under
autocast("cuda", bfloat16) match torch.autocast on the same GPU.
"""
import threading

import numpy as np
import pytest

import cutegrad
import cutegrad.nn.functional as F
from cutegrad import dtypes as dt
from cutegrad.autocast import state as ac_state, gate as ac_gate, LOWER_PRECISION_OPS, FP32_OPS

torch = pytest.importorskip("torch")
TF = torch.nn.functional
TORCH_DTYPE = {dt.float32: torch.float32, dt.bfloat16: torch.bfloat16, dt.float16: torch.float16,
               dt.float64: torch.float64}


def pair(rng, shape, dtype=dt.float32, requires_grad=False):
    """The same values as a cutegrad and a torch CPU tensor of dtype."""
    c = cutegrad.tensor(rng.uniform(-1, 1, size=shape), dtype=dtype, requires_grad=requires_grad)
    t = torch.tensor(c.detach().to(dt.float64).numpy(), dtype=TORCH_DTYPE[dtype], requires_grad=requires_grad)
    return c, t


def vals(x):
    if isinstance(x, cutegrad.Tensor):
        return x.detach().cpu().to(dt.float64).numpy()
    return x.detach().cpu().to(torch.float64).numpy()


def same_dtype(c, t):
    return c.dtype.name == str(t.dtype).replace("torch.", "")


# --- ops where torch's CPU lists agree with cutegrad's ---------------------------------------
def _agreeing_cases(rng):
    a, ta = pair(rng, (5, 7))
    b, tb = pair(rng, (7, 3))
    ab, tab = pair(rng, (5, 7), dt.bfloat16)
    v, tv = pair(rng, (7,))
    x3, tx3 = pair(rng, (2, 5, 7))
    y3, ty3 = pair(rng, (2, 7, 4))
    w, tw = pair(rng, (6, 7))
    bias, tbias = pair(rng, (6,))
    q, tq = pair(rng, (2, 3, 5, 8))
    k, tk = pair(rng, (2, 3, 6, 8))
    val, tval = pair(rng, (2, 3, 6, 8))
    logits, tlogits = pair(rng, (5, 7), dt.bfloat16)
    target = rng.integers(0, 7, size=5)
    ct, tt = cutegrad.tensor(target), torch.tensor(target)
    pb, tpb = pair(rng, (5, 7), dt.bfloat16)
    return [
        ("matmul", lambda: cutegrad.matmul(a, b), lambda: torch.matmul(ta, tb)),
        ("matmul_mixed", lambda: a @ ab.t(), lambda: ta @ tab.t()),
        ("matmul_vec", lambda: cutegrad.matmul(a, v), lambda: torch.matmul(ta, tv)),
        ("matmul_batched", lambda: cutegrad.matmul(x3, y3), lambda: torch.matmul(tx3, ty3)),
        ("mm", lambda: cutegrad.mm(a, b), lambda: torch.mm(ta, tb)),
        ("bmm", lambda: cutegrad.bmm(x3, y3), lambda: torch.bmm(tx3, ty3)),
        ("linear", lambda: F.linear(a, w, bias), lambda: TF.linear(ta, tw, tbias)),
        ("linear_nobias", lambda: F.linear(ab, w), lambda: TF.linear(tab, tw)),
        ("sdpa", lambda: F.scaled_dot_product_attention(q, k, val),
         lambda: TF.scaled_dot_product_attention(tq, tk, tval)),
        ("sdpa_causal", lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
         lambda: TF.scaled_dot_product_attention(tq, tq, tq, is_causal=True)),
        ("cross_entropy", lambda: F.cross_entropy(logits, ct), lambda: TF.cross_entropy(tlogits, tt)),
        ("cross_entropy_smooth_none", lambda: F.cross_entropy(logits, ct, reduction="none", label_smoothing=0.1),
         lambda: TF.cross_entropy(tlogits, tt, reduction="none", label_smoothing=0.1)),
        ("nll_loss", lambda: F.nll_loss(logits, ct), lambda: TF.nll_loss(tlogits, tt)),
        ("mse_loss", lambda: F.mse_loss(logits, pb), lambda: TF.mse_loss(tlogits, tpb)),
        ("add_mixed", lambda: ab + a, lambda: tab + ta),
        ("mul_bf16", lambda: ab * ab, lambda: tab * tab),
        ("relu_fp32", lambda: F.relu(a), lambda: TF.relu(ta)),
        ("cat_mixed", lambda: cutegrad.cat([ab, a]), lambda: torch.cat([tab, ta])),
        ("matmul_fp64", lambda: cutegrad.matmul(a.to(dt.float64), b.to(dt.float64)),
         lambda: torch.matmul(ta.double(), tb.double())),
    ]


CASE_NAMES = ["matmul", "matmul_mixed", "matmul_vec", "matmul_batched", "mm", "bmm", "linear", "linear_nobias",
              "sdpa", "sdpa_causal", "cross_entropy", "cross_entropy_smooth_none", "nll_loss", "mse_loss",
              "add_mixed", "mul_bf16", "relu_fp32", "cat_mixed", "matmul_fp64"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_dtype_and_values_match_torch_cpu_autocast(name):
    rng = np.random.default_rng(100 + CASE_NAMES.index(name))
    _, ours, theirs = {c[0]: c for c in _agreeing_cases(rng)}[name]
    with cutegrad.autocast("cpu"):
        got = ours()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = theirs()
    assert same_dtype(got, ref), (name, got.dtype, ref.dtype)
    tol = 2e-2 if got.dtype is dt.bfloat16 else 1e-5
    np.testing.assert_allclose(vals(got), vals(ref), rtol=tol, atol=tol, err_msg=name)


def test_cases_cover_every_listed_op():
    assert [c[0] for c in _agreeing_cases(np.random.default_rng(0))] == CASE_NAMES
    short = {"scaled_dot_product_attention": "sdpa"}
    for op in LOWER_PRECISION_OPS + ("cross_entropy", "nll_loss", "mse_loss"):
        assert short.get(op, op) in CASE_NAMES


# --- float32 ops that torch autocasts on CUDA only ---------------------------------------------
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "layer_norm", "layer_norm_affine"])
def test_fp32_ops_upcast_16_bit_inputs(op, rng):
    x = cutegrad.tensor(rng.uniform(-2, 2, size=(4, 9)), dtype=dt.bfloat16)
    w = cutegrad.tensor(rng.uniform(0.5, 1.5, size=(9,)), dtype=dt.bfloat16)
    b = cutegrad.tensor(rng.uniform(-1, 1, size=(9,)), dtype=dt.float32)
    fns = {"softmax": lambda x, w, b: cutegrad.softmax(x, -1),
           "log_softmax": lambda x, w, b: cutegrad.log_softmax(x, 1),
           "layer_norm": lambda x, w, b: F.layer_norm(x, (9,)),
           "layer_norm_affine": lambda x, w, b: F.layer_norm(x, (9,), w, b)}
    with cutegrad.autocast("cpu"):
        got = fns[op](x, w, b)
    ref = fns[op](x.float(), w.float(), b)
    assert got.dtype is dt.float32 and ref.dtype is dt.float32
    np.testing.assert_array_equal(vals(got), vals(ref))
    assert "softmax" in FP32_OPS and "layer_norm" in FP32_OPS


def test_softmax_explicit_dtype_is_left_alone():
    x = cutegrad.randn(3, 4).to(dt.bfloat16)
    with cutegrad.autocast("cpu"):
        assert cutegrad.softmax(x, -1, dtype=dt.bfloat16).dtype is dt.bfloat16
        assert cutegrad.softmax(x.float(), -1).dtype is dt.float32


def test_sdpa_runs_wholly_in_the_autocast_dtype():
    rng = np.random.default_rng(3)
    q, k, v = (cutegrad.tensor(rng.uniform(-1, 1, size=(2, 5, 8)), dtype=dt.float32) for _ in range(3))
    mask = cutegrad.tensor(rng.uniform(-1, 0, size=(5, 5)), dtype=dt.float32)
    with cutegrad.autocast("cpu"):
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert cutegrad.is_autocast_enabled("cpu")  # the body's exclusion is undone
    ref = F.scaled_dot_product_attention(*(t.to(dt.bfloat16) for t in (q, k, v)), attn_mask=mask.to(dt.bfloat16))
    assert got.dtype is dt.bfloat16
    np.testing.assert_array_equal(vals(got), vals(ref))


def test_other_device_type_is_untouched():
    a, b = cutegrad.randn(3, 4), cutegrad.randn(4, 2)
    with cutegrad.autocast("cuda", dtype=dt.bfloat16):
        assert cutegrad.is_autocast_enabled("cuda") and not cutegrad.is_autocast_enabled("cpu")
        assert (a @ b).dtype is dt.float32
        assert cutegrad.softmax(a.to(dt.bfloat16), -1).dtype is dt.bfloat16


# --- gradients -------------------------------------------------------------------------------
def _model(x, w1, b1, w2, b2, g, target):
    h = F.gelu(F.linear(x, w1, b1))
    h = F.layer_norm(h, (h.shape[-1],), g)
    return F.cross_entropy(F.linear(h, w2, b2), target, label_smoothing=0.05)


def _explicit(x, w1, b1, w2, b2, g, target):
    low = dt.bfloat16
    h = F.gelu(F.linear(x.to(low), w1.to(low), b1.to(low)))
    h = F.layer_norm(h.float(), (h.shape[-1],), g)
    return F.cross_entropy(F.linear(h.to(low), w2.to(low), b2.to(low)).float(), target, label_smoothing=0.05)


def test_gradients_reach_fp32_leaves_and_equal_the_explicit_casts():
    rng = np.random.default_rng(7)
    shapes = [(6, 10), (12, 10), (12,), (5, 12), (5,), (12,)]
    inits = [rng.uniform(-1, 1, size=s) for s in shapes]
    target = cutegrad.tensor(rng.integers(0, 5, size=6))
    grads = {}
    for mode in ("autocast", "explicit"):
        ts = [cutegrad.tensor(v, dtype=dt.float32, requires_grad=True) for v in inits]
        if mode == "autocast":
            with cutegrad.autocast("cpu", dtype=dt.bfloat16):
                loss = _model(*ts, target)
            assert loss.dtype is dt.float32
        else:
            loss = _explicit(*ts, target)
        loss.backward()
        assert all(t.grad is not None and t.grad.dtype is dt.float32 for t in ts)
        grads[mode] = [vals(loss)] + [vals(t.grad) for t in ts]
    for got, ref in zip(grads["autocast"], grads["explicit"]):
        np.testing.assert_array_equal(got, ref)


def test_backward_inside_the_region_gives_the_same_gradients():
    rng = np.random.default_rng(9)
    inits = [rng.uniform(-1, 1, size=s) for s in [(6, 10), (12, 10), (12,), (5, 12), (5,), (12,)]]
    target = cutegrad.tensor(rng.integers(0, 5, size=6))
    grads = []
    for inside in (False, True):
        ts = [cutegrad.tensor(v, dtype=dt.float32, requires_grad=True) for v in inits]
        with cutegrad.autocast("cpu"):
            loss = _model(*ts, target)
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([vals(t.grad) for t in ts])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


def test_gradients_match_torch_cpu_autocast():
    """linear and cross_entropy are on torch's CPU lists too, so loss and gradients agree with torch."""
    rng = np.random.default_rng(8)
    x, tx = pair(rng, (9, 16))
    w1, tw1 = pair(rng, (20, 16), requires_grad=True)
    w2, tw2 = pair(rng, (7, 20), requires_grad=True)
    b2, tb2 = pair(rng, (7,), requires_grad=True)
    target = rng.integers(0, 7, size=9)
    with cutegrad.autocast("cpu"):
        loss = F.cross_entropy(F.linear(F.relu(F.linear(x, w1)), w2, b2), cutegrad.tensor(target))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tloss = TF.cross_entropy(TF.linear(TF.relu(TF.linear(tx, tw1)), tw2, tb2), torch.tensor(target))
    loss.backward()
    tloss.backward()
    assert same_dtype(loss, tloss)
    np.testing.assert_allclose(vals(loss), vals(tloss), rtol=1e-2)
    for c, t in ((w1, tw1), (w2, tw2), (b2, tb2)):
        assert same_dtype(c.grad, t.grad)
        r = vals(t.grad)
        np.testing.assert_allclose(vals(c.grad), r, atol=3e-2 * np.abs(r).max())


# --- regions: nesting, disabling, decorator, threads -------------------------------------------
def test_nesting_disabled_and_restore():
    a, b = cutegrad.randn(2, 3), cutegrad.randn(3, 2)
    assert not cutegrad.is_autocast_enabled("cpu")
    assert cutegrad.get_autocast_dtype("cpu") is dt.bfloat16 and cutegrad.get_autocast_dtype("cuda") is dt.float16
    with cutegrad.autocast("cpu"):
        assert (a @ b).dtype is dt.bfloat16
        with cutegrad.autocast("cpu", enabled=False):
            assert not cutegrad.is_autocast_enabled("cpu")
            assert (a @ b).dtype is dt.float32
            with cutegrad.autocast("cpu", dtype=dt.float16):
                assert (a @ b).dtype is dt.float16
                assert cutegrad.get_autocast_dtype("cpu") is dt.float16
            assert (a @ b).dtype is dt.float32
        assert (a @ b).dtype is dt.bfloat16
        assert cutegrad.get_autocast_dtype("cpu") is dt.bfloat16
    assert (a @ b).dtype is dt.float32
    assert ac_gate.armed == 0 and ac_state.depth == 0


def test_exception_inside_region_restores_state():
    with pytest.raises(RuntimeError, match="boom"):
        with cutegrad.autocast("cpu"):
            raise RuntimeError("boom")
    assert not cutegrad.is_autocast_enabled("cpu") and ac_gate.armed == 0 and ac_state.depth == 0


def test_decorator_enters_a_fresh_region_per_call():
    a, b = cutegrad.randn(2, 3), cutegrad.randn(3, 2)

    @cutegrad.autocast("cpu", dtype=dt.float16)
    def f(depth):
        out = (a @ b).dtype
        return [out] + (f(depth - 1) if depth else [])

    assert not cutegrad.is_autocast_enabled("cpu")  # decorating does not switch anything on
    assert f(2) == [dt.float16] * 3
    assert not cutegrad.is_autocast_enabled("cpu") and ac_state.depth == 0


def test_state_is_per_thread():
    a, b = cutegrad.randn(2, 3), cutegrad.randn(3, 2)
    seen = {}

    def other():
        seen["enabled"] = cutegrad.is_autocast_enabled("cpu")
        seen["dtype"] = (a @ b).dtype

    with cutegrad.autocast("cpu"):
        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert (a @ b).dtype is dt.bfloat16
    assert seen == {"enabled": False, "dtype": dt.float32}


@pytest.mark.parametrize("args, match", [
    (("tpu",), "device_type 'tpu'"),
    ((0,), "device_type of type str"),
    (("cpu", dt.float32), "dtype must be"),
    (("cuda", dt.int8), "dtype must be"),
    (("cpu", None, "yes"), "enabled of type bool"),
])
def test_bad_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        cutegrad.autocast(*args)
    assert ac_gate.armed == 0


def test_bad_arguments_of_the_queries_raise():
    with pytest.raises(ValueError, match="device_type"):
        cutegrad.is_autocast_enabled("gpu")
    with pytest.raises(ValueError, match="dtype must be"):
        cutegrad.set_autocast_dtype("cpu", dt.float64)


def test_set_autocast_dtype_is_the_default_of_new_regions():
    prev = cutegrad.get_autocast_dtype("cpu")
    try:
        cutegrad.set_autocast_dtype("cpu", dt.float16)
        with cutegrad.autocast("cpu"):
            assert (cutegrad.randn(2, 2) @ cutegrad.randn(2, 2)).dtype is dt.float16
    finally:
        cutegrad.set_autocast_dtype("cpu", prev)


# --- the cast cache ----------------------------------------------------------------------------
def test_parameter_casts_are_cached_within_a_region():
    lin = cutegrad.nn.Linear(4, 3)
    x = cutegrad.randn(2, 4)
    with cutegrad.autocast("cpu"):
        y1 = lin(x)
        y2 = lin(x)
        assert len(ac_state.cache) == 2  # weight and bias, cast once each
        with cutegrad.autocast("cpu", enabled=False):
            pass
        assert len(ac_state.cache) == 2  # an inner region's exit keeps the outer region's cache
        (y1.sum() + y2.sum()).backward()
    assert not ac_state.cache
    ref = cutegrad.nn.Linear(4, 3)
    ref.load_state_dict(lin.state_dict())
    (2 * F.linear(x.to(dt.bfloat16), ref.weight.to(dt.bfloat16), ref.bias.to(dt.bfloat16)).sum()).backward()
    np.testing.assert_array_equal(vals(lin.weight.grad), vals(ref.weight.grad))
    np.testing.assert_array_equal(vals(lin.bias.grad), vals(ref.bias.grad))


def test_cached_casts_serve_several_backward_passes():
    """Gradient accumulation inside one region: each backward frees its graph, the cached cast stays usable."""
    lin = cutegrad.nn.Linear(4, 3)
    x = cutegrad.randn(2, 4)
    with cutegrad.autocast("cpu"):
        for _ in range(3):
            lin(x).sum().backward()
    accumulated = vals(lin.weight.grad)
    lin.weight.grad = None
    with cutegrad.autocast("cpu"):
        lin(x).sum().backward()
    np.testing.assert_array_equal(accumulated, 3 * vals(lin.weight.grad))


def test_cache_sees_in_place_updates_and_skips_no_grad():
    w = cutegrad.randn(3, 4, requires_grad=True)
    x = cutegrad.randn(2, 4)
    with cutegrad.autocast("cpu"):
        before = F.linear(x, w)
        with cutegrad.no_grad():
            w.mul_(2.0)
            assert F.linear(x, w).dtype is dt.bfloat16
        after = F.linear(x, w)
        assert len(ac_state.cache) == 1
    np.testing.assert_array_equal(vals(after), vals(F.linear(x.to(dt.bfloat16), w.detach().to(dt.bfloat16))))
    assert not np.array_equal(vals(before), vals(after))
    with cutegrad.autocast("cpu"), cutegrad.no_grad():
        F.linear(x, w)
        assert not ac_state.cache


def test_cache_disabled():
    w = cutegrad.randn(3, 4, requires_grad=True)
    with cutegrad.autocast("cpu", cache_enabled=False):
        F.linear(cutegrad.randn(2, 4), w)
        assert not ac_state.cache


# --- GPU: a small model step against torch.autocast on the same GPU ---------------------------
def _gpu_skip_reason():
    try:
        import cutegrad.cuda as cuda
        if not cuda.is_available():
            return "needs a CUDA GPU and driver"
        from cutegrad import _C
        if not hasattr(_C, "elementwise"):
            return "cutegrad._C was built without the CUDA op kernels"
    except Exception as exc:
        return f"needs a CUDA GPU and cutegrad._C: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available():
        return "needs torch with CUDA for the reference"
    return None


@pytest.mark.gpu
def test_model_step_matches_torch_autocast_on_gpu():
    """Three SGD steps of a small classifier, forward under autocast(cuda, bf16), from the same weights."""
    reason = _gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    rng = np.random.default_rng(11)
    n, d_in, d_hid, n_cls = 32, 48, 64, 10
    inits = {"w1": rng.uniform(-0.2, 0.2, size=(d_hid, d_in)), "b1": rng.uniform(-0.1, 0.1, size=(d_hid,)),
             "g": rng.uniform(0.8, 1.2, size=(d_hid,)), "beta": rng.uniform(-0.1, 0.1, size=(d_hid,)),
             "w2": rng.uniform(-0.2, 0.2, size=(n_cls, d_hid)), "b2": rng.uniform(-0.1, 0.1, size=(n_cls,))}
    x0 = rng.uniform(-1, 1, size=(n, d_in))
    target0 = rng.integers(0, n_cls, size=n)
    target0[3] = -100

    def steps(P, x, target, autocast, no_grad, linear, gelu, layer_norm, ce):
        losses, grads = [], []
        for _ in range(3):
            with autocast:
                h = gelu(linear(x, P["w1"], P["b1"]))
                h = layer_norm(h, (d_hid,), P["g"], P["beta"])
                logits = linear(h, P["w2"], P["b2"])
                loss = ce(logits, target, label_smoothing=0.1)
            loss.backward()
            losses.append(loss)
            grads.append({k: p.grad for k, p in P.items()})
            with no_grad():
                for p in P.values():
                    p.sub_(p.grad * 0.2)
                    p.grad = None
        return losses, grads, logits

    cp = {k: cutegrad.tensor(v, dtype=dt.float32, device="cuda", requires_grad=True) for k, v in inits.items()}
    closses, cgrads, clogits = steps(
        cp, cutegrad.tensor(x0, dtype=dt.float32, device="cuda"), cutegrad.tensor(target0, device="cuda"),
        cutegrad.autocast("cuda", dtype=dt.bfloat16), cutegrad.no_grad, F.linear, F.gelu, F.layer_norm,
        F.cross_entropy)
    tp = {k: torch.tensor(v, dtype=torch.float32, device="cuda", requires_grad=True) for k, v in inits.items()}
    tlosses, tgrads, tlogits = steps(
        tp, torch.tensor(x0, dtype=torch.float32, device="cuda"), torch.tensor(target0, device="cuda"),
        torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad, TF.linear, TF.gelu, TF.layer_norm,
        TF.cross_entropy)
    assert clogits.dtype is dt.bfloat16 and tlogits.dtype == torch.bfloat16
    for step, (cl, tl, cg, tg) in enumerate(zip(closses, tlosses, cgrads, tgrads)):
        assert same_dtype(cl, tl)
        np.testing.assert_allclose(vals(cl), vals(tl), rtol=2e-2, err_msg=f"step {step}")
        for k in inits:
            assert cg[k].dtype is dt.float32
            r = vals(tg[k])
            np.testing.assert_allclose(vals(cg[k]), r, atol=5e-2 * np.abs(r).max(), err_msg=f"step {step} {k}")
