"""The fused linear family on the GPU against the CPU backend in float64 on the same (rounded)
inputs, and against torch on the GPU where it is installed: values and every gradient, odd
shapes, the narrow classifier heads (N = 10, 36: the narrow tensor-core tiles), outputs
poisoned with NaN, the float32 matmul precision switch, split-K with its workspace from the
caching allocator, and CUDA-graph capture / replay of a fused forward + backward."""
import math

import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from test_cuda_ops import _SKIP  # the CUDA backend's GPU tests' skip rule (GPU, driver and _C)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

DTYPES = [cg.float32, cg.bfloat16, cg.float16]
TOL = {cg.float32: 2e-5, cg.bfloat16: 2e-2, cg.float16: 4e-3}


@pytest.fixture(autouse=True)
def poisoned_outputs():
    from cutegrad.backends import cuda as backend
    backend.set_poison_outputs(True)
    yield
    backend.set_poison_outputs(False)


def leaf(rng, shape, dtype, device, scale=1.0):
    host = cg.tensor(rng.standard_normal(shape) * scale, dtype=cg.float32).to(dtype)
    return host.to(device).detach().requires_grad_()


def f64(t):
    return t.detach().to("cpu").to(cg.float64).numpy()


def as_f64_leaf(t):
    return cg.tensor(f64(t), dtype=cg.float64, requires_grad=True)


def assert_close(got, want, dtype, what, k=1):
    assert not np.isnan(f64(got)).any(), f"{what}: NaN (an element was not written)"
    scale = max(np.abs(want).max(initial=0.0), 1.0) * max(1.0, math.sqrt(k))
    err = np.abs(f64(got) - want).max(initial=0.0) / scale
    assert err < TOL[dtype], f"{what}: relative error {err:.2e}"


