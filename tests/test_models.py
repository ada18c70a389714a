"""cutegrad.models: the reference models' structure, presets and behaviour."""
from dataclasses import replace

import numpy as np
import pytest

import cutegrad
from cutegrad import nn
from cutegrad.io import load, save
from cutegrad.models import CPU_PRESETS, GPT, PRESETS, GPTConfig, ViT, ViTConfig, build, build_model


def small_gpt(**kw):
    cfg = dict(vocab_size=17, block_size=12, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def small_vit(**kw):
    cfg = dict(image_size=8, patch_size=4, in_channels=3, num_classes=5, dim=16, depth=2, n_heads=2, n_cls_tokens=3)
    cfg.update(kw)
    return ViT(ViTConfig(**cfg))


def test_presets_follow_the_design_table():
    r, v, m, g = (PRESETS[k] for k in ("reverse", "vit", "minigpt", "gpt2-small"))
    assert (r.model.vocab_size, r.model.block_size, r.model.n_embd, r.model.n_head, r.model.n_layer) == (36, 64, 128, 4, 2)
    assert (r.batch_size, r.optimizer.name, r.optimizer.lr) == (64, "sgd", 0.1)
    assert (v.model.image_size, v.model.patch_size, v.model.in_channels) == (32, 4, 3)
    assert (v.model.dim, v.model.depth, v.model.n_heads, v.model.mlp_ratio, v.model.n_cls_tokens) == (256, 6, 8, 4, 16)
    assert (v.batch_size, v.optimizer.name, v.optimizer.lr) == (256, "adamw", 3e-4)
    assert (m.model.vocab_size, m.model.block_size, m.model.n_embd, m.model.n_head, m.model.n_layer) == (4096, 128, 256, 8, 6)
    assert (m.batch_size, m.optimizer.name, m.optimizer.lr, m.optimizer.betas) == (64, "adamw", 1e-3, (0.9, 0.95))
    assert (m.optimizer.weight_decay, m.clip_grad_norm, m.tokenizer_vocab) == (0.1, 1.0, 4096)
    assert (g.model.vocab_size, g.model.block_size, g.model.n_embd, g.model.n_head, g.model.n_layer) == (50304, 1024, 768, 12, 12)
    assert (g.batch_size, g.optimizer.name) == (8, "adamw")
    assert set(PRESETS) == set(CPU_PRESETS) == {"reverse", "vit", "minigpt", "gpt2-small"}


def test_cpu_presets_keep_the_workload_and_say_how_they_differ():
    assert CPU_PRESETS["reverse"].model == PRESETS["reverse"].model
    for name, cpu in CPU_PRESETS.items():
        full = PRESETS[name]
        assert cpu.note.startswith("CPU:")
        assert cpu.optimizer == full.optimizer and cpu.clip_grad_norm == full.clip_grad_norm
        assert cpu.steps <= full.steps and cpu.batch_size <= full.batch_size
        assert 0 <= cpu.warmup_steps <= cpu.steps


def test_gpt_forward_shape_and_tied_head():
    m = small_gpt()
    idx = cutegrad.randint(0, 17, (3, 12))
    logits = m(idx)
    assert logits.shape == (3, 12, 17) and logits.dtype == cutegrad.float32
    assert m.lm_head.weight is m.tok_emb.weight
    names = [n for n, _ in m.named_parameters()]
    assert "tok_emb.weight" in names and "lm_head.weight" not in names  # one tensor, counted once
    sd = m.state_dict()
    assert "lm_head.weight" in sd and "tok_emb.weight" in sd


def test_gpt_untied_head_is_its_own_parameter():
    m = small_gpt(tie_weights=False)
    assert m.lm_head.weight is not m.tok_emb.weight
    assert "lm_head.weight" in [n for n, _ in m.named_parameters()]


def test_gpt_is_causal():
    m = small_gpt()
    m.eval()
    idx = cutegrad.randint(0, 17, (2, 12))
    changed = idx.numpy().copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 17
    a = m(idx).detach().numpy()
    b = m(cutegrad.from_numpy(changed)).detach().numpy()
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-4


def test_gpt_init_follows_gpt2():
    cutegrad.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=4, n_head=4, n_embd=128))
    std = lambda p: float(p.detach().numpy().std())  # noqa: E731
    assert abs(std(m.tok_emb.weight) - 0.02) < 0.002
    assert abs(std(m.blocks[0].attn.qkv.weight) - 0.02) < 0.002
    resid = 0.02 / np.sqrt(2 * 4)
    assert abs(std(m.blocks[3].mlp.proj.weight) - resid) < 0.1 * resid
    assert np.all(m.blocks[1].attn.qkv.bias.detach().numpy() == 0)
    assert np.all(m.norm.weight.detach().numpy() == 1)


