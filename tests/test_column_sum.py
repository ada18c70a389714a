"""The one-launch bias gradient ("column_sum", kernels/cuda/column_sum.cu): the linear family's
backward uses it on the (dry-run) CUDA device, its launch arguments, the persistent zeroed
counters, every fallback to the reduction, and GPU tests (marker gpu) against float64 NumPy."""
import cutegrad as cg
import cutegrad.nn.functional as F
import numpy as np
import pytest
from cutegrad import dtypes as dt
from cutegrad.backends.cuda import column_sum as CS
from cutegrad.device import CUDA
from cutegrad.dispatch import kernel
from gpu_entry_skip import skip_reason


def test_splits_fill_about_two_waves():
    assert CS.column_splits(8192, 768) == 11       # 24 tiles: 264 blocks
    assert CS.column_splits(8192, 3072) == 3       # 96 tiles
    assert CS.column_splits(100, 768) == 1         # too few rows to split
    assert CS.column_splits(1 << 20, 1) == 264
    assert CS.column_splits(0, 5) == 1


def test_linear_bias_gradient_is_one_launch(dry_cuda):
    lin = cg.nn.Linear(96, 768).to("cuda")
    x = cg.randn(64, 128, 96, device="cuda", requires_grad=True)
    dy = cg.randn(64, 128, 768, device="cuda", dtype=cg.bfloat16)
    for step in range(2):
        with cg.autocast("cuda", dtype=cg.bfloat16):
            y = lin(x)
        dry_cuda.reset()
        y.backward(dy)
        names = dry_cuda.names()
        assert names.count("column_sum") == 1 and "reduce" not in names
        args = dry_cuda.calls[names.index("column_sum")][1]
        # bf16 gradient summed over 64 * 128 rows into the fp32 parameter's gradient
        assert args[1] == dt.bfloat16.index and args[3] == dt.float32.index
        assert args[4:7] == (64 * 128, 768, CS.column_splits(64 * 128, 768))
        assert args[7] and args[8]
        if step == 0:
            counters = args[8]
        else:
            # the counters persist (zeroed once, left zeroed by each launch): no fill per step
            assert args[8] == counters and not any("Memset" in w[0] for w in dry_cuda.work)
        lin.zero_grad(set_to_none=True)


def test_small_sums_take_no_workspace(dry_cuda):
    g = cg.randn(10, 33, device="cuda")
    dry_cuda.reset()
    out = kernel("column_sum").impl[CUDA](g, dt.float32)
    assert out.shape == (33,) and dry_cuda.names() == ["column_sum"]
    assert dry_cuda.calls[0][1][6:9] == (1, 0, 0)


def test_fallbacks_to_the_reduction(dry_cuda, monkeypatch):
    impl = kernel("column_sum").impl[CUDA]
    g = cg.randn(4096, 64, device="cuda")
    assert impl(g.t(), dt.float32) is None                      # not contiguous
    assert impl(cg.zeros(4096, 64, device="cuda", dtype=cg.int32), dt.float32) is None
    from cutegrad.cuda import capture_guard
    monkeypatch.setattr(CS, "_counters", {})
    monkeypatch.setattr(capture_guard, "any_capture_underway", lambda: True)
    assert impl(g, dt.float32) is None                          # counters would be made mid-capture
    w = cg.randn(8, 64, device="cuda", requires_grad=True)
    b = cg.zeros(8, device="cuda", requires_grad=True)
    x = cg.randn(4096, 64, device="cuda")
    y = F.linear(x, w, b)
    dy = cg.randn(4096, 8, device="cuda")
    dry_cuda.reset()
    y.backward(dy)
    # column_sum declined before launching anything; the reduction took over
    assert "column_sum" not in dry_cuda.names() and "reduce" in dry_cuda.names()
    assert b.grad.shape == (8,)


# ---- on a GPU ---------------------------------------------------------------------------

_SKIP = skip_reason("column_sum")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
# relative rounding of the output (the inputs are exact: the reference reads the device's values)
OUT_EPS = {dt.bfloat16: 2.0 ** -8, dt.float16: 2.0 ** -11, dt.float32: 0.0, dt.float64: 0.0}


@gpu
@needs_gpu
@pytest.mark.parametrize("in_dtype,out_dtype", [(dt.bfloat16, dt.float32), (dt.bfloat16, dt.bfloat16),
                                                (dt.float16, dt.float32), (dt.float32, dt.float32),
                                                (dt.float64, dt.float64)])
@pytest.mark.parametrize("rows,cols", [(0, 7), (1, 1), (63, 31), (64, 33), (1000, 768), (8193, 2304), (70000, 5)])
def test_gpu_matches_float64(rows, cols, in_dtype, out_dtype):
    rng = np.random.default_rng(rows * 7 + cols)
    g = cg.tensor(rng.standard_normal((rows, cols)), dtype=in_dtype).to("cuda")
    g64 = g.cpu().to(dt.float64).numpy()
    impl = kernel("column_sum").impl[CUDA]
    got = [impl(g, out_dtype).cpu().to(dt.float64).numpy() for _ in range(2)]
    np.testing.assert_array_equal(got[0], got[1])  # deterministic: partials added in a fixed order
    ref = g64.sum(0)
    # accumulation error (fp32 or fp64 adds, at most ~log2 depth of the lanes x splits tree plus
    # the sequential row loop) within 4e-6 (1e-14) of the column's absolute sum
    acc = 1e-14 if dt.float64 in (in_dtype, out_dtype) else 4e-6
    bound = OUT_EPS[out_dtype] * np.abs(ref) + acc * np.abs(g64).sum(0) + 1e-300
    assert got[0].shape == (cols,) and (np.abs(got[0] - ref) <= bound).all()
    entry = next((v for k, v in CS._counters.items() if k[0] == g.device.index), None)
    if entry is not None:
        assert not entry[1].cpu().numpy().any(), "a launch must leave the counters zeroed"


@gpu
@needs_gpu
def test_gpu_linear_bias_gradient_matches_the_cpu():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 300, 64))
    w, b, dy = rng.standard_normal((48, 64)), rng.standard_normal(48), rng.standard_normal((16, 300, 48))
    grads = []
    for dev in ("cpu", "cuda"):
        bt = cg.tensor(b, requires_grad=True, device=dev)
        F.linear(cg.tensor(x, device=dev), cg.tensor(w, device=dev), bt).backward(cg.tensor(dy, device=dev))
        grads.append(bt.grad.cpu().numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12, atol=1e-10)
