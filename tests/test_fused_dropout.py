"""Fused dropout (frontend/ops/fused_dropout.py, kernels/cuda/dropout.cu): the autograd node run
on the CPU with the kernel's NumPy model (kernels/reference/attention.py's Philox stream)
standing in for the CUDA kernels, gradcheck and create_graph, the dry-run CUDA device's
launches and arguments, and GPU tests (marker gpu) against the model."""
import importlib.util
import pathlib

import cutegrad as cg
import cutegrad.nn.functional as F
import numpy as np
import pytest
from cutegrad import dtypes as dt
from cutegrad.autograd import gradcheck
from cutegrad.device import CPU, CUDA
from cutegrad.dispatch import kernel
from cutegrad.ops import fused_dropout as D
from gpu_entry_skip import skip_reason

_PATH = pathlib.Path(__file__).resolve().parents[1] / "kernels" / "reference" / "attention.py"
_spec = importlib.util.spec_from_file_location("attention_model_for_dropout", _PATH)
philox_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(philox_model)

SEED, OFFSET = 0x0123_4567_89AB_CDEF, 4 * 77


def model(x, keep, seed, offset):
    """kernels/cuda/dropout.cu in NumPy: x * (1 / keep) where Philox value v of (seed, offset)
    is below float32(keep), else 0 (the computation in x's precision, float64 here)."""
    u = philox_model.dropout_uniform(seed, offset, x.size).reshape(x.shape)
    return np.where(u < np.float32(keep), x * (1.0 / keep), 0.0)


@pytest.fixture
def fused_on_cpu():
    """The NumPy model as CPU "dropout_fused"/"dropout_fused_backward", drawing a fixed state."""
    calls = []

    def forward(x, keep, generator):
        calls.append(("forward", keep))
        state = (SEED, 0, OFFSET, 0)
        return cg.tensor(model(x.numpy(), keep, SEED, OFFSET)), state

    def backward(dy, keep, rng_state):
        calls.append(("backward", keep, rng_state))
        return cg.tensor(model(dy.numpy(), keep, rng_state[0], rng_state[2]))

    fwd, bwd = kernel("dropout_fused").impl, kernel("dropout_fused_backward").impl
    old = fwd[CPU], bwd[CPU]
    fwd[CPU], bwd[CPU] = forward, backward
    yield calls
    fwd[CPU], bwd[CPU] = old


def test_node_applies_and_regenerates_the_mask(fused_on_cpu):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 33))
    x = cg.tensor(a, requires_grad=True)
    y = F.dropout(x, p=0.3)
    keep = philox_model.dropout_uniform(SEED, OFFSET, a.size).reshape(a.shape) < np.float32(0.7)
    assert 0 < keep.sum() < keep.size
    np.testing.assert_allclose(y.detach().numpy(), np.where(keep, a / 0.7, 0.0), rtol=1e-15, atol=0)
    assert y.grad_fn.name() == "FusedDropoutBackward"
    w = rng.standard_normal(a.shape)
    (y * cg.tensor(w)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.where(keep, w / 0.7, 0.0), rtol=1e-15, atol=0)
    # the backward reused the forward's Philox state: no mask tensor was kept
    assert fused_on_cpu == [("forward", pytest.approx(0.7)), ("backward", pytest.approx(0.7), (SEED, 0, OFFSET, 0))]


def test_gradcheck_and_create_graph(fused_on_cpu):
    rng = np.random.default_rng(1)
    x = cg.tensor(rng.standard_normal((5, 6)), requires_grad=True)
    assert gradcheck(lambda t: F.dropout(t * t, p=0.5), (x,))
    # second order: d/dx of sum(dL/dx * v) with L = sum(dropout(x^2)) = sum(2 x m / keep * v)
    y = F.dropout(x * x, p=0.5).sum()
    (g,) = cg.autograd.grad(y, (x,), create_graph=True)
    v = rng.standard_normal((5, 6))
    (g * cg.tensor(v)).sum().backward()
    keep = philox_model.dropout_uniform(SEED, OFFSET, 30).reshape(5, 6) < np.float32(0.5)
    np.testing.assert_allclose(x.grad.numpy(), np.where(keep, 2 * v / 0.5, 0.0), rtol=1e-14, atol=0)


def test_backends_without_the_kernel_keep_the_composite():
    x = cg.tensor(np.ones((4, 4)), requires_grad=True)
    assert not D.takes_fused_dropout(x)
    y = F.dropout(x, p=0.5)
    assert y.grad_fn.name() != "FusedDropoutBackward"
    assert set(np.unique(y.detach().numpy())) <= {0.0, 2.0}


def test_dry_run_one_launch_each_way(dry_cuda):
    x = cg.randn(64, 129, device="cuda", dtype=cg.bfloat16, requires_grad=True)
    dy = cg.randn(64, 129, device="cuda", dtype=cg.bfloat16)
    dry_cuda.reset()
    y = F.dropout(x, p=0.1)
    assert dry_cuda.names() == ["dropout"]
    fwd = dry_cuda.calls[0][1]
    dry_cuda.reset()
    y.backward(dy)
    # the engine's copy of the given root gradient, then the one backward kernel
    assert dry_cuda.names() == ["elementwise", "dropout"]
    bwd = dry_cuda.calls[1][1]
    # dtype, count, the forward's (seed, seed_ptr, offset, offset_ptr) and keep
    assert bwd[2:9] == fwd[2:9] and fwd[2] == dt.bfloat16.index and fwd[3] == 64 * 129
    assert fwd[8] == pytest.approx(0.9)
    # a second draw takes fresh numbers from the generator
    dry_cuda.reset()
    F.dropout(x, p=0.1)
    assert dry_cuda.calls[0][1][6] >= fwd[6] + 64 * 129


