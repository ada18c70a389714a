"""Reductions against a float64 NumPy reference: every dim spec (None, int,
negative, tuple), keepdim, odd sizes and size-1 dims, every float dtype."""
import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, TOLERANCE, rand, tensor, f64, assert_close


def _dim_specs(ndim):
    specs = [None]
    if ndim:
        specs += [0, -1, ndim - 1]
    if ndim >= 2:
        specs += [(0, -1), (-2,)]
    if ndim >= 3:
        specs += [(0, 2), (2, 0, 1)]
    return specs


def _np_axis(dim):
    return dim if dim is None or isinstance(dim, tuple) else (dim,)


SHAPES = [(), (1,), (7,), (3, 1), (1, 5), (3, 5), (2, 3, 5), (4, 1, 3)]


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    r = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return r if keepdims else np.squeeze(r, axis=axis if axis is not None else tuple(range(x.ndim)))


REDUCTIONS = {
    "sum": (cg.sum, lambda x, ax, k: np.sum(x, axis=ax, keepdims=k)),
    "mean": (cg.mean, lambda x, ax, k: np.mean(x, axis=ax, keepdims=k)),
    "amax": (cg.amax, lambda x, ax, k: np.max(x, axis=ax, keepdims=k)),
    "amin": (cg.amin, lambda x, ax, k: np.min(x, axis=ax, keepdims=k)),
    "prod": (cg.prod, lambda x, ax, k: np.prod(x, axis=ax, keepdims=k)),
    "var": (cg.var, lambda x, ax, k: np.var(x, axis=ax, keepdims=k, ddof=1)),
    "std": (cg.std, lambda x, ax, k: np.std(x, axis=ax, keepdims=k, ddof=1)),
    "logsumexp": (cg.logsumexp, _logsumexp),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(REDUCTIONS))
def test_reduction_matches_float64_reference(name, dtype):
    fn, ref = REDUCTIONS[name]
    rng = np.random.default_rng(len(name) * 31)
    for shape in SHAPES:
        lo = 0.5 if name == "prod" else -2.0
        x = rand(rng, shape, dtype, lo, 2.0)
        for dim in _dim_specs(len(shape)):
            if name == "logsumexp" and dim is None:
                continue  # logsumexp requires dim, as in torch
            if name in ("prod",) and isinstance(dim, tuple):
                continue  # torch.prod takes a single dim
            for keepdim in (False, True):
                if name in ("var", "std"):
                    n = np.prod([shape[d] for d in (range(len(shape)) if dim is None else
                                                    np.atleast_1d(dim))]) if shape else 1
                    if n < 2:
                        continue
                out = fn(tensor(x, dtype), dim, keepdim=keepdim)
                assert out.dtype is dtype, f"{name} dim={dim}"
                want = ref(x, _np_axis(dim), keepdim)
                rtol, atol = TOLERANCE[dtype]
                if dtype in (cg.float16, cg.bfloat16) and name in ("var", "std", "prod"):
                    rtol *= 2
                assert_close(out, want, dtype, rtol=rtol, atol=atol * 4, what=f"{name}{shape} dim={dim} k={keepdim}")


def test_sum_of_integers_is_int64_and_mean_rejects_integers():
    x = cg.tensor([[1, 2], [3, 4]], dtype=cg.int32)
    assert cg.sum(x).dtype is cg.int64 and cg.sum(x).item() == 10
    assert cg.sum(cg.tensor([True, True, False])).item() == 2
    assert cg.sum(x, dtype=cg.float64).dtype is cg.float64
    with pytest.raises(RuntimeError, match="floating point"):
        cg.mean(x)
    assert cg.mean(x, dtype=cg.float32).item() == 2.5


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + (cg.int64,), ids=str)
@pytest.mark.parametrize("op", ["max", "min"])
def test_max_min_with_dim_return_values_and_first_index(op, dtype):
    rng = np.random.default_rng(4)
    for shape in [(7,), (3, 5), (2, 3, 5), (4, 1, 3)]:
        x = rng.integers(-3, 4, size=shape).astype(np.float64)  # ties: the first index wins, as in torch
        t = tensor(x, dtype)
        for dim in range(-len(shape), len(shape)):
            for keepdim in (False, True):
                res = getattr(cg, op)(t, dim, keepdim=keepdim)
                values, indices = res
                assert res.values is values and res.indices is indices
                want_v = getattr(np, op)(x, axis=dim, keepdims=keepdim)
                want_i = getattr(np, "arg" + op)(x, axis=dim)
                if keepdim:
                    want_i = np.expand_dims(want_i, dim)
                assert values.dtype is dtype and indices.dtype is cg.int64
                np.testing.assert_array_equal(f64(values), want_v)
                np.testing.assert_array_equal(indices.numpy(), want_i)
        assert getattr(cg, op)(t).shape == ()
        assert f64(getattr(cg, op)(t)) == getattr(np, op)(x)


