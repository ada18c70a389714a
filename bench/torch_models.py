"""PyTorch re-implementations of the reference models, for parity tests and benchmarks.

`TorchGPT` and `TorchViT` compute what `cutegrad.models.GPT` and `ViT` compute,
with the same parameter names, so a cutegrad model's initial weights load into
them unchanged (`cutegrad_weights` writes them with `cutegrad.io.save` and
reads them back with `safetensors.torch.load_file`; `torch_twin` builds the
PyTorch model holding them; `from_cutegrad` does both): both frameworks then
start from identical weights. Dropout sits where cutegrad's blocks put it (after the
embeddings, on the attention probabilities, after the attention projection and
after the MLP).

They are written independently of cutegrad.models: ViT's patch embedding is a
strided Conv2d here (cutegrad flattens patches and applies a Linear), and
attention is `F.scaled_dot_product_attention`.

`torch_optimizer` builds the preset's optimizer with cutegrad's weight-decay
groups; `torch_scheduler` writes the warmup + cosine / warmup-stable-decay
schedule out as a LambdaLR; `torch_loss` scores logits in float32 as
`cutegrad.train.loss_fn` does.

This module imports torch; cutegrad itself never needs it.
"""
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["TorchAttention", "TorchMLP", "TorchBlock", "TorchGPT", "TorchViT", "cutegrad_weights", "from_cutegrad",
           "torch_loss", "torch_optimizer", "torch_scheduler", "torch_twin"]


class TorchAttention(torch.nn.Module):
    def __init__(self, dim, n_heads, causal, dropout=0.0):
        super().__init__()
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.resid_drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=self.causal)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, N, C)))


class TorchMLP(torch.nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc = torch.nn.Linear(dim, hidden)
        self.proj = torch.nn.Linear(hidden, dim)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TorchBlock(torch.nn.Module):
    def __init__(self, dim, n_heads, mlp_ratio, causal, norm, dropout=0.0):
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = TorchAttention(dim, n_heads, causal, dropout)
        self.mlp = TorchMLP(dim, mlp_ratio * dim, dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TorchGPT(torch.nn.Module):
    """cutegrad.models.GPT: token + position embeddings, pre-norm causal blocks, tied LM head."""

    def __init__(self, c):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = torch.nn.Embedding(c.block_size, c.n_embd)
        self.drop = torch.nn.Dropout(c.dropout)
        self.blocks = torch.nn.ModuleList(
            [TorchBlock(c.n_embd, c.n_head, 4, True, torch.nn.LayerNorm, c.dropout) for _ in range(c.n_layer)])
        self.norm = torch.nn.LayerNorm(c.n_embd)
        self.lm_head = torch.nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))

    def load_cutegrad(self, sd):
        # cutegrad ties the head to the embedding as GPT-2 does; the file holds both names.
        if not torch.equal(sd["lm_head.weight"], sd["tok_emb.weight"]):
            raise ValueError("cutegrad GPT weights: lm_head.weight and tok_emb.weight differ, but the models tie them")
        self.load_state_dict(sd, strict=True)


class TorchViT(torch.nn.Module):
    """cutegrad.models.ViT: patch embedding, class tokens, RMSNorm blocks, mean of the class tokens."""

    no_weight_decay = frozenset({"cls_tokens", "pos_emb"})

    def __init__(self, c):
        super().__init__()
        self.n_cls = c.n_cls_tokens
        self.patch = torch.nn.Conv2d(c.in_channels, c.dim, c.patch_size, stride=c.patch_size)
        n = (c.image_size // c.patch_size) ** 2
        self.cls_tokens = torch.nn.Parameter(torch.zeros(1, c.n_cls_tokens, c.dim))
        self.pos_emb = torch.nn.Parameter(torch.zeros(1, c.n_cls_tokens + n, c.dim))
        self.drop = torch.nn.Dropout(c.dropout)
        self.blocks = torch.nn.ModuleList(
            [TorchBlock(c.dim, c.n_heads, c.mlp_ratio, False, torch.nn.RMSNorm, c.dropout) for _ in range(c.depth)])
        self.norm = torch.nn.RMSNorm(c.dim)
        self.head = torch.nn.Linear(c.dim, c.num_classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = self.drop(torch.cat([self.cls_tokens.expand(len(x), -1, -1), x], 1) + self.pos_emb)
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x)[:, :self.n_cls].mean(1))

    def load_cutegrad(self, sd):
        sd = dict(sd)
        w = sd.pop("patch_embed.proj.weight")
        sd["patch.weight"] = w.reshape(self.patch.weight.shape)
        sd["patch.bias"] = sd.pop("patch_embed.proj.bias")
        self.load_state_dict(sd, strict=True)


def cutegrad_weights(cg_model, folder=None):
    """A cutegrad model's state_dict as CPU torch tensors, read back from a safetensors file.

    The file is written with `cutegrad.io.save` into `folder` (a temporary one by default)
    and read with `safetensors.torch.load_file`: the two libraries' own formats meet there.
    """
    from safetensors.torch import load_file

    from cutegrad.io import save

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(folder if folder is not None else tmp) / "cutegrad-init.safetensors"
        save(cg_model.state_dict(), path)
        return load_file(str(path))


def torch_twin(config, weights, device="cpu"):
    """TorchGPT or TorchViT for a cutegrad model config, holding `weights` (see cutegrad_weights).

    The module is created on `device` directly, so its own throw-away initialisation is cheap there.
    """
    from cutegrad.models import GPTConfig

    with torch.device(device):
        model = TorchGPT(config) if isinstance(config, GPTConfig) else TorchViT(config)
    model.load_cutegrad(weights)
    return model


def from_cutegrad(cg_model, config, device="cpu", folder=None):
    """The PyTorch twin of a cutegrad GPT or ViT, holding exactly its current weights."""
    return torch_twin(config, cutegrad_weights(cg_model, folder), device)


def torch_loss(model, inputs, targets):
    """Mean cross-entropy with the logits in float32, as cutegrad.train.loss_fn."""
    logits = model(inputs).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def torch_optimizer(model, preset, **options):
    """The preset's optimizer over `model`; AdamW gets cutegrad's weight-decay groups
    (matrices and embeddings decay; biases, norm gains and ViT's tokens and positions do not).
    `options` go to the optimizer's constructor (fused=True, capturable=True, ...)."""
    o = preset.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               **options)
    skip = getattr(model, "no_weight_decay", frozenset())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in skip]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in skip)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=o.lr, betas=o.betas, eps=o.eps, **options)


def torch_scheduler(opt, preset):
    """The preset's schedule as a LambdaLR, the formula written out independently of cutegrad.train."""
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
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
