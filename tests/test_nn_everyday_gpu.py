"""The everyday ops on CUDA against the same ops on the CPU: values and gradients of every input (float32),
and BatchNorm's running statistics and MultiheadAttention on both attention paths."""
import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from test_cuda_ops import _SKIP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]
R = np.random.default_rng(21)


def _both(fn, *arrays, tol=2e-5):
    """fn on CPU and CUDA copies of arrays (float ones require grad): outputs and gradients agree."""
    results = []
    for dev in ("cpu", "cuda"):
        ins = [cg.tensor(a, device=dev, requires_grad=a.dtype.kind == "f") if isinstance(a, np.ndarray) else a
               for a in arrays]
        out = fn(*ins)
        first = out[0] if isinstance(out, tuple) else out
        if first.requires_grad:  # a fixed, non-uniform output gradient
            g = (np.arange(first.numel(), dtype=np.float32) % 3 - 0.5).reshape(tuple(first.shape))
            first.backward(cg.tensor(g, device=dev))
        outs = out if isinstance(out, tuple) else (out,)
        results.append(([o.detach().cpu().numpy() for o in outs if o is not None],
                        [t.grad.cpu().numpy() for t in ins if isinstance(t, cg.Tensor) and t.grad is not None]))
    (o_cpu, g_cpu), (o_gpu, g_gpu) = results
    assert len(o_cpu) == len(o_gpu) and len(g_cpu) == len(g_gpu)
    for a, b in zip(o_cpu + g_cpu, o_gpu + g_gpu):
        np.testing.assert_allclose(b, a, rtol=tol, atol=tol)


def _f(*shape):
    return R.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kw, shapes", [
    (dict(padding=1), ((2, 3, 9, 8), (4, 3, 3, 3), (4,))),
    (dict(stride=2, padding="valid", dilation=2), ((2, 3, 11, 9), (5, 3, 3, 2), (5,))),
    (dict(padding="same", groups=3), ((1, 6, 7, 7), (6, 2, 2, 3), (6,))),
    (dict(stride=(2, 1), padding=(0, 2)), ((3, 8, 6, 5), (16, 8, 1, 1), (16,))),
])
def test_conv2d_cuda(kw, shapes):
    _both(lambda x, w, b: F.conv2d(x, w, b, **kw), *[_f(*s) for s in shapes], tol=1e-4)


@pytest.mark.parametrize("fn", [
    lambda x: F.unfold(x, (2, 3), padding=1, stride=(2, 1)),
    lambda x: F.fold(F.unfold(x, 3, padding=1), (6, 7), 3, padding=1),
    lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    lambda x: F.max_pool2d(x, 2, return_indices=True),
    lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
    lambda x: F.adaptive_avg_pool2d(x, (4, 3)),
    lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"),
    lambda x: F.pad(x, (3, 1), mode="circular"),
    lambda x: F.pad(x, (1, 0, 2, 2), mode="replicate"),
    lambda x: F.pad(x, (1, -1, 2, 0), value=1.5),
    lambda x: F.normalize(x, dim=1),
    lambda x: cg.einsum("nchw,cd->ndhw", x, x[0, :, 0, :3]),
    lambda x: cg.nn.Flatten()(x),
])
def test_shape_and_pool_ops_cuda(fn):
    _both(fn, _f(2, 3, 6, 7))


def test_losses_cuda():
    x, t = _f(6, 5), R.random((6, 5)).astype(np.float32)
    labels = R.integers(0, 5, 6)
    _both(lambda x, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=t[0] + 0.5), x, t)
    _both(lambda x, t: cg.nn.L1Loss()(x, t), x, t)
    _both(lambda x, t: cg.nn.CrossEntropyLoss(label_smoothing=0.1)(x, t), x, labels)
    _both(lambda x, t: cg.nn.NLLLoss()(F.log_softmax(x, 1), t), x, labels)


def test_batch_norm_and_unique_cuda():
    x = _f(4, 3, 5, 5)
    outs = {}
    for dev in ("cpu", "cuda"):
        bn = cg.nn.BatchNorm2d(3).to(dev)
        for step in range(3):
            bn(cg.tensor(x * (step + 1), device=dev))
        bn.eval()
        outs[dev] = [bn(cg.tensor(x, device=dev)).detach().cpu().numpy(), bn.running_mean.cpu().numpy(),
                     bn.running_var.cpu().numpy(), int(bn.num_batches_tracked)]
    for a, b in zip(outs["cpu"], outs["cuda"]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    _both(lambda x: cg.nn.BatchNorm1d(3).to(x.device)(x), _f(8, 3))
    a = R.integers(0, 4, (5, 6))
    got = cg.tensor(a, device="cuda").unique(return_inverse=True, return_counts=True)
    ref = cg.tensor(a).unique(return_inverse=True, return_counts=True)
    assert all(g.device.type == "cuda" and g.cpu().tolist() == r.tolist() for g, r in zip(got, ref))


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_cuda(need_weights):
    cg.manual_seed(0)
    m = cg.nn.MultiheadAttention(16, 4, batch_first=True)
    x = _f(2, 5, 16)
    mask = np.triu(np.ones((5, 5), bool), 1)
    outs = []
    for dev in ("cpu", "cuda"):
        mm = m.to(dev)
        t = cg.tensor(x, device=dev, requires_grad=True)
        out, _ = mm(t, t, t, attn_mask=cg.tensor(mask, device=dev), need_weights=need_weights)
        out.sum().backward()
        outs.append((out.detach().cpu().numpy(), t.grad.cpu().numpy()))
        m.zero_grad()
    for a, b in zip(*outs):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
