"""The embedding backward's index_add along dim 0 on a GPU (`-m gpu`): the one-block
bitonic sort (n <= 8192 and (row, position) in 31 bits) and the chunk sort plus
merge passes (longer indices, huge row counts; kernels/reference/index_sort.py)
against the float64 CPU backend, with heavy duplicates, bit-identical reruns,
and out-of-range indices reported."""
import numpy as np
import pytest

import cutegrad
from cutegrad import dtypes as dt
from cutegrad.device import CUDA
from test_cuda_ops import _SKIP, check, cuda_of, impl, rand, values

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]


@pytest.mark.parametrize("n,rows,cols", [(1, 7, 5), (3, 2, 1), (4096, 36, 128), (8192, 50304, 64),
                                         (8191, 4096, 33), (8193, 4096, 16), (6000, 1 << 20, 8),
                                         (12305, 4096, 16), (70001, 50304, 4), (100000, 300, 3)])
def test_sorted_run_sums_match_the_cpu_and_repeat_bit_for_bit(n, rows, cols):
    rng = np.random.default_rng(n + rows)
    base = cutegrad.zeros(rows, cols)
    hot = rng.integers(0, rows, size=max(1, n // 50))  # a few rows take most of the tokens
    idx = cutegrad.tensor(np.where(rng.random(n) < 0.7, rng.choice(hot, size=n), rng.integers(0, rows, size=n)))
    src = rand(rng, (n, cols), dt.float32, -1, 1)
    check("index_add", base, 0, idx, src, scale=10.0)
    runs = [values(impl("index_add", CUDA)(cuda_of(base), 0, cuda_of(idx), cuda_of(src))) for _ in range(2)]
    np.testing.assert_array_equal(runs[1], runs[0])


def test_out_of_range_index_is_reported():
    base = cutegrad.zeros(10, 4).to("cuda")
    idx = cutegrad.tensor([1, 12, 3, -2, 1]).to("cuda")
    src = cutegrad.ones(5, 4).to("cuda")
    with pytest.raises(IndexError):
        out = impl("index_add", CUDA)(base, 0, idx, src)
        cutegrad.cuda.synchronize()
        out.cpu()
