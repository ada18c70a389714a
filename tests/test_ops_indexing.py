"""Integer-array and mask indexing, indexed assignment, gather/scatter_add,
index_select/index_add and one_hot against NumPy."""
import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, f64


def _base(shape=(4, 5, 6), dtype=cg.float32):
    arr = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    return arr, cg.tensor(arr, dtype=dtype)


ADVANCED_KEYS = [
    lambda: [0, 2, 3],
    lambda: np.array([[1, 0], [3, -1]]),
    lambda: ([0, 1], [4, 2]),
    lambda: (slice(None), [0, 0, 4]),
    lambda: (slice(1, 3), [1, 2], [5, 0]),
    lambda: ([1, 2], slice(None), [0, 3]),  # separated advanced indices: result dims go first
    lambda: (Ellipsis, [1, -1]),
    lambda: (None, [2, 1]),
    lambda: np.array([True, False, True, True]),
    lambda: (slice(None), np.array([True, False, False, True, True])),
    lambda: np.arange(120).reshape(4, 5, 6) % 7 == 0,
    lambda: (0, [1, 1, 1], slice(None, None, 2)),
]


@pytest.mark.parametrize("make_key", ADVANCED_KEYS, ids=range(len(ADVANCED_KEYS)))
def test_advanced_getitem_matches_numpy(make_key):
    arr, t = _base()
    key = make_key()
    want = arr[key]
    np.testing.assert_array_equal(f64(t[key]), want)

    def as_tensors(k):
        if isinstance(k, tuple):
            return tuple(as_tensors(v) for v in k)
        if isinstance(k, (list, np.ndarray)):
            return cg.tensor(np.asarray(k))
        return k
    got = t[as_tensors(key)]
    np.testing.assert_array_equal(f64(got), want)
    assert got._storage is not t._storage  # advanced indexing copies


def test_index_with_int32_and_uint8_mask():
    arr, t = _base((5, 3))
    np.testing.assert_array_equal(f64(t[cg.tensor([4, 0], dtype=cg.int32)]), arr[[4, 0]])
    mask = cg.tensor([1, 0, 1, 0, 0], dtype=cg.uint8)
    np.testing.assert_array_equal(f64(t[mask]), arr[[0, 2]])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64,), ids=str)
def test_advanced_setitem(dtype):
    arr, t = _base((4, 5), dtype)
    v0 = t._version
    t[[0, 2], [1, 3]] = 7.0
    arr[[0, 2], [1, 3]] = 7.0
    t[cg.tensor([True, False, False, True])] = cg.tensor([9.0, 8.0, 7.0, 6.0, 5.0], dtype=dtype)
    arr[[True, False, False, True]] = [9.0, 8.0, 7.0, 6.0, 5.0]
    t[:, [4]] = -1.0
    arr[:, [4]] = -1.0
    t[t > 15] = 0.0
    arr[arr > 15] = 0.0
    np.testing.assert_array_equal(f64(t), arr)
    assert t._version > v0


def test_basic_setitem_broadcasts_and_casts():
    arr, t = _base((3, 4))
    t[1] = cg.tensor([1, 2, 3, 4])  # int64 value into float32 tensor
    arr[1] = [1, 2, 3, 4]
    t[:, 0] = 5
    arr[:, 0] = 5
    t[..., -1:] = cg.tensor([[0.5], [1.5], [2.5]])
    arr[..., -1:] = [[0.5], [1.5], [2.5]]
    t[2, 1:3] = [10.0, 11.0]
    arr[2, 1:3] = [10.0, 11.0]
    np.testing.assert_array_equal(f64(t), arr)
    assert t.dtype is cg.float32


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gather_matches_take_along_axis(dtype):
    rng = np.random.default_rng(0)
    arr = rng.integers(-9, 9, (3, 5, 4)).astype(np.float64)
    t = cg.tensor(arr, dtype=dtype)
    for dim in (0, 1, 2, -1):
        shape = list(arr.shape)
        shape[dim] = 3
        idx = rng.integers(0, arr.shape[dim], shape)
        np.testing.assert_array_equal(f64(cg.gather(t, dim, cg.tensor(idx))), np.take_along_axis(arr, idx, dim))
    # index smaller than input in non-gathered dims
    idx = rng.integers(0, 5, (2, 7, 1))
    got = t.gather(1, cg.tensor(idx))
    np.testing.assert_array_equal(f64(got), np.take_along_axis(arr[:2, :, :1], idx, 1))


def test_scatter_add_accumulates_duplicates():
    base = np.zeros((3, 4))
    idx = np.array([[0, 1, 1, 3], [2, 2, 2, 2]])
    src = np.arange(8.0).reshape(2, 4)
    out = cg.scatter_add(cg.tensor(base), 1, cg.tensor(idx), cg.tensor(src))
    want = base.copy()
    for i in range(2):
        for j in range(4):
            want[i, idx[i, j]] += src[i, j]
    np.testing.assert_array_equal(f64(out), want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64,), ids=str)
def test_index_select_and_index_add(dtype):
    rng = np.random.default_rng(1)
    arr = rng.integers(-9, 9, (4, 6)).astype(np.float64)
    t = cg.tensor(arr, dtype=dtype)
    idx = np.array([5, 0, 0, 3])
    for dim in (0, 1, -1):
        i = idx % arr.shape[dim]
        np.testing.assert_array_equal(f64(cg.index_select(t, dim, cg.tensor(i))), np.take(arr, i, axis=dim))
    src = rng.integers(-9, 9, (4, 4)).astype(np.float64)
    got = cg.index_add(t, 1, cg.tensor(idx), cg.tensor(src, dtype=dtype))
    want = arr.copy()
    np.add.at(want, (slice(None), idx), src)
    np.testing.assert_array_equal(f64(got), want)
    assert got.dtype is dtype


def test_one_hot():
    idx = np.array([[0, 3], [2, 2]])
    out = cg.one_hot(cg.tensor(idx), 5)
    assert out.dtype is cg.int64 and out.shape == (2, 2, 5)
    np.testing.assert_array_equal(out.numpy(), np.eye(5, dtype=np.int64)[idx])
    assert cg.one_hot(cg.tensor([1, 0])).shape == (2, 2)
    assert cg.one_hot(cg.tensor(2), 3).tolist() == [0, 0, 1]


def test_negative_indices_in_index_tensors():
    arr, t = _base((5,))
    np.testing.assert_array_equal(f64(t[cg.tensor([-1, -5, 0])]), arr[[-1, -5, 0]])
    np.testing.assert_array_equal(f64(t[[-2]]), arr[[-2]])


def test_empty_list_and_0_dim_tensor_indices():
    arr, t = _base()
    assert t[:, []].shape == (4, 0, 6)
    np.testing.assert_array_equal(f64(t[cg.tensor(1)]), arr[1])
    np.testing.assert_array_equal(f64(t[cg.tensor(2), 1:3, cg.tensor(0, dtype=cg.int32)]), arr[2, 1:3, 0])
    t[[]] = 5.0  # writes nothing
    np.testing.assert_array_equal(f64(t), arr)
