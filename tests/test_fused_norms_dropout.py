"""The residual dropout fused into the add+norm (ops.add_layer_norm / add_rms_norm with
dropout_p; kernels/cute/norms.py): the NumPy model of the kernels' mask walk equals the
standalone dropout kernel's stream for the same seed and offset; on the CPU the fused op equals
ops.dropout followed by the add+norm (same generator draws, values and gradients), gradchecks with
p = 0 and with a fixed mask; the reference models' fused path equals the unfused one with
dropout; the dry-run CUDA device's launches and arguments.  GPU tests:
tests/test_fused_norms_dropout_gpu.py."""
import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from cutegrad import dtypes as dt
from cutegrad.autograd import gradcheck

from norms_loading import load_norms_module

model = load_norms_module("reference")



def _stream_keep(seed, offset, count, keep):
    """The dropout kernel's model (kernels/cuda/dropout.cu over kernels/cuda/philox.h): value v
    of the launch is kept iff unit(lane v % 4 of philox(seed, offset / 4 + v / 4)) < fp32(keep)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "reference" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_model_for_resdrop", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m.dropout_uniform(seed, offset, count) < np.float32(keep)


@pytest.mark.parametrize("n, dtypes", [(128, ("bf16", "fp32", "bf16")), (768, ("bf16", "fp32", "bf16")),
                                       (384, ("fp32", "fp32", "fp32")), (2048, ("bf16", "fp32", "bf16"))])
@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_model_mask_is_the_dropout_kernels(n, dtypes, keep):
    seed, offset, rows = 0x0123_4567_89AB_CDEF, 4 * 1234567, 5
    scales = model.residual_dropout_scales(seed, offset, rows, n, keep, dtypes)
    want = _stream_keep(seed, offset, rows * n, keep).reshape(rows, n)
    np.testing.assert_array_equal(scales != 0, want)
    assert 0 < want.sum() < want.size
    assert set(np.unique(scales)) == {np.float32(0.0), np.float32(1.0 / keep)}
    # another offset or seed gives another mask
    assert (model.residual_dropout_scales(seed, offset + 4, rows, n, keep, dtypes) != scales).any()
    assert (model.residual_dropout_scales(seed + 1, offset, rows, n, keep, dtypes) != scales).any()


def _inputs(rng, shape, x_dtype, r_dtype, requires_grad=True):
    x = cg.tensor(rng.standard_normal(shape), dtype=x_dtype)
    r = cg.tensor(rng.standard_normal(shape) * 2 + 0.5, dtype=r_dtype)
    p_dtype = dt.float64 if x_dtype is dt.float64 else dt.float32
    w = cg.tensor(rng.standard_normal(shape[-1:]) * 0.5 + 1, dtype=p_dtype)
    b = cg.tensor(rng.standard_normal(shape[-1:]) * 0.1, dtype=p_dtype)
    if requires_grad:
        for t in (x, r, w, b):
            t.requires_grad_()
    return x, r, w, b


def _np(t):
    return t.detach().to(dt.float64).numpy()


def _run(op, x, r, w, b, **kw):
    if op == "layer":
        return cg.add_layer_norm(x, r, w, b, **kw)
    return cg.add_rms_norm(x, r, w, **kw)


@pytest.mark.parametrize("op", ["layer", "rms"])
@pytest.mark.parametrize("x_dtype, r_dtype", [(dt.float64, dt.float64), (dt.float32, dt.float32),
                                              (dt.bfloat16, dt.float32)])
@pytest.mark.parametrize("shape", [(3, 7, 33), (5, 128)])
def test_cpu_equals_dropout_then_add_norm(op, x_dtype, r_dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x, r, w, b = _inputs(rng, shape, x_dtype, r_dtype)
    g = cg.Generator().manual_seed(7)
    y, s = _run(op, x, r, w, b, dropout_p=0.3, generator=g)
    dy = cg.tensor(rng.standard_normal(shape), dtype=y.dtype)
    ds = cg.tensor(rng.standard_normal(shape), dtype=s.dtype)
    cg.autograd.backward([y, s], [dy, ds])
    fused = [_np(t.grad) for t in (x, r, w)] + ([_np(b.grad)] if op == "layer" else [])

    x2, r2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, r, w, b))
    g.manual_seed(7)
    dropped = cg.ops.dropout(x2, 0.3, generator=g)
    y2, s2 = _run(op, dropped, r2, w2, b2)
    cg.autograd.backward([y2, s2], [dy, ds])
    np.testing.assert_array_equal(_np(y), _np(y2))
    np.testing.assert_array_equal(_np(s), _np(s2))
    unfused = [_np(t.grad) for t in (x2, r2, w2)] + ([_np(b2.grad)] if op == "layer" else [])
    for got, want in zip(fused, unfused):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the mask is a real one: some of x's gradient is exactly zero, some not
    kept = _np(x.grad) != 0
    assert 0 < kept.sum() < kept.size


def test_cpu_p_zero_is_the_plain_add_norm_and_p_one_drops_everything():
    rng = np.random.default_rng(3)
    x, r, w, b = _inputs(rng, (4, 16), dt.float64, dt.float64, requires_grad=False)
    y0, s0 = cg.add_layer_norm(x, r, w, b, dropout_p=0.0)
    y, s = cg.add_layer_norm(x, r, w, b)
    np.testing.assert_array_equal(_np(y0), _np(y))
    np.testing.assert_array_equal(_np(s0), _np(s))
    _, s1 = cg.add_layer_norm(x, r, w, b, dropout_p=1.0)
    np.testing.assert_array_equal(_np(s1), _np(r))


def test_bad_dropout_arguments_raise_before_any_work():
    x = cg.randn(2, 8)
    with pytest.raises(ValueError, match="needs a residual"):
        cg.add_layer_norm(x, None, dropout_p=0.1)
    with pytest.raises(ValueError, match="between 0 and 1"):
        cg.add_rms_norm(x, x, dropout_p=1.5)


@pytest.mark.parametrize("op", ["layer", "rms"])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_with_p_zero_and_a_fixed_mask(op, p):
    rng = np.random.default_rng(11)
    x, r, w, b = _inputs(rng, (3, 12), dt.float64, dt.float64)

    def f(x, r, w, b):
        # a fresh generator of one seed per call: every evaluation draws the same mask
        y, s = _run(op, x, r, w, b, dropout_p=p, generator=cg.Generator().manual_seed(5))
        return y * 1.5 + s * s

    assert gradcheck(f, (x, r, w, b))


@pytest.mark.parametrize("cls, kw", [(cg.nn.AddLayerNorm, {}), (cg.nn.AddRMSNorm, {})])
def test_modules_drop_only_in_training_and_only_with_a_residual(cls, kw):
    m = cls(16, dropout=0.5, **kw).to(dt.float64)
    x, r = cg.randn(4, 16, dtype=dt.float64), cg.randn(4, 16, dtype=dt.float64)
    _, s_train = m(x, r)
    assert not np.allclose(_np(s_train), _np(x + r))
    _, s_none = m(x)
    np.testing.assert_array_equal(_np(s_none), _np(x))
    m.eval()
    _, s_eval = m(x, r)
    np.testing.assert_array_equal(_np(s_eval), _np(x + r))


@pytest.mark.parametrize("preset", ["gpt", "vit"])
def test_reference_models_fused_equals_unfused_with_dropout(preset):
    """float64 on the CPU: the fused models draw the same masks at the same points of the stream."""
    from cutegrad.models import GPT, GPTConfig, ViT, ViTConfig
    losses, grads = [], []
    for fused in (False, True):
        cg.manual_seed(0)
        if preset == "gpt":
            net = GPT(GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.25,
                                fused_norms=fused)).to(dt.float64)
            inp = cg.tensor(np.random.default_rng(1).integers(0, 31, size=(2, 9)), dtype=dt.int64)
            target = cg.tensor(np.random.default_rng(2).integers(0, 31, size=(2, 9)), dtype=dt.int64)
            cg.manual_seed(123)
            out = net(inp)
            loss = F.cross_entropy(out.reshape(-1, 31), target.reshape(-1))
        else:
            net = ViT(ViTConfig(image_size=8, patch_size=4, in_channels=3, num_classes=5, dim=32, depth=2, n_heads=2,
                                dropout=0.25, fused_norms=fused)).to(dt.float64)
            inp = cg.tensor(np.random.default_rng(1).standard_normal((2, 3, 8, 8)), dtype=dt.float64)
            cg.manual_seed(123)
            loss = net(inp).sum()
        loss.backward()
        losses.append(float(loss.item()))
        grads.append({k: p.grad.numpy() for k, p in net.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-12)
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        np.testing.assert_allclose(grads[1][k], grads[0][k], rtol=1e-9, atol=1e-12, err_msg=k)


# ---- the dry-run CUDA device: which kernels run, with which arguments -------------------------

@pytest.fixture
def dry():
    with cg.cuda.dry_run() as d:
        yield d


def _fused_step(dry, answer, x_dtype=dt.bfloat16, n=768, rows=1000):
    for name in ("cute_norm", "cute_norm_backward", "cute_norm_finish"):
        dry.kernels.returns(name, lambda *a, answer=answer: answer)
    x = cg.randn(rows, n, device="cuda", dtype=x_dtype).requires_grad_()
    res = cg.randn(rows, n, device="cuda", dtype=dt.float32).requires_grad_()
    w = cg.ones(n, device="cuda").requires_grad_()
    b = cg.zeros(n, device="cuda").requires_grad_()
    dry.reset()
    y, s = cg.add_layer_norm(x, res, w, b, out_dtype=dt.bfloat16, dropout_p=0.1)
    fwd = list(dry.calls)
    dry.reset()
    cg.autograd.backward([y, s], [cg.ones_like(y), cg.ones_like(s)])
    return fwd, list(dry.calls[2:])


def test_dry_run_dropout_rides_in_the_norm_kernels(dry):
    fwd, bwd = _fused_step(dry, "norm_sm_90a_k")
    assert [c[0] for c in fwd] == ["cute_norm"]
    keep, seed, seed_ptr, offset, offset_ptr = fwd[0][1][16:21]
    assert keep == pytest.approx(0.9) and offset % 4 == 0 and seed_ptr == offset_ptr == 0
    assert [c[0] for c in bwd] == ["cute_norm_backward", "cute_norm_finish"]
    assert bwd[0][1][4] != 0, "x's gradient (through the dropout) is the second ds output"
    assert bwd[0][1][19:24] == (keep, seed, seed_ptr, offset, offset_ptr), "the backward regenerates the mask"
    # the next draw reserves fresh numbers past this one's 1000 * 768
    fwd2, _ = _fused_step(dry, "norm_sm_90a_k")
    assert fwd2[0][1][19] >= offset + 1000 * 768


def test_dry_run_fallback_composes_the_standalone_dropout_kernel(dry):
    fwd, bwd = _fused_step(dry, "")
    names = [c[0] for c in fwd]
    # the CuTeDSL table is asked first (with the dropout), then the standalone kernel and the plain add+norm
    assert names[:3] == ["cute_norm", "dropout", "cute_norm"] and "norm" in names
    drop = fwd[1][1]
    assert drop[8] == pytest.approx(0.9)
    assert "dropout" in [c[0] for c in bwd]
    bdrop = next(c for c in bwd if c[0] == "dropout")[1]
    assert bdrop[4:8] == drop[4:8], "the backward's mask comes from the forward's Philox state"


def test_dry_run_linear_bias_gradient_comes_from_the_norm_backward(dry):
    """proj -> dropout -> add+norm: the Linear's bias gradient is the kernels' dx column sum."""
    for name in ("cute_norm", "cute_norm_backward", "cute_norm_finish"):
        dry.kernels.returns(name, lambda *a: "norm_sm_90a_k")
    lin = cg.nn.Linear(256, 256).to("cuda")
    h = cg.randn(64, 256, device="cuda", requires_grad=True)
    res = cg.randn(64, 256, device="cuda").requires_grad_()
    w, b = cg.ones(256, device="cuda").requires_grad_(), cg.zeros(256, device="cuda").requires_grad_()
    with cg.autocast("cuda", dtype=cg.bfloat16):
        y, s = cg.add_layer_norm(lin(h), res, w, b, dropout_p=0.1)
    dy, ds = cg.ones_like(y), cg.ones_like(s)
    dry.reset()
    cg.autograd.backward([y, s], [dy, ds])
    names = dry.names()
    assert "column_sum" not in names and "dropout" not in names
    assert names.count("cute_norm_backward") == 1 and names.count("gemm") == 2  # dgrad, wgrad
