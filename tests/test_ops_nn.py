"""nn ops against float64 NumPy: softmax family, cross_entropy in all its
modes, mse_loss, layer_norm, rms_norm, embedding, dropout, attention."""
import numpy as np
import pytest

import cutegrad as cg
from core_harness import FLOAT_DTYPES, TOLERANCE, rand, tensor, f64, assert_close


def np_log_softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 1, 9), (2, 3, 4)], ids=str)
def test_softmax_log_softmax(shape, dtype):
    rng = np.random.default_rng(len(shape))
    x = rand(rng, shape, dtype, -4, 4)
    for dim in range(-len(shape), len(shape)):
        assert_close(cg.softmax(tensor(x, dtype), dim), np.exp(np_log_softmax(x, dim)), dtype)
        assert_close(cg.log_softmax(tensor(x, dtype), dim), np_log_softmax(x, dim), dtype,
                     atol=TOLERANCE[dtype][1] * 4)
    assert_close(tensor(x, dtype).softmax(-1), np.exp(np_log_softmax(x, -1)), dtype)


def test_softmax_with_dtype_argument_and_masked_rows():
    x = cg.tensor([[1.0, float("-inf"), 2.0]], dtype=cg.float16)
    out = cg.softmax(x, -1, dtype=cg.float32)
    assert out.dtype is cg.float32
    e = np.exp([1.0 - 2.0, 0.0])
    np.testing.assert_allclose(f64(out)[0], [e[0] / e.sum(), 0.0, e[1] / e.sum()], rtol=1e-3)
    big = cg.tensor([1e4, 0.0, -1e4])
    assert np.isfinite(f64(cg.log_softmax(big, 0))).all()


def np_cross_entropy(x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """x: (N, C, *); target: (N, *) ints or (N, C, *) probabilities."""
    logp = np_log_softmax(x, 1)
    C = x.shape[1]
    w = np.ones(C) if weight is None else weight
    wshape = (1, C) + (1,) * (x.ndim - 2)
    if target.dtype.kind == "f":
        p = target * (1 - label_smoothing) + label_smoothing / C
        loss = -(logp * p * w.reshape(wshape)).sum(axis=1)
        if reduction == "mean":
            return loss.sum() / loss.size
        return loss.sum() if reduction == "sum" else loss
    valid = target != ignore_index
    safe = np.where(valid, target, 0)
    picked = np.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    wt = w[safe] * valid
    nll = -picked * wt
    smooth = -(logp * w.reshape(wshape)).sum(axis=1) * valid
    loss = (1 - label_smoothing) * nll + label_smoothing / C * smooth
    if reduction == "mean":
        return loss.sum() / wt.sum()
    return loss.sum() if reduction == "sum" else loss


CE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(ignore_index=2),
    dict(ignore_index=1, reduction="none"),
    dict(label_smoothing=0.1),
    dict(label_smoothing=0.2, ignore_index=0, reduction="sum"),
    dict(weight=True),
    dict(weight=True, label_smoothing=0.3),
    dict(weight=True, ignore_index=3, reduction="none"),
]


@pytest.mark.parametrize("dtype", [cg.float32, cg.float64], ids=str)
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 4), (2, 5, 2, 3)], ids=str)
@pytest.mark.parametrize("case", range(len(CE_CASES)))
def test_cross_entropy_class_indices(case, shape, dtype):
    kw = dict(CE_CASES[case])
    rng = np.random.default_rng(case)
    x = rand(rng, shape, dtype, -3, 3)
    tshape = (shape[0],) + shape[2:]
    target = rng.integers(0, shape[1], tshape)
    target.reshape(-1)[0] = kw.get("ignore_index", 0)  # at least one ignored entry when ignoring
    w = rand(rng, (shape[1],), dtype, 0.2, 2.0) if kw.pop("weight", False) else None
    out = cg.cross_entropy(tensor(x, dtype), cg.tensor(target), weight=None if w is None else tensor(w, dtype), **kw)
    want = np_cross_entropy(x, target, w, **kw)
    assert out.dtype is dtype
    assert_close(out, want, dtype, rtol=TOLERANCE[dtype][0] * 5, atol=TOLERANCE[dtype][1] * 5)


