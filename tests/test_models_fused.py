"""The reference models with fused add+norm (the default, fused_norms=True) against
the plain modules (fused_norms=False) from the same weights: equal losses and
gradients in float64 on the CPU, equal logits under bf16 autocast, and state_dicts
that load across the two."""
import numpy as np
import pytest

import cutegrad as cg
import cutegrad.nn.functional as F
from cutegrad.models import GPT, GPTConfig, ViT, ViTConfig


def _pair(make, **cfg):
    cg.manual_seed(0)
    fused = make(fused_norms=True, **cfg)
    plain = make(fused_norms=False, **cfg)
    plain.load_state_dict(fused.state_dict())
    assert type(fused.blocks[0].norm1).__name__.startswith("Add")
    assert not type(plain.blocks[0].norm1).__name__.startswith("Add")
    return fused, plain


def _gpt(**kw):
    return GPT(GPTConfig(vocab_size=23, block_size=10, n_layer=3, n_head=2, n_embd=16, **kw))


def _vit(**kw):
    return ViT(ViTConfig(image_size=8, patch_size=4, in_channels=3, num_classes=5, dim=16, depth=3, n_heads=2,
                         n_cls_tokens=2, **kw))


def _loss_and_grads(model, inputs, target):
    model.zero_grad()
    out = model(inputs)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    loss.backward()
    return float(loss), {k: p.grad.numpy().copy() for k, p in model.named_parameters()}


@pytest.mark.parametrize("which", ["gpt", "vit"])
def test_fused_and_unfused_losses_and_gradients_are_equal_in_float64(which):
    rng = np.random.default_rng(3)
    if which == "gpt":
        fused, plain = _pair(_gpt)
        inputs = cg.tensor(rng.integers(0, 23, (3, 10)))
        target = cg.tensor(rng.integers(0, 23, (3, 10)))
    else:
        fused, plain = _pair(_vit)
        inputs = cg.tensor(rng.normal(size=(4, 3, 8, 8)), dtype=cg.float64)
        target = cg.tensor(rng.integers(0, 5, (4,)))
    fused.to(cg.float64)
    plain.to(cg.float64)
    lf, gf = _loss_and_grads(fused, inputs, target)
    lp, gp = _loss_and_grads(plain, inputs, target)
    assert lf == pytest.approx(lp, rel=1e-13, abs=1e-13)
    assert gf.keys() == gp.keys()
    for k in gf:
        np.testing.assert_allclose(gf[k], gp[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_fused_gpt_under_autocast_matches_the_plain_modules():
    fused, plain = _pair(_gpt)
    idx = cg.tensor(np.random.default_rng(5).integers(0, 23, (2, 10)))
    with cg.autocast("cpu", dtype=cg.bfloat16):
        a, b = fused(idx), plain(idx)
    assert a.dtype is b.dtype is cg.bfloat16
    np.testing.assert_allclose(a.float().detach().numpy(), b.float().detach().numpy(), rtol=2e-2, atol=2e-2)


def test_single_fused_block_is_a_plain_block():
    fused, plain = _pair(_gpt)
    x = cg.randn(2, 10, 16)
    np.testing.assert_allclose(fused.blocks[1](x).detach().numpy(), plain.blocks[1](x).detach().numpy(),
                               rtol=1e-5, atol=1e-6)
