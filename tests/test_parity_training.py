"""20 training steps of each reference model, cutegrad vs PyTorch (CPU, float32).

For each workload the test builds the cutegrad model from the preset's
config *reduced in size* (fewer layers, smaller width, shorter sequences and
batches: the same architecture code, so CI stays fast), writes its initial
weights with `cutegrad.io.save`, loads them into a compact PyTorch
re-implementation below with `safetensors.torch.load_file`, and trains both
for 20 steps on identical batches drawn from the workload's real data
pipeline, with the preset's optimizer, weight-decay groups, gradient
clipping and warmup + cosine schedule (dropout off). The losses must agree
within 1e-4 relative at every step.

The PyTorch side is written independently of cutegrad.models: ViT's patch
embedding is a strided Conv2d there (cutegrad flattens patches and uses a
Linear), and the schedule is a LambdaLR with the formula written out here.
"""
import math
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import cutegrad  # noqa: E402
from cutegrad import train as T  # noqa: E402
from cutegrad.data import CharTokenizer, ReversalTask, SyntheticImages, TextDataset, embedded_corpus  # noqa: E402
from cutegrad.io import save  # noqa: E402
from cutegrad.models import PRESETS, GPTConfig, ViTConfig  # noqa: E402

STEPS = 20
RTOL = 1e-4


# --- the PyTorch reference models ---------------------------------------------------------
class TorchAttention(torch.nn.Module):
    def __init__(self, dim, n_heads, causal):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class TorchMLP(torch.nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc = torch.nn.Linear(dim, hidden)
        self.proj = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.proj(torch.nn.functional.gelu(self.fc(x), approximate="tanh"))


class TorchBlock(torch.nn.Module):
    def __init__(self, dim, n_heads, mlp_ratio, causal, norm):
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = TorchAttention(dim, n_heads, causal)
        self.mlp = TorchMLP(dim, mlp_ratio * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchGPT(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = torch.nn.Embedding(c.block_size, c.n_embd)
        self.blocks = torch.nn.ModuleList(
            [TorchBlock(c.n_embd, c.n_head, 4, True, torch.nn.LayerNorm) for _ in range(c.n_layer)])
        self.norm = torch.nn.LayerNorm(c.n_embd)
        self.lm_head = torch.nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))


class TorchViT(torch.nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.n_cls = c.n_cls_tokens
        self.patch = torch.nn.Conv2d(c.in_channels, c.dim, c.patch_size, stride=c.patch_size)
        n = (c.image_size // c.patch_size) ** 2
        self.cls_tokens = torch.nn.Parameter(torch.zeros(1, c.n_cls_tokens, c.dim))
        self.pos_emb = torch.nn.Parameter(torch.zeros(1, c.n_cls_tokens + n, c.dim))
        self.blocks = torch.nn.ModuleList(
            [TorchBlock(c.dim, c.n_heads, c.mlp_ratio, False, torch.nn.RMSNorm) for _ in range(c.depth)])
        self.norm = torch.nn.RMSNorm(c.dim)
        self.head = torch.nn.Linear(c.dim, c.num_classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_tokens.expand(len(x), -1, -1), x], 1) + self.pos_emb
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, :self.n_cls].mean(1))

    def load_cutegrad(self, sd):
        sd = dict(sd)
        w = sd.pop("patch_embed.proj.weight")
        sd["patch.weight"] = w.reshape(self.patch.weight.shape)
        sd["patch.bias"] = sd.pop("patch_embed.proj.bias")
        self.load_state_dict(sd, strict=True)


# --- the reduced workloads -----------------------------------------------------------------
def _text_batches(vocab_cap, seq, batch, seed):
    """Windows of the embedded corpus: characters (minigpt) or raw UTF-8 bytes (gpt2-small)."""
    text = embedded_corpus()
    if vocab_cap is None:
        tok = CharTokenizer.from_text(text)
        tokens, vocab = tok.encode(text), tok.vocab_size
    else:
        tokens, vocab = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), vocab_cap
    return vocab, TextDataset(tokens, seq).random_batches(batch, seed)