FNS = {
    "linear": lambda x, w, b, w2, b2, r: F.linear(x, w, b),
    "linear_gelu": lambda x, w, b, w2, b2, r: F.linear_gelu(x, w, b),
    "linear_residual": lambda x, w, b, w2, b2, r: F.linear_residual(x, w, b, r),
    "mlp_gelu": lambda x, w, b, w2, b2, r: F.mlp_gelu(x, w, b, w2, b2),
    "mlp_gelu_residual": lambda x, w, b, w2, b2, r: F.mlp_gelu(x, w, b, w2, b2, residual=r),
}
# (input shape, in, hidden/out, out of fc2): aligned, odd, narrow heads, 1-D input
SHAPES = [((4, 64, 128), 128, 256, 128), ((3, 37, 40), 40, 72, 40), ((1000, 256), 256, 10, 10),
          ((64, 64, 128), 128, 36, 36), ((7,), 7, 5, 7), ((513, 264), 264, 520, 264),
          ((2, 1030, 256), 256, 10, 10)]  # >= 1024 rows: the 10-wide head's weight gradient is padded


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("shape,fin,hid,fout", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_and_gradients_match_float64_cpu(name, shape, fin, hid, fout, dtype):
    rng = np.random.default_rng(len(name) * 1000 + sum(shape) + fin)
    out_f = fout if name.startswith("mlp") else hid
    args = [leaf(rng, shape, dtype, "cuda"), leaf(rng, (hid, fin), dtype, "cuda", 1 / math.sqrt(fin)),
            leaf(rng, (hid,), dtype, "cuda"), leaf(rng, (fout, hid), dtype, "cuda", 1 / math.sqrt(hid)),
            leaf(rng, (fout,), dtype, "cuda"), leaf(rng, shape[:-1] + (out_f,), dtype, "cuda")]
    ref_args = [as_f64_leaf(a) for a in args]
    y = FNS[name](*args)
    y_ref = FNS[name](*ref_args)
    assert y.dtype is dtype and y.device.type == "cuda"
    assert_close(y, f64(y_ref), dtype, f"{name} forward", k=fin)
    seed = rng.standard_normal(tuple(y.shape))
    y.backward(cg.tensor(seed, dtype=cg.float32).to(dtype).to("cuda"))
    y_ref.backward(cg.tensor(f64(cg.tensor(seed, dtype=cg.float32).to(dtype)), dtype=cg.float64))
    for i, (a, r) in enumerate(zip(args, ref_args)):
        if r.grad is None:
            assert a.grad is None, f"{name}: input {i} got a gradient it should not have"
            continue
        assert a.grad is not None and a.grad.dtype is a.dtype, f"{name}: input {i}"
        assert_close(a.grad, f64(r.grad), dtype, f"{name} gradient of input {i}", k=max(shape[0], hid))


def test_heads_take_the_narrow_tensor_core_tiles():
    """N = 10 and 36 bf16 heads: a narrow CuTeDSL tile (D written without TMA), not the SIMT kernel."""
    from cutegrad import _gemm
    from cutegrad.backends.cuda.launch import _empty, _ptr, _stream
    rng = np.random.default_rng(0)
    dev = cg.device("cuda")
    for n, tile in ((10, 16), (36, 64)):
        x = cg.tensor(rng.standard_normal((1000, 256)), dtype=cg.float32).to(cg.bfloat16).to(dev)
        w = cg.tensor(rng.standard_normal((n, 256)), dtype=cg.float32).to(cg.bfloat16).to(dev)
        d = _empty((1000, n), cg.bfloat16, dev, _stream(dev.index))
        name = _gemm.gemm(_ptr(x), (1, 1000, 256), (0, 256, 1), _ptr(w), (1, 256, n), (0, 1, 256), _ptr(d),
                          (1, 1000, n), (0, n, 1), "bf16", "bf16", stream=_stream(dev.index), device=dev.index)
        assert name.endswith(f"128x{tile}_none"), name
        want = f64(x) @ f64(w).T
        assert_close(d, want, cg.bfloat16, f"head N={n}", k=256)


@pytest.mark.parametrize("precision,tol", [("highest", 2e-6), ("high", 4e-3), ("medium", 1e-2)])
def test_float32_matmul_precision(precision, tol):
    rng = np.random.default_rng(1)
    a = cg.tensor(rng.standard_normal((300, 520)), dtype=cg.float32)
    b = cg.tensor(rng.standard_normal((520, 264)), dtype=cg.float32)
    want = f64(a) @ f64(b)
    cg.set_float32_matmul_precision(precision)
    try:
        got = cg.matmul(a.to("cuda"), b.to("cuda"))
    finally:
        cg.set_float32_matmul_precision("highest")
    assert got.dtype is cg.float32
    err = np.abs(f64(got) - want).max() / np.abs(want).max()
    assert err < tol, f"{precision}: relative error {err:.2e}"


@pytest.mark.parametrize("name", ["linear", "mlp_gelu_residual"])
def test_high_precision_linear_forward_and_backward_on_tf32(name):
    """fp32 layers at "high": every GEMM (forward epilogues, the input gradient with its K-major
    weight copy, the weight gradient with both operands copied) runs TF32: values and every
    gradient within TF32 error of float64."""
    rng = np.random.default_rng(3)
    shape, fin, hid, fout = (6, 40, 264), 264, 520, 264
    args = [leaf(rng, s, cg.float32, "cuda") for s in (shape, (hid, fin), (hid,), (fout, hid), (fout,), shape[:-1] + (fout,))]
    ref = [as_f64_leaf(a) for a in args]
    FNS[name](*ref).square().sum().backward()
    cg.set_float32_matmul_precision("high")
    try:
        FNS[name](*args).square().sum().backward()
    finally:
        cg.set_float32_matmul_precision("highest")
    for a, r in zip(args, ref):
        if r.grad is None:
            continue
        got, want = f64(a.grad), r.grad.numpy()
        assert not np.isnan(got).any()
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
        assert err < 1e-2, f"{name}: gradient of {tuple(a.shape)}: relative error {err:.2e}"


def test_split_k_weight_gradient_workspace_comes_from_the_caching_allocator():
    """A weight gradient with few output tiles and a long K splits; its fp32 workspace is an
    allocator block (counted in the allocator's stats), and the result is right."""
    from cutegrad.allocator import get_allocator
    rng = np.random.default_rng(2)
    g = cg.tensor(rng.standard_normal((8192, 256)), dtype=cg.float32).to(cg.bfloat16).to("cuda")
    x = cg.tensor(rng.standard_normal((8192, 256)), dtype=cg.float32).to(cg.bfloat16).to("cuda")
    from cutegrad.dispatch import kernel
    from cutegrad.device import CUDA
    alloc = get_allocator(0)
    before = alloc.memory_stats()["allocation.all.allocated"]
    gw = kernel("linear_weight_grad").impl[CUDA](g, x, cg.float32, None)
    after = alloc.memory_stats()["allocation.all.allocated"]
    assert after - before >= 2, "the split-K workspace did not come from the caching allocator"
    assert_close(gw, f64(g).T @ f64(x), cg.bfloat16, "split-K weight gradient", k=8192)


def test_split_k_captures_with_its_workspace_from_the_graph_pool():
    """A split-K weight gradient inside a CUDA graph: the workspace is taken from the capture's
    private pool (no cudaMallocAsync), and replays with new data give new, right results."""
    import cutegrad.graphs as graphs
    from cutegrad import _C
    from cutegrad.dispatch import kernel
    from cutegrad.device import CUDA
    _C.load_kernels()
    rng = np.random.default_rng(7)
    g = cg.zeros(8192, 256, dtype=cg.bfloat16, device="cuda")
    x = cg.zeros(8192, 256, dtype=cg.bfloat16, device="cuda")
    wgrad = kernel("linear_weight_grad").impl[CUDA]
    wgrad(g, x, cg.float32, None)  # warm-up outside the capture
    graph = graphs.CUDAGraph()
    with graphs.graph(graph):
        gw = wgrad(g, x, cg.float32, None)
    for trial in range(2):
        g.copy_(cg.tensor(rng.standard_normal((8192, 256)), dtype=cg.float32).to(cg.bfloat16).to("cuda"))
        x.copy_(cg.tensor(rng.standard_normal((8192, 256)), dtype=cg.float32).to(cg.bfloat16).to("cuda"))
        graph.replay()
        cg.cuda.synchronize()
        assert_close(gw, f64(g).T @ f64(x), cg.bfloat16, f"replay {trial}", k=8192)


def test_capture_and_replay_of_a_fused_step():
    """mlp_gelu forward + backward captured once, replayed with new input data."""
    import cutegrad.graphs as graphs
    rng = np.random.default_rng(3)
    dt = cg.bfloat16
    w1, b1 = leaf(rng, (512, 128), dt, "cuda", 0.1), leaf(rng, (512,), dt, "cuda")
    w2, b2 = leaf(rng, (128, 512), dt, "cuda", 0.05), leaf(rng, (128,), dt, "cuda")
    x = cg.zeros(64, 128, dtype=dt, device="cuda")
    from cutegrad import _C
    _C.load_kernels()

    def step():
        for p in (w1, b1, w2, b2):
            p.grad = None
        y = F.mlp_gelu(x, w1, b1, w2, b2, residual=x)
        y.float().square().sum().backward()
        return y

    step()  # warm-up outside the capture
    g = graphs.CUDAGraph()
    with graphs.graph(g):
        y = step()
        grads = [p.grad for p in (w1, w2)]
    for trial in range(3):
        host = rng.standard_normal((64, 128))
        x.copy_(cg.tensor(host, dtype=cg.float32).to(dt).to("cuda"))
        g.replay()
        cg.cuda.synchronize()
        ref = [as_f64_leaf(t) for t in (w1, b1, w2, b2)]
        xr = cg.tensor(f64(x), dtype=cg.float64)
        yr = F.mlp_gelu(xr, *ref, residual=xr)
        yr.square().sum().backward()
        assert_close(y, f64(yr), dt, f"replay {trial}: output", k=512)
        assert_close(grads[0], f64(ref[0].grad), dt, f"replay {trial}: fc1 weight gradient", k=64)
        assert_close(grads[1], f64(ref[2].grad), dt, f"replay {trial}: fc2 weight gradient", k=64)


torch = pytest.importorskip("torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_matches_torch_on_the_gpu():
    rng = np.random.default_rng(4)
    shapes = [(8, 128, 256), (1024, 256), (512, 1024)]
    for xs, (hid, fout) in zip(shapes, [(1024, 256), (512, 10), (768, 1024)]):
        fin = xs[-1]
        xv, w1v, b1v = rng.standard_normal(xs), rng.standard_normal((hid, fin)) / 16, rng.standard_normal(hid)
        w2v, b2v = rng.standard_normal((fout, hid)) / 16, rng.standard_normal(fout)
        ours = [cg.tensor(v, dtype=cg.float32).to(cg.bfloat16).to("cuda").requires_grad_()
                for v in (xv, w1v, b1v, w2v, b2v)]
        theirs = [torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).cuda().requires_grad_()
                  for v in (xv, w1v, b1v, w2v, b2v)]
        y = F.mlp_gelu(*ours)
        ty = torch.nn.functional.linear(torch.nn.functional.gelu(
            torch.nn.functional.linear(theirs[0], theirs[1], theirs[2]), approximate="tanh"), theirs[3], theirs[4])
        np.testing.assert_allclose(f64(y), ty.double().cpu().detach().numpy(), rtol=3e-2, atol=3e-2)
        y.float().sum().backward()
        ty.float().sum().backward()
        for a, t in zip(ours, theirs):
            want = t.grad.double().cpu().numpy()
            err = np.abs(f64(a.grad) - want).max() / max(np.abs(want).max(), 1.0)
            assert err < 3e-2, f"gradient differs from torch: {err:.2e}"