def test_cross_entropy_unbatched_input():
    rng = np.random.default_rng(0)
    x = rand(rng, (5,))
    out = cg.cross_entropy(tensor(x), cg.tensor(3))
    assert out.shape == ()
    assert_close(out, -np_log_softmax(x, 0)[3])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
def test_cross_entropy_probability_targets(reduction, smoothing):
    rng = np.random.default_rng(3)
    x = rand(rng, (4, 6, 3))
    p = rng.random((4, 6, 3))
    p /= p.sum(axis=1, keepdims=True)
    out = cg.cross_entropy(tensor(x), tensor(p), reduction=reduction, label_smoothing=smoothing)
    assert_close(out, np_cross_entropy(x, p, reduction=reduction, label_smoothing=smoothing))


def test_cross_entropy_all_ignored_mean_is_nan_like_torch():
    out = cg.cross_entropy(cg.zeros(2, 3), cg.tensor([-100, -100]))
    assert np.isnan(out.item())


def test_nll_loss():
    rng = np.random.default_rng(4)
    x = np_log_softmax(rand(rng, (5, 4)), 1)
    t = np.array([0, 3, 1, 1, 2])
    assert_close(cg.nll_loss(tensor(x), cg.tensor(t)), -x[np.arange(5), t].mean())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction, dtype):
    rng = np.random.default_rng(5)
    a, b = rand(rng, (3, 7), dtype), rand(rng, (3, 7), dtype)
    d = (a - b) ** 2
    want = {"mean": d.mean(), "sum": d.sum(), "none": d}[reduction]
    rtol, atol = TOLERANCE[dtype]
    assert_close(cg.mse_loss(tensor(a, dtype), tensor(b, dtype), reduction=reduction), want, dtype,
                 rtol=rtol * 4, atol=atol * 4)


def np_layer_norm(x, nd, w, b, eps):
    axes = tuple(range(x.ndim - nd, x.ndim))
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,nd", [((7,), 1), ((3, 5), 1), ((2, 3, 9), 1), ((2, 3, 4), 2), ((1, 1), 1)], ids=str)
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm(shape, nd, affine, dtype):
    rng = np.random.default_rng(sum(shape))
    x = rand(rng, shape, dtype, -3, 3)
    ns = shape[len(shape) - nd:]
    w = rand(rng, ns, dtype) if affine else None
    b = rand(rng, ns, dtype) if affine else None
    out = cg.layer_norm(tensor(x, dtype), ns, None if w is None else tensor(w, dtype),
                        None if b is None else tensor(b, dtype), eps=1e-5)
    assert out.dtype is dtype
    rtol, atol = TOLERANCE[dtype]
    assert_close(out, np_layer_norm(x, nd, w, b, 1e-5), dtype, rtol=rtol * 4, atol=atol * 10)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape,nd", [((7,), 1), ((3, 5), 1), ((2, 3, 4), 2)], ids=str)
def test_rms_norm(shape, nd, dtype):
    rng = np.random.default_rng(len(shape) + nd)
    x = rand(rng, shape, dtype, -3, 3)
    ns = shape[len(shape) - nd:]
    w = rand(rng, ns, dtype)
    axes = tuple(range(x.ndim - nd, x.ndim))
    eps = float(np.finfo(np.float32).eps) if dtype is not cg.float64 else 1e-6
    want = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps) * w
    out = cg.rms_norm(tensor(x, dtype), ns, tensor(w, dtype), eps=eps)
    rtol, atol = TOLERANCE[dtype]
    assert_close(out, want, dtype, rtol=rtol * 4, atol=atol * 10)


