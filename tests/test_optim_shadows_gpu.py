"""On a GPU (`-m gpu`): the fused AdamW/SGD write the bf16 copy of each float32 master
weight that autocast's next forward reads (optim/weight_shadows.py), and the clipping
coefficient of Optimizer.clip_grad_norm_ reaches them as their gradient scale.

Each test runs the same steps twice -- with the copies / the folded coefficient, and
with plain casts / clip_grad_norm_ + step -- and compares the weights and the
copies; more than 48 parameters, so the copies span several launches."""
import numpy as np
import pytest

import cutegrad as cg
from cutegrad import dtypes as dt
from test_cuda_ops import _SKIP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

SHAPES = [(33, 17), (8193,), (5,)] + [(i % 4 + 1, 8) for i in range(50)]


def _params(seed):
    rng = np.random.default_rng(seed)
    return [cg.tensor(rng.standard_normal(s), dtype=dt.float32, device="cuda").requires_grad_() for s in SHAPES]


def _grads(seed, step):
    rng = np.random.default_rng(seed * 100 + step)
    return [cg.tensor(rng.standard_normal(s) * 3, dtype=dt.float32, device="cuda") for s in SHAPES]


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_copies_written_by_the_optimizer_equal_fresh_casts(name):
    from cutegrad.autocast import lower
    from cutegrad.optim import weight_shadows
    ps = _params(0)
    kw = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=1e-2, weight_decay=0.1)
    opt = getattr(cg.optim, name)(ps, fused=True, **kw)
    for step in range(3):
        with cg.autocast("cuda", dtype=dt.bfloat16):
            casts = lower(*ps)  # what a matmul-class op does with its weights
        loss = sum((c.float() * g).sum() for c, g in zip(casts, _grads(0, step)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        for p in ps:
            shadow = weight_shadows.lookup(p, dt.bfloat16)
            if step > 0:
                assert shadow is not None
                np.testing.assert_array_equal(shadow.cpu().float().numpy(), p.detach().to(dt.bfloat16).cpu()
                                              .float().numpy())


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_clip_folded_into_the_step_equals_clip_then_step(name):
    kw = dict(lr=0.05, momentum=0.9) if name == "SGD" else dict(lr=1e-2, weight_decay=0.1)
    a, b = _params(1), _params(1)
    opt_a = getattr(cg.optim, name)(a, fused=True, **kw)
    opt_b = getattr(cg.optim, name)(b, fused=True, **kw)
    for step in range(4):
        for ps in (a, b):
            for p, g in zip(ps, _grads(1, step)):
                p.grad = g.clone()
        ta = opt_a.clip_grad_norm_(1.0)
        tb = cg.nn.utils.clip_grad_norm_(b, 1.0)
        np.testing.assert_allclose(ta.item(), tb.item(), rtol=1e-6)
        opt_a.step()
        opt_b.step()
        for pa, pb in zip(a, b):
            np.testing.assert_allclose(pa.detach().cpu().numpy(), pb.detach().cpu().numpy(), rtol=1e-5, atol=1e-6)