def test_gpt_rejects_bad_input():
    m = small_gpt()
    with pytest.raises(ValueError, match="block_size"):
        m(cutegrad.zeros(1, 13, dtype=cutegrad.int64))
    with pytest.raises(ValueError, match="batch, seq"):
        m(cutegrad.zeros(12, dtype=cutegrad.int64))
    with pytest.raises(ValueError, match="divisible"):
        small_gpt(n_embd=18, n_head=4)


def test_gpt_gradient_reaches_every_parameter():
    m = small_gpt()
    idx = cutegrad.randint(0, 17, (2, 12))
    logits = m(idx)
    nn.functional.cross_entropy(logits.reshape(-1, 17), idx.reshape(-1)).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert np.abs(p.grad.numpy()).max() > 0, name


def test_vit_patch_embedding_is_a_strided_patch_projection(rng):
    m = small_vit(image_size=8, patch_size=4, dim=6)
    pe = m.patch_embed
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = pe(cutegrad.from_numpy(x)).detach().numpy()
    W = pe.proj.weight.detach().numpy().reshape(6, 3, 4, 4).astype(np.float64)
    b = pe.proj.bias.detach().numpy().astype(np.float64)
    want = np.empty((2, 4, 6))
    for i in range(2):
        for j in range(2):
            patch = x[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].astype(np.float64)
            want[:, 2 * i + j] = np.einsum("bchw,dchw->bd", patch, W) + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_vit_forward_shape_and_class_token_pooling():
    m = small_vit()
    out = m(cutegrad.randn(4, 3, 8, 8))
    assert out.shape == (4, 5)
    assert m.cls_tokens.shape == (1, 3, 16) and m.pos_emb.shape == (1, 3 + 4, 16)
    assert isinstance(m.norm, nn.RMSNorm) and isinstance(m.blocks[0].norm1, nn.RMSNorm)
    assert m.no_weight_decay() == {"cls_tokens", "pos_emb"}


def test_vit_attention_is_bidirectional():
    m = small_vit()
    m.eval()
    x = cutegrad.randn(1, 3, 8, 8)
    y = x.numpy().copy()
    y[:, :, 4:, 4:] += 1.0  # only the last patch changes
    a = m.blocks[0](m.patch_embed(x)).detach().numpy()
    b = m.blocks[0](m.patch_embed(cutegrad.from_numpy(y))).detach().numpy()
    assert np.abs(a[:, 0] - b[:, 0]).max() > 1e-5  # the first patch sees the last one


def test_vit_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match="expected images"):
        small_vit()(cutegrad.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        small_vit(image_size=10)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    for m, x in ((small_gpt(), cutegrad.randint(0, 17, (2, 12))), (small_vit(), cutegrad.randn(2, 3, 8, 8))):
        m.eval()
        save(m.state_dict(), tmp_path / "m.safetensors")
        twin = build_model(m.config)
        twin.load_state_dict(load(tmp_path / "m.safetensors"))
        twin.eval()
        np.testing.assert_array_equal(m(x).detach().numpy(), twin(x).detach().numpy())


def test_build_applies_overrides_and_rejects_unknown_names():
    m = build("minigpt", cpu=True, n_layer=1)
    assert isinstance(m, GPT) and len(m.blocks) == 1
    assert m.config == replace(CPU_PRESETS["minigpt"].model, n_layer=1)
    assert isinstance(build("vit", depth=1, dim=32, n_heads=2), ViT)
    with pytest.raises(ValueError, match="unknown workload"):
        build("resnet")


@pytest.mark.slow
def test_gpt2_small_has_124m_parameters():
    m = build("gpt2-small")
    n = sum(p.numel() for p in m.parameters())
    # GPT-2 small with nanoGPT's padded vocabulary: 124,475,904 (123.69M without the position table).
    assert n == 124_475_904
    assert n - m.pos_emb.weight.numel() == 123_689_472