def test_rms_norm_default_eps_is_finfo_eps_of_input_dtype():
    x = cg.tensor([[1e-4, -1e-4]], dtype=cg.float32)
    eps = float(np.finfo(np.float32).eps)
    want = 1e-4 / np.sqrt(1e-8 + eps)
    np.testing.assert_allclose(f64(cg.rms_norm(x, (2,)))[0, 0], want, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_embedding_and_padding_idx(dtype):
    rng = np.random.default_rng(6)
    w = rand(rng, (10, 4), dtype)
    idx = rng.integers(0, 10, (3, 5))
    out = cg.embedding(cg.tensor(idx), tensor(w, dtype))
    assert out.shape == (3, 5, 4) and out.dtype is dtype
    np.testing.assert_array_equal(f64(out), w[idx])
    out = cg.embedding(cg.tensor(idx, dtype=cg.int32), tensor(w, dtype), padding_idx=2)
    np.testing.assert_array_equal(f64(out), w[idx])  # forward unchanged; padding only stops the gradient


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_dropout_train_eval_and_seed(p):
    x = cg.ones(200, 50)
    assert cg.dropout(x, p, training=False) is x
    cg.manual_seed(123)
    a = cg.dropout(x, p)
    cg.manual_seed(123)
    b = cg.dropout(x, p)
    np.testing.assert_array_equal(a.numpy(), b.numpy())  # same seed, same mask
    vals = a.numpy()
    if p == 1.0:
        assert (vals == 0).all()
        return
    kept = vals != 0
    np.testing.assert_allclose(vals[kept], 1.0 / (1.0 - p), rtol=1e-6)  # survivors scaled by 1/(1-p)
    frac = kept.mean()
    n = vals.size
    assert abs(frac - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n) + 1e-9
    if 0 < p < 1:
        c = cg.dropout(x, p)
        assert not np.array_equal(c.numpy(), a.numpy())  # the generator advanced


def test_dropout_with_generator_is_independent_of_global_seed():
    g1 = cg.Generator().manual_seed(5)
    g2 = cg.Generator().manual_seed(5)
    x = cg.ones(64)
    cg.manual_seed(1)
    a = cg.dropout(x, 0.5, generator=g1)
    cg.manual_seed(2)
    b = cg.dropout(x, 0.5, generator=g2)
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def np_sdpa(q, k, v, mask=None, causal=False, scale=None):
    s = scale if scale is not None else 1 / np.sqrt(q.shape[-1])
    scores = q @ np.swapaxes(k, -1, -2) * s
    L, S = q.shape[-2], k.shape[-2]
    if causal:
        scores = np.where(np.tril(np.ones((L, S), bool)), scores, -np.inf)
    elif mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    p = np.exp(np_log_softmax(scores, -1))
    return p @ v


SDPA_CASES = ["plain", "causal", "bool_mask", "additive_mask", "scale", "causal_rect"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", SDPA_CASES)
def test_scaled_dot_product_attention(case, dtype):
    rng = np.random.default_rng(SDPA_CASES.index(case))
    B, H, L, S, E, Ev = 2, 3, 5, 7 if case != "causal" else 5, 4, 6
    if case == "causal_rect":
        L, S = 3, 6
    q, k, v = rand(rng, (B, H, L, E), dtype), rand(rng, (B, H, S, E), dtype), rand(rng, (B, H, S, Ev), dtype)
    kw, ref_kw = {}, {}
    if case in ("causal", "causal_rect"):
        kw["is_causal"] = ref_kw["causal"] = True
    elif case == "bool_mask":
        m = rng.random((L, S)) < 0.7
        m[:, 0] = True  # no fully masked row
        kw["attn_mask"], ref_kw["mask"] = cg.tensor(m), m
    elif case == "additive_mask":
        m = rand(rng, (B, 1, L, S), dtype)
        kw["attn_mask"], ref_kw["mask"] = tensor(m, dtype), m
    elif case == "scale":
        kw["scale"] = ref_kw["scale"] = 0.3
    out = cg.scaled_dot_product_attention(tensor(q, dtype), tensor(k, dtype), tensor(v, dtype), **kw)
    assert out.shape == (B, H, L, Ev) and out.dtype is dtype
    rtol, atol = TOLERANCE[dtype]
    assert_close(out, np_sdpa(q, k, v, **ref_kw), dtype, rtol=rtol * 8, atol=atol * 8)


def test_tril_triu():
    x = np.arange(12.0).reshape(3, 4)
    for d in (-1, 0, 2):
        np.testing.assert_array_equal(f64(cg.tril(cg.tensor(x), d)), np.tril(x, d))
        np.testing.assert_array_equal(f64(cg.triu(cg.tensor(x), d)), np.triu(x, d))
