"""The NumPy model of the embedding backward's large index sort
(kernels/reference/index_sort.py, kernels/cuda/index.cu): chunk sorts plus merge
passes give the stable order of (row, position) for every length, with odd
tails and out-of-range rows, in the launch count bench.launches charges."""
import importlib.util
import os

import numpy as np
import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("index_sort_model",
                                               os.path.join(_ROOT, "kernels", "reference", "index_sort.py"))
model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model)


@pytest.mark.parametrize("n,rows", [(1, 7), (4096, 3), (4097, 50304), (8193, 4096), (12305, 17),
                                    (3 * 4096, 1 << 20), (20000, 2), (70001, 50304)])
def test_large_sort_is_the_stable_order_of_rows(n, rows, rng):
    hot = rng.integers(0, rows, size=max(1, n // 50))
    index = np.where(rng.random(n) < 0.6, rng.choice(hot, size=n), rng.integers(-2, rows + 2, size=n))
    perm, sorted_index, launches = model.large_sort(index, rows)
    row = np.where((index < 0) | (index >= rows), rows, index)
    expected = np.argsort(row, kind="stable")
    np.testing.assert_array_equal(perm, expected)
    np.testing.assert_array_equal(sorted_index, index[expected])
    assert launches == 2 + int(np.ceil(np.log2(-(-n // model.CHUNK)))) if n > model.CHUNK else launches == 2


def test_merge_pass_places_each_key_after_the_smaller_keys_of_its_partner_run():
    keys = np.array([1, 4, 9, 2, 3, 10, 5], dtype=np.uint64)  # runs of 3: [1 4 9] [2 3 10] [5]
    np.testing.assert_array_equal(model.merge_pass(keys, 3), np.array([1, 2, 3, 4, 9, 10, 5], dtype=np.uint64))


def test_sort_launches_follow_the_kernel_choice():
    assert model.sort_launches(8192, 50304) == 1  # 13 + 16 bits: the one-block bitonic sort
    assert model.sort_launches(6000, 1 << 20) == 3  # 21 + 13 bits > 31: chunks 2, one merge pass, unpack
    assert model.sort_launches(8193, 50304) == 4
    assert model.sort_launches(70001, 50304) == 7
