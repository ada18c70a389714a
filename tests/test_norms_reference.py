"""The NumPy model of the CuTeDSL norms (kernels/reference/norms.py) against a
float64 reference: the kernels' tiling and summation order give float32-accurate
results for every specialized row length, odd row counts and several CTA counts."""
import os
import sys

import numpy as np
import pytest

from norms_loading import load_norms_module  # noqa: E402

model = load_norms_module("reference")

ml_dtypes = pytest.importorskip("ml_dtypes")


def _as(a, dtype):
    return a.astype(ml_dtypes.bfloat16).astype(np.float64) if dtype == "bf16" else a.astype(np.float32).astype(np.float64)


def _ref_forward(x, res, w, b, eps, kind):
    s = x + (res if res is not None else 0.0)
    mean = s.mean(1, keepdims=True) if kind == "layer" else np.zeros((len(s), 1))
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(1, keepdims=True) + eps)
    y = (s - mean) * rstd * w + (b if kind == "layer" else 0.0)
    return y, s, mean[:, 0], rstd[:, 0]


def _ref_backward(dy, s, dres, w, eps, kind):
    n = s.shape[1]
    mean = s.mean(1, keepdims=True) if kind == "layer" else np.zeros((len(s), 1))
    rstd = 1.0 / np.sqrt(((s - mean) ** 2).mean(1, keepdims=True) + eps)
    xhat = (s - mean) * rstd
    g = dy * w
    mg = g.mean(1, keepdims=True) if kind == "layer" else 0.0
    ds = rstd * (g - mg - xhat * (g * xhat).sum(1, keepdims=True) / n)
    if dres is not None:
        ds = ds + dres
    return ds, (dy * xhat).sum(0), dy.sum(0)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n,rows,dtypes", [(128, 37, ("bf16", "fp32", "bf16")), (768, 19, ("bf16", "fp32", "bf16")),
                                           (256, 5, ("fp32", "", "fp32")), (384, 33, ("bf16", "bf16", "bf16")),
                                           (2048, 3, ("fp32", "fp32", "fp32")), (512, 1, ("fp32", "", "bf16"))])
def test_forward_model_matches_float64(kind, n, rows, dtypes):
    rng = np.random.default_rng(n + rows)
    x = _as(rng.normal(0.3, 2.0, (rows, n)), dtypes[0])
    res = _as(rng.normal(-0.5, 1.0, (rows, n)), dtypes[1]) if dtypes[1] else None
    w = _as(rng.normal(1.0, 0.2, n), "fp32")
    b = _as(rng.normal(0.0, 0.2, n), "fp32")
    y, s, mean, rstd = model.forward(x, res, w, b, 1e-5, kind, dtypes)
    ry, rs, rmean, rrstd = _ref_forward(x, res, w, b, 1e-5, kind)
    tol = 1e-2 if dtypes[2] == "bf16" else 2e-5
    np.testing.assert_allclose(y, ry, rtol=tol, atol=tol)
    np.testing.assert_allclose(s, rs, rtol=1e-2 if (dtypes[1] or dtypes[0]) == "bf16" else 1e-6, atol=1e-6)
    np.testing.assert_allclose(rstd, rrstd, rtol=2e-5)
    if kind == "layer":
        np.testing.assert_allclose(mean, rmean, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("n,rows,dtypes,partial_rows", [(128, 37, ("fp32", "bf16"), 3), (768, 19, ("fp32", "bf16"), 7),
                                                        (256, 64, ("fp32", "fp32"), 1), (384, 9, ("bf16", "bf16"), 9),
                                                        (2048, 5, ("fp32", "fp32"), 2)])
@pytest.mark.parametrize("with_dres", [False, True])
def test_backward_model_matches_float64(kind, n, rows, dtypes, partial_rows, with_dres):
    rng = np.random.default_rng(n * 7 + rows)
    s = _as(rng.normal(0.2, 1.5, (rows, n)), dtypes[0])
    dy = _as(rng.normal(0.0, 1.0, (rows, n)), dtypes[1])
    dres = _as(rng.normal(0.0, 1.0, (rows, n)), dtypes[0]) if with_dres else None
    w = _as(rng.normal(1.0, 0.3, n), "fp32")
    _, _, mean, rstd = model.forward(s, None, w, w, 1e-5, kind, (dtypes[0], "", "fp32"))
    ds, dw, db, dx_sum = model.backward(dy, s, dres, w, mean, rstd, kind, dtypes, partial_rows)
    rds, rdw, rdb = _ref_backward(dy, s, dres, w, 1e-5, kind)
    np.testing.assert_allclose(ds, rds, rtol=1e-4, atol=1e-4)
    # dx is ds as stored in x's dtype (s's here: no second output); its column sum in float64
    rdx_sum = _as(ds.astype(np.float64), dtypes[0]).sum(0)
    np.testing.assert_allclose(dx_sum, rdx_sum, rtol=1e-4, atol=1e-4 * np.sqrt(rows))
    np.testing.assert_allclose(dx_sum, rds.sum(0), rtol=1e-2, atol=1e-2 * np.sqrt(rows))
    np.testing.assert_allclose(dw, rdw, rtol=1e-4, atol=1e-4 * np.sqrt(rows))
    if kind == "layer":
        np.testing.assert_allclose(db, rdb, rtol=1e-4, atol=1e-4 * np.sqrt(rows))
    else:
        assert db is None


@pytest.mark.parametrize("second", ["bf16", "fp32"])
def test_dx_sum_is_the_column_sum_of_dx_as_stored_in_the_branch_dtype(second):
    rng = np.random.default_rng(5)
    rows, n = 41, 256
    s = _as(rng.normal(0.0, 1.0, (rows, n)), "fp32")
    dy = _as(rng.normal(0.0, 1.0, (rows, n)), "bf16")
    w = _as(rng.normal(1.0, 0.3, n), "fp32")
    _, _, mean, rstd = model.forward(s, None, w, w, 1e-5, "layer", ("fp32", "", "fp32"))
    dtypes = ("fp32", "bf16", second)
    ds, _, _, dx_sum = model.backward(dy, s, None, w, mean, rstd, "layer", dtypes, 3)
    stored = _as(ds.astype(np.float64), second)  # the dx tensor x receives
    np.testing.assert_allclose(dx_sum, stored.sum(0), rtol=1e-5, atol=1e-5 * np.sqrt(rows))
    if second == "bf16":  # the sum is of the rounded values, not of float32 ds
        assert not np.array_equal(dx_sum, model._param_sum(ds, 4, 3))


def test_param_sums_cover_every_row_once_for_any_cta_count():
    rng = np.random.default_rng(0)
    terms = rng.integers(-8, 8, (53, 128)).astype(np.float32)  # integer sums are exact in any order
    for partial_rows in (1, 2, 5, 7, 20):
        np.testing.assert_array_equal(model._param_sum(terms, 8, partial_rows), terms.sum(0))


def test_butterfly_row_sum_is_exact_on_integers_and_every_lane_agrees():
    rng = np.random.default_rng(1)
    a = rng.integers(-100, 100, (4, 768)).astype(np.float32)
    vec, tpr, vpt, _ = model.row_tiling(768, ("bf16",))
    np.testing.assert_array_equal(model.row_sum(a, vec, tpr, vpt), a.sum(1))
