"""Row sums and means over the last dimension on a GPU (`-m gpu`): the vectorized
warp-per-row kernel (contiguous rows of a 16-byte multiple, 16-byte aligned) and
the general kernel it falls back to (odd lengths, offsets, strided rows), against
float64 NumPy, outputs poisoned with NaN, bit-identical reruns."""
import numpy as np
import pytest

import cutegrad
from cutegrad import dtypes as dt
from test_cuda_ops import _SKIP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]
TOL = {dt.float32: 1e-5, dt.bfloat16: 1e-5, dt.float16: 1e-5}  # inputs are exact in their dtype; fp32 sums


@pytest.fixture(autouse=True)
def poisoned_outputs():
    from cutegrad.backends import cuda as backend
    backend.set_poison_outputs(True)
    yield
    backend.set_poison_outputs(False)


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16, dt.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("shape", [(8192, 768), (20480, 256), (3, 8), (5, 1000), (7, 13), (1, 4096), (2, 3, 64)])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_row_reduction_matches_float64(dtype, shape, op):
    rng = np.random.default_rng(sum(shape))
    host = cutegrad.tensor(rng.uniform(-2, 2, size=shape)).to(dtype)
    ref = getattr(host.to(dt.float64).numpy(), op)(axis=-1)
    x = host.to("cuda")
    out = getattr(x, op)(-1, dtype=dt.float32) if op == "sum" else x.float().mean(-1)
    got = out.cpu().to(dt.float64).numpy()
    np.testing.assert_allclose(got, ref, rtol=TOL[dtype], atol=TOL[dtype] * np.sqrt(shape[-1]))
    again = (getattr(x, op)(-1, dtype=dt.float32) if op == "sum" else x.float().mean(-1)).cpu().numpy()
    np.testing.assert_array_equal(again, out.cpu().numpy())


@pytest.mark.parametrize("dtype", [dt.float32, dt.bfloat16], ids=lambda d: d.name)
def test_views_take_the_general_kernel_and_stay_right(dtype):
    rng = np.random.default_rng(3)
    host = cutegrad.tensor(rng.uniform(-1, 1, size=(64, 520))).to(dtype)
    x = host.to("cuda")
    for view, ref in ((x[:, 1:513], host[:, 1:513]), (x[::2, :512], host[::2, :512]), (x[:, :512], host[:, :512])):
        got = view.sum(-1, dtype=dt.float32).cpu().to(dt.float64).numpy()
        np.testing.assert_allclose(got, ref.to(dt.float64).numpy().sum(-1), rtol=1e-5, atol=1e-4)