def test_max_method_with_tensor_argument_is_maximum():
    a, b = cg.tensor([1.0, 5.0]), cg.tensor([3.0, 2.0])
    assert a.max(b).tolist() == [3.0, 5.0]
    assert a.min(b).tolist() == [1.0, 2.0]


@pytest.mark.parametrize("op", ["argmax", "argmin"])
def test_argmax_argmin(op):
    rng = np.random.default_rng(2)
    x = rng.integers(-3, 4, size=(3, 4, 5)).astype(np.float32)
    t = cg.tensor(x)
    np_fn = getattr(np, op)
    assert getattr(cg, op)(t).item() == np_fn(x)
    assert getattr(cg, op)(t).shape == ()
    for dim in (0, 1, -1):
        np.testing.assert_array_equal(getattr(cg, op)(t, dim).numpy(), np_fn(x, axis=dim))
        np.testing.assert_array_equal(getattr(t, op)(dim, keepdim=True).numpy(),
                                      np.expand_dims(np_fn(x, axis=dim), dim))
    assert getattr(cg, op)(t, keepdim=True).shape == (1, 1, 1)


def test_var_std_unbiased_and_correction():
    rng = np.random.default_rng(1)
    x = rand(rng, (4, 6))
    t = tensor(x)
    assert_close(cg.var(t, 1, unbiased=False), np.var(x, axis=1))
    assert_close(cg.std(t, 0, correction=0), np.std(x, axis=0))
    assert_close(cg.var(t, correction=2), np.var(x, ddof=2))
    assert_close(t.std(), np.std(x, ddof=1))


def test_logsumexp_stable_for_large_and_infinite_inputs():
    t = cg.tensor([[1000.0, 1000.0], [-float("inf"), -float("inf")], [-float("inf"), 0.0]], dtype=cg.float64)
    got = f64(cg.logsumexp(t, 1))
    np.testing.assert_allclose(got[0], 1000.0 + np.log(2.0))
    assert got[1] == -np.inf
    assert got[2] == 0.0


def test_any_all():
    x = cg.tensor([[0, 1, 0], [0, 0, 0]])
    assert cg.any(x).item() is True and cg.all(x).item() is False
    assert cg.any(x, 1).tolist() == [True, False]
    assert cg.all(cg.tensor([[True, True]]), 1, keepdim=True).tolist() == [[True]]


def test_reduction_dim_errors():
    t = cg.zeros(2, 3)
    with pytest.raises(IndexError, match="Dimension out of range"):
        cg.sum(t, 2)
    with pytest.raises(RuntimeError, match="appears multiple times"):
        cg.sum(t, (0, -2))
    with pytest.raises(IndexError, match="Dimension out of range"):
        cg.max(t, -3)


def test_sum_of_empty_and_mean_of_empty():
    t = cg.zeros(0, 3)
    assert cg.sum(t).item() == 0.0
    assert cg.sum(t, 0).tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(cg.mean(t).item())


@pytest.mark.parametrize("dim", [0, -1])
def test_reductions_of_a_0_dim_tensor_along_dim(dim):
    x = cg.tensor(3.0, requires_grad=True)
    for out in (x.sum(dim), x.mean(dim), cg.amax(x, dim), cg.amin(x, dim), x.prod(dim), cg.logsumexp(x, dim),
                x.max(dim).values, x.min(dim, keepdim=True).values, x.std(dim, correction=0) + 3.0):
        assert out.shape == () and out.item() == 3.0
    assert x.max(dim).indices.item() == 0 and x.argmax(dim).item() == 0
    x.max(dim).values.backward()
    assert x.grad.item() == 1.0
    with pytest.raises(IndexError, match="Dimension out of range"):
        x.sum(1)