def reduced(workload):
    """(preset with a small model and batch, endless numpy batches)."""
    p = replace(PRESETS[workload], steps=STEPS, warmup_steps=5)
    if workload == "reverse":
        model = replace(p.model, block_size=32, n_embd=64, n_head=4, n_layer=2)
        task = ReversalTask(vocab_size=model.vocab_size, seq_len=model.block_size)
        return replace(p, model=model, batch_size=16), task.batches(16, "train", seed=3)
    if workload == "vit":
        model = replace(p.model, dim=64, depth=2, n_heads=4, n_cls_tokens=4)
        images = SyntheticImages("train", size=16 * STEPS, seed=3)

        def batches():
            for i in range(STEPS):
                yield images.get_batch(np.arange(16 * i, 16 * (i + 1)))
        return replace(p, model=model, batch_size=16), batches()
    if workload == "minigpt":
        vocab, batches = _text_batches(None, 32, 8, seed=3)
        model = replace(p.model, vocab_size=vocab, block_size=32, n_embd=64, n_head=4, n_layer=2, dropout=0.0)
        return replace(p, model=model, batch_size=8, tokenizer="char"), batches
    vocab, batches = _text_batches(256, 64, 4, seed=3)
    model = replace(p.model, vocab_size=vocab, block_size=64, n_embd=96, n_head=4, n_layer=3)
    return replace(p, model=model, batch_size=4), batches


def torch_optimizer(model, preset):
    o = preset.optimizer
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        skip = {"cls_tokens", "pos_emb"} if isinstance(model, TorchViT) else set()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in skip]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in skip)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=o.lr, betas=o.betas, eps=o.eps)
    lo = preset.min_lr_ratio

    def factor(t):
        if t < preset.warmup_steps:
            return (t + 1) / preset.warmup_steps
        if preset.schedule == "constant":
            return 1.0
        start = preset.warmup_steps
        if preset.schedule == "wsd":
            start = max(start, preset.steps - round(preset.decay_fraction * preset.steps))
        if t <= start:
            return 1.0
        progress = min(1.0, (t - start) / (preset.steps - start))
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@pytest.mark.parametrize("workload", ["reverse", "vit", "minigpt", "gpt2-small"])
def test_twenty_training_steps_match_pytorch(workload, tmp_path):
    torch.manual_seed(0)
    preset, batches = reduced(workload)
    cutegrad.manual_seed(0)
    cg_model = T.build_model(preset.model)
    cg_model.train()
    save(cg_model.state_dict(), tmp_path / "init.safetensors")
    weights = safetensors_torch.load_file(tmp_path / "init.safetensors")

    if isinstance(preset.model, GPTConfig):
        th_model = TorchGPT(preset.model)
        th_model.load_state_dict(weights, strict=True)
        # cutegrad ties the head to the embedding as GPT-2 does; both copies in the file must agree.
        torch.testing.assert_close(weights["lm_head.weight"], weights["tok_emb.weight"], rtol=0, atol=0)
    else:
        th_model = TorchViT(preset.model)
        th_model.load_cutegrad(weights)

    cg_opt = T.build_optimizer(cg_model, preset.optimizer)
    cg_sched = T.build_scheduler(cg_opt, preset)
    th_opt, th_sched = torch_optimizer(th_model, preset)

    cg_losses, th_losses = [], []
    for _ in range(STEPS):
        inputs, targets = next(batches)
        x, y = T._batch_to((inputs, targets), "cpu", cutegrad.float32)
        loss = T.loss_fn(cg_model, x, y)
        cg_opt.zero_grad()
        loss.backward()
        if preset.clip_grad_norm is not None:
            cutegrad.nn.utils.clip_grad_norm_(cg_model.parameters(), preset.clip_grad_norm)
        cg_opt.step()
        cg_sched.step()
        cg_losses.append(loss.item())

        logits = th_model(torch.from_numpy(np.ascontiguousarray(inputs)))
        th_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    torch.from_numpy(np.ascontiguousarray(targets)).reshape(-1))
        th_opt.zero_grad()
        th_loss.backward()
        if preset.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(th_model.parameters(), preset.clip_grad_norm)
        th_opt.step()
        th_sched.step()
        th_losses.append(th_loss.item())

    cg_losses, th_losses = np.array(cg_losses), np.array(th_losses)
    rel = np.abs(cg_losses - th_losses) / np.abs(th_losses)
    assert rel.max() <= RTOL, (
        f"{workload}: losses diverge from PyTorch's (worst step {rel.argmax()}: relative error {rel.max():.2e})\n"
        f"cutegrad: {cg_losses}\ntorch:    {th_losses}")
    # The 20 steps must have trained something, or agreement would prove little.
    assert cg_losses[-5:].mean() < cg_losses[:5].mean()
