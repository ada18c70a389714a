"""The everyday ops against float64 NumPy references written from their definitions (no torch needed),
and their gradients against finite differences (gradcheck, second derivatives for conv2d/unfold/fold)."""
import itertools

import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from cutegrad.autograd import gradcheck, gradgradcheck

R = np.random.default_rng(11)


def _x(*shape):
    return R.standard_normal(shape)


def _t(a):
    return cg.tensor(a, dtype=cg.float64, requires_grad=True)


def conv2d_ref(x, w, b, stride, padding, dilation, groups):
    """Direct loops over the definition: out[n, o, i, j] = sum_{c, p, q} x[n, c, i*s + p*d, j*s + q*d] w[o, c, p, q]."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    n, c, h, wd = x.shape
    co, cg_, kh, kw = w.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (wd - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, co, oh, ow))
    per = co // groups
    for o, i, j in itertools.product(range(co), range(oh), range(ow)):
        g = o // per
        patch = x[:, g * cg_:(g + 1) * cg_, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
        out[:, o, i, j] = np.einsum("ncpq,cpq->n", patch, w[o]) + (b[o] if b is not None else 0.0)
    return out


@pytest.mark.parametrize("case", [
    ((2, 3, 6, 7), 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    ((1, 4, 7, 5), 6, (2, 3), (2, 1), (0, 2), (2, 1), 2, False),
    ((2, 4, 5, 5), 4, (1, 1), (1, 1), (0, 0), (1, 1), 4, True),
])
def test_conv2d_against_loops(case):
    shape, co, k, s, p, d, g, bias = case
    x, w = _x(*shape), _x(co, shape[1] // g, *k)
    b = _x(co) if bias else None
    out = F.conv2d(cg.tensor(x), cg.tensor(w), None if b is None else cg.tensor(b), s, p, d, g)
    np.testing.assert_allclose(out.numpy(), conv2d_ref(x, w, b, s, p, d, g), rtol=1e-12, atol=1e-12)


def test_pools_against_loops():
    x = _x(2, 3, 7, 6)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ref = np.array([[[[xp[n, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(3)] for i in range(4)]
                     for c in range(3)] for n in range(2)])
    np.testing.assert_array_equal(F.max_pool2d(cg.tensor(x), 3, 2, 1).numpy(), ref)
    xz = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.array([[[[xz[n, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].mean() for j in range(3)] for i in range(4)]
                     for c in range(3)] for n in range(2)])
    np.testing.assert_allclose(F.avg_pool2d(cg.tensor(x), 3, 2, 1).numpy(), ref, rtol=1e-12)
    ref = np.array([[[[x[n, c, (i * 7) // 3:-(-(i + 1) * 7 // 3), (j * 6) // 4:-(-(j + 1) * 6 // 4)].mean()
                       for j in range(4)] for i in range(3)] for c in range(3)] for n in range(2)])
    np.testing.assert_allclose(F.adaptive_avg_pool2d(cg.tensor(x), (3, 4)).numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("mode, np_mode", [("constant", "constant"), ("reflect", "reflect"), ("replicate", "edge"),
                                           ("circular", "wrap")])
def test_pad_against_numpy(mode, np_mode):
    x = _x(2, 3, 4, 5)
    out = F.pad(cg.tensor(x), (1, 2, 3, 0), mode=mode)
    np.testing.assert_array_equal(out.numpy(), np.pad(x, ((0, 0), (0, 0), (3, 0), (1, 2)), mode=np_mode))


@pytest.mark.parametrize("eq, shapes", [("ij,jk->ik", [(3, 4), (4, 5)]), ("ii->i", [(4, 4)]),
                                        ("...ij,...jk", [(2, 1, 3, 4), (5, 4, 2)]), ("ab,bc,cd->ad",
                                                                                    [(2, 3), (3, 4), (4, 5)]),
                                        ("ijk,jil->kl", [(3, 4, 5), (4, 3, 2)]), ("bn,anm,bm->ba",
                                                                                  [(2, 3), (4, 3, 5), (2, 5)])])
def test_einsum_against_numpy(eq, shapes):
    arrays = [_x(*s) for s in shapes]
    np.testing.assert_allclose(cg.einsum(eq, *[cg.tensor(a) for a in arrays]).numpy(), np.einsum(eq, *arrays),
                               rtol=1e-12, atol=1e-12)


def test_batch_norm_normalize_and_losses_against_numpy():
    x = _x(4, 3, 2, 2)
    mean, var = x.mean(axis=(0, 2, 3), keepdims=True), x.var(axis=(0, 2, 3), keepdims=True)
    rm, rv = cg.zeros(3, dtype=cg.float64), cg.ones(3, dtype=cg.float64)
    out = F.batch_norm(cg.tensor(x), rm, rv, training=True, momentum=0.25)
    np.testing.assert_allclose(out.numpy(), (x - mean) / np.sqrt(var + 1e-5), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rm.numpy(), 0.25 * mean.reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), 0.75 + 0.25 * x.var(axis=(0, 2, 3), ddof=1), rtol=1e-12)
    y = _x(5, 6)
    np.testing.assert_allclose(F.normalize(cg.tensor(y), dim=1).numpy(),
                               y / np.linalg.norm(y, axis=1, keepdims=True), rtol=1e-12)
    t = R.random((5, 6))
    p = 1 / (1 + np.exp(-y))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    np.testing.assert_allclose(float(F.binary_cross_entropy_with_logits(cg.tensor(y), cg.tensor(t))), bce.mean(),
                               rtol=1e-12)
    np.testing.assert_allclose(float(F.binary_cross_entropy(cg.tensor(p), cg.tensor(t), reduction="sum")),
                               bce.sum(), rtol=1e-10)
    np.testing.assert_allclose(float(F.l1_loss(cg.tensor(y), cg.tensor(t))), np.abs(y - t).mean(), rtol=1e-12)


def test_unique_against_numpy():
    a = R.integers(-3, 3, (4, 5))
    vals, inv, counts = cg.tensor(a).unique(return_inverse=True, return_counts=True)
    rv, ri, rc = np.unique(a, return_inverse=True, return_counts=True)
    assert vals.tolist() == rv.tolist() and counts.tolist() == rc.tolist()
    assert inv.numpy().tolist() == ri.reshape(a.shape).tolist()


GRAD_CASES = {
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=(2, 1), padding=1, dilation=(1, 2)),
               lambda: (_t(_x(2, 2, 5, 6)), _t(_x(3, 2, 2, 3)), _t(_x(3)))),
    "conv2d_groups_same": (lambda x, w: F.conv2d(x, w, padding="same", groups=2),
                           lambda: (_t(_x(1, 4, 4, 5)), _t(_x(2, 2, 2, 3)))),
    "unfold": (lambda x: F.unfold(x, (2, 3), padding=(1, 0), stride=(1, 2)), lambda: (_t(_x(2, 2, 4, 5)),)),
    "fold": (lambda c: F.fold(c, (4, 5), (2, 3), padding=(1, 0), stride=(1, 2)), lambda: (_t(_x(2, 12, 10)),)),
    "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), lambda: (_t(_x(2, 2, 6, 7)),)),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                   lambda: (_t(_x(2, 2, 6, 7)),)),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, (3, 4)), lambda: (_t(_x(1, 2, 7, 6)),)),
    "pad_reflect": (lambda x: F.pad(x, (2, 1, 1, 2), mode="reflect"), lambda: (_t(_x(1, 2, 4, 5)),)),
    "pad_circular": (lambda x: F.pad(x, (2, 1), mode="circular"), lambda: (_t(_x(2, 4)),)),
    "normalize": (lambda x: F.normalize(x, p=3.0, dim=0), lambda: (_t(_x(4, 3)),)),
    "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
                   lambda: (_t(_x(4, 3, 2)), _t(_x(3)), _t(_x(3)))),
    "bce_logits": (lambda x, t, pw: F.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
                   lambda: (_t(_x(3, 4)), cg.tensor(R.random((3, 4))), cg.tensor(R.random(4) + 0.5))),
    "einsum": (lambda a, b: cg.einsum("bij,jk->bki", a, b), lambda: (_t(_x(2, 3, 4)), _t(_x(4, 2)))),
    "einsum_diag": (lambda a: cg.einsum("iij->ji", a), lambda: (_t(_x(3, 3, 2)),)),
    "l1_loss": (lambda a, b: F.l1_loss(a, b, reduction="sum"), lambda: (_t(_x(3, 4)), _t(_x(4)))),
    "bce": (lambda p: F.binary_cross_entropy(p, cg.tensor(np.linspace(0, 1, 6).reshape(2, 3))),
            lambda: (_t(R.uniform(0.1, 0.9, (2, 3))),)),
    "multihead_attention": (lambda q, kv, m: _mha(q, kv, m), lambda: (_t(_x(3, 2, 4)), _t(_x(5, 2, 4)),
                                                                        cg.tensor(_x(3, 5)))),
}


def _mha(q, kv, mask):
    cg.manual_seed(5)
    m = cg.nn.MultiheadAttention(4, 2).double()
    out, w = m(q, kv, kv, attn_mask=mask)
    return out.sum() + (w * w).sum()


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name):
    fn, make = GRAD_CASES[name]
    assert gradcheck(fn, make())


@pytest.mark.parametrize("name", ["conv2d", "unfold", "fold", "adaptive_avg_pool2d"])
def test_gradgradcheck(name):
    fn, make = GRAD_CASES[name]
    assert gradgradcheck(fn, make())


def test_multihead_attention_against_numpy():
    cg.manual_seed(3)
    m = cg.nn.MultiheadAttention(6, 2, batch_first=True).double()
    x = _x(2, 4, 6)
    out, w = m(cg.tensor(x), cg.tensor(x), cg.tensor(x), average_attn_weights=False)
    wi, bi = m.in_proj_weight.detach().numpy(), m.in_proj_bias.detach().numpy()
    q, k, v = (x @ wi[i * 6:(i + 1) * 6].T + bi[i * 6:(i + 1) * 6] for i in range(3))
    split = lambda a: a.reshape(2, 4, 2, 3).transpose(0, 2, 1, 3)  # noqa: E731
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(3)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ split(v)).transpose(0, 2, 1, 3).reshape(2, 4, 6)
    ref = o @ m.out_proj.weight.detach().numpy().T + m.out_proj.bias.detach().numpy()
    np.testing.assert_allclose(w.detach().numpy(), p, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-10, atol=1e-12)