def test_dry_run_fused_only_for_float_dtypes(dry_cuda):
    for dtype in (cg.float16, cg.float32, cg.float64):
        assert D.takes_fused_dropout(cg.zeros(3, device="cuda", dtype=dtype))
    assert not D.takes_fused_dropout(cg.zeros(3, device="cuda", dtype=cg.int32))
    x = cg.randn(8, 8, device="cuda")
    dry_cuda.reset()
    F.dropout(x, p=0.0)
    F.dropout(x, p=0.5, training=False)
    assert dry_cuda.names() == []


# ---- on a GPU ---------------------------------------------------------------------------

_SKIP = skip_reason("dropout")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _as_kernel(a64, keep, dtype):
    """a64 * (1 / keep) as the kernel computes it for dtype: in fp32 with the fp32 scale (fp64 for
    float64), rounded once to dtype."""
    if dtype is dt.float64:
        return a64 * (1.0 / keep)
    prod = a64.astype(np.float32) * np.float32(1.0 / keep)
    return cg.tensor(prod, dtype=dt.float32).to(dtype).to(dt.float64).numpy()


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [dt.float16, dt.bfloat16, dt.float32, dt.float64])
@pytest.mark.parametrize("n", [1, 5, 1023, 70001])
def test_gpu_kernel_matches_the_model(dtype, n):
    rng = np.random.default_rng(n)
    x = cg.tensor(rng.standard_normal(n), dtype=dtype).to("cuda")
    x64 = x.cpu().to(dt.float64).numpy()
    apply_mask = kernel("dropout_fused_backward").impl[CUDA]
    got = apply_mask(x, 0.8, (SEED, 0, OFFSET, 0)).cpu().to(dt.float64).numpy()
    keep = philox_model.dropout_uniform(SEED, OFFSET, n) < np.float32(0.8)
    ref = np.where(keep, _as_kernel(x64, 0.8, dtype), 0.0)
    np.testing.assert_array_equal(got, ref)


@gpu
@needs_gpu
def test_gpu_forward_backward_and_the_bernoulli_stream():
    """The forward keeps exactly the elements bernoulli_scaled keeps from the same generator
    state; the backward regenerates them, eagerly and from device memory (as under capture)."""
    from cutegrad.backends.cuda.launch import _ptr
    x = cg.randn(300, 257, device="cuda", dtype=cg.bfloat16, requires_grad=True)
    y, state = kernel("dropout_fused").impl[CUDA](x.detach(), 0.9, None)
    seed, _, offset, _ = state
    keep = philox_model.dropout_uniform(seed, offset, x.numel()).reshape(300, 257) < np.float32(0.9)
    x64 = x.detach().cpu().to(dt.float64).numpy()
    ref = np.where(keep, _as_kernel(x64, 0.9, dt.bfloat16), 0.0)
    np.testing.assert_array_equal(y.cpu().to(dt.float64).numpy(), ref)
    dy = cg.randn(300, 257, device="cuda", dtype=cg.bfloat16)
    dy64 = dy.cpu().to(dt.float64).numpy()
    want = np.where(keep, _as_kernel(dy64, 0.9, dt.bfloat16), 0.0)
    mem = cg.tensor(np.array([seed, offset - 8], dtype=np.int64)).to("cuda")
    apply_mask = kernel("dropout_fused_backward").impl[CUDA]
    for rng_state in (state, (0, _ptr(mem), 8, _ptr(mem) + 8)):
        np.testing.assert_array_equal(apply_mask(dy, 0.9, rng_state).cpu().to(dt.float64).numpy(), want)
    # end to end through autograd: the gradient is dy / keep exactly where the output is kept
    out = F.dropout(x, p=0.1)
    out.backward(dy)
    kept = out.detach().cpu().to(dt.float64).numpy() != 0  # randn has no exact zeros
    assert 0 < kept.sum() < kept.size
    got = x.grad.cpu().to(dt.float64).numpy()
    np.testing.assert_array_equal(got, np.where(kept, _as_kernel(dy64, 0.9, dt.bfloat16), 0.0))


@gpu
@needs_gpu
def test_gpu_graph_replays_draw_fresh_masks_and_the_backward_follows():
    """Captured forward + backward kernels: each replay draws what eager draws in sequence, and
    the captured backward regenerates that replay's mask (seed and offset from device memory)."""
    from cutegrad import graphs
    fwd, bwd = kernel("dropout_fused").impl[CUDA], kernel("dropout_fused_backward").impl[CUDA]
    x = cg.randn(4099, device="cuda")
    ones = cg.ones(4099, device="cuda")

    def host(t):
        return t.cpu().numpy()

    cg.manual_seed(11)
    eager = [host(fwd(x, 0.5, None)[0]) for _ in range(3)]
    cg.manual_seed(11)
    g = graphs.CUDAGraph()
    with graphs.graph(g):
        y, state = fwd(x, 0.5, None)
        mask = bwd(ones, 0.5, state)
    assert state[1] and state[3], "a captured launch reads seed and offset from device memory"
    cg.manual_seed(11)
    for want in eager:
        g.replay()
        np.testing.assert_array_equal(host(y), want)
        np.testing.assert_array_equal(host(mask) != 0, want != 0)
