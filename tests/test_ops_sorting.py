"""sort, argsort, topk, cumsum, flip, nonzero and multinomial against NumPy."""
import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, TOLERANCE, rand, tensor, f64, assert_close


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64, cg.int32), ids=str)
def test_sort_argsort_stable_both_directions(dtype):
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=(4, 7)).astype(np.float64)  # many ties
    t = tensor(x, dtype)
    for dim in (0, 1, -1):
        v, i = cg.sort(t, dim)
        want_i = np.argsort(x, axis=dim, kind="stable")
        np.testing.assert_array_equal(i.numpy(), want_i)
        np.testing.assert_array_equal(f64(v), np.take_along_axis(x, want_i, dim))
        v, i = t.sort(dim, descending=True)
        # stable descending: ties keep their original order
        want_i = np.argsort(-x, axis=dim, kind="stable")
        np.testing.assert_array_equal(i.numpy(), want_i)
        assert v.dtype is dtype and i.dtype is cg.int64
        np.testing.assert_array_equal(cg.argsort(t, dim).numpy(), np.argsort(x, axis=dim, kind="stable"))


def test_sort_places_nan_last_ascending_first_descending():
    t = cg.tensor([2.0, float("nan"), -1.0])
    assert t.sort().indices.tolist() == [2, 0, 1]
    assert t.sort(descending=True).indices.tolist() == [1, 0, 2]


@pytest.mark.parametrize("largest", [True, False])
def test_topk(largest):
    rng = np.random.default_rng(1)
    x = rng.permutation(30).reshape(5, 6).astype(np.float64)  # distinct values
    t = cg.tensor(x)
    for dim in (0, 1):
        for k in (0, 1, 3, x.shape[dim]):
            v, i = cg.topk(t, k, dim, largest=largest)
            order = np.argsort(-x if largest else x, axis=dim)
            want_i = np.take(order, np.arange(k), axis=dim)
            np.testing.assert_array_equal(i.numpy(), want_i)
            np.testing.assert_array_equal(v.numpy(), np.take_along_axis(x, want_i, dim))
    with pytest.raises(RuntimeError, match="out of range"):
        t.topk(7)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cumsum_float(dtype):
    rng = np.random.default_rng(2)
    x = rand(rng, (3, 9, 2), dtype)
    for dim in (0, 1, 2, -2):
        out = cg.cumsum(tensor(x, dtype), dim)
        assert out.dtype is dtype
        rtol, atol = TOLERANCE[dtype]
        assert_close(out, np.cumsum(x, axis=dim), dtype, rtol=rtol * 4, atol=atol * 8)


def test_cumsum_integers_and_bool_accumulate_in_int64():
    assert cg.cumsum(cg.tensor([1, 2, 3], dtype=cg.int8), 0).dtype is cg.int64
    assert cg.tensor([True, True, False]).cumsum(0).tolist() == [1, 2, 2]
    assert cg.cumsum(cg.tensor(2.5), 0).shape == ()
    assert cg.cumsum(cg.tensor([1, 2]), 0, dtype=cg.float64).dtype is cg.float64


def test_flip_copies():
    x = np.arange(24.0).reshape(2, 3, 4)
    t = cg.tensor(x)
    np.testing.assert_array_equal(f64(cg.flip(t, (0, 2))), np.flip(x, (0, 2)))
    np.testing.assert_array_equal(f64(t.flip(-1)), np.flip(x, -1))
    f = t.flip(())
    assert f._storage is not t._storage and f.tolist() == t.tolist()


def test_nonzero_and_masked_select():
    x = np.array([[0.0, 1.5, 0.0], [2.0, 0.0, -1.0]])
    t = cg.tensor(x)
    np.testing.assert_array_equal(t.nonzero().numpy(), np.argwhere(x))
    rows, cols = cg.nonzero(t, as_tuple=True)
    assert rows.tolist() == [0, 1, 1] and cols.tolist() == [1, 0, 2]
    np.testing.assert_array_equal(f64(t.masked_select(t > 0)), x[x > 0])
    np.testing.assert_array_equal(f64(cg.masked_select(t, cg.tensor([True, False, True]))),
                                  x[np.broadcast_to([True, False, True], x.shape)])


def test_multinomial_distribution_and_seeding():
    cg.manual_seed(0)
    p = cg.tensor([[0.1, 0.0, 0.6, 0.3], [1.0, 1.0, 0.0, 0.0]])
    draws = cg.multinomial(p, 4000, replacement=True)
    assert draws.shape == (2, 4000) and draws.dtype is cg.int64
    freq = np.bincount(draws.numpy()[0], minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.0, 0.6, 0.3], atol=0.03)
    assert set(draws.numpy()[1].tolist()) == {0, 1}
    no_rep = cg.multinomial(cg.tensor([1.0, 2.0, 3.0, 4.0]), 4)
    assert sorted(no_rep.tolist()) == [0, 1, 2, 3]
    g1, g2 = cg.Generator().manual_seed(3), cg.Generator().manual_seed(3)
    assert cg.multinomial(p, 5, True, generator=g1).tolist() == p.multinomial(5, True, generator=g2).tolist()


@pytest.mark.parametrize("bad,match", [
    (lambda: cg.multinomial(cg.tensor([0.5, -0.1]), 1), "element < 0"),
    (lambda: cg.multinomial(cg.tensor([0.0, 0.0]), 1), "sum of probabilities"),
    (lambda: cg.multinomial(cg.tensor([1.0, 1.0]), 3), "without replacement"),
    (lambda: cg.multinomial(cg.tensor([1.0, 0.0, 0.0]), 2), "non-zero probability"),
    (lambda: cg.multinomial(cg.tensor([1, 2]), 1), "floating point"),
])
def test_multinomial_bad_input(bad, match):
    with pytest.raises(RuntimeError, match=match):
        bad()


def test_norm_variants():
    rng = np.random.default_rng(3)
    x = rand(rng, (3, 4))
    t = tensor(x)
    assert_close(t.norm(), np.linalg.norm(x))
    assert_close(cg.norm(t, 1, dim=1), np.abs(x).sum(1))
    assert_close(cg.norm(t, float("inf"), dim=0), np.abs(x).max(0))
    assert_close(cg.norm(t, 0), np.count_nonzero(x))
    assert_close(cg.norm(t, 3, dim=(0, 1), keepdim=True), (np.abs(x) ** 3).sum(keepdims=True) ** (1 / 3))
    with pytest.raises(RuntimeError, match="floating point"):
        cg.norm(cg.tensor([1, 2]))


def test_isclose_allclose_equal():
    a = cg.tensor([1.0, float("inf"), float("nan"), 2.0])
    b = cg.tensor([1.0 + 1e-7, float("inf"), float("nan"), 2.1])
    assert cg.isclose(a, b).tolist() == [True, True, False, False]
    assert cg.isclose(a, b, equal_nan=True).tolist() == [True, True, True, False]
    assert not cg.allclose(a, b) and cg.allclose(a[:2], b[:2])
    assert cg.equal(a[:1], cg.tensor([1.0])) and not cg.equal(a[:1], a[:2])
