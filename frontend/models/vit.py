"""ViT: the vision transformer of the vit workload.

The image [B, C, H, W] is cut into non-overlapping p x p patches, each
flattened (channel-major, as a Conv2d with kernel = stride = p would read
it) and projected to `dim` by a Linear layer: the same function as the usual
strided convolution, without needing a convolution op. `n_cls` learned class
tokens are prepended, learned position embeddings added, and `depth`
pre-norm blocks (RMSNorm, bidirectional attention, GELU MLP) applied. The
classifier reads the average of the class tokens' final (normed) states:
several class tokens give the model more room to pool than one.
"""
from dataclasses import asdict, dataclass

from .. import nn
from .. import ops
from .blocks import Block


@dataclass(frozen=True)
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    dim: int = 256
    depth: int = 6
    n_heads: int = 8
    mlp_ratio: int = 4
    n_cls_tokens: int = 16
    dropout: float = 0.0
    fused_norms: bool = True  # add+norm in one op (models/blocks.py); False: the plain modules

    def to_dict(self):
        return asdict(self)


class PatchEmbed(nn.Module):
    def __init__(self, image_size, patch_size, in_channels, dim):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"PatchEmbed: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.n_patches = (image_size // patch_size) ** 2
        self.proj = nn.Linear(in_channels * patch_size * patch_size, dim)

    def forward(self, x):
        B, C, H, W = x.shape
        if (C, H, W) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"PatchEmbed: expected images [B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}], got {list(x.shape)}")
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return self.proj(x.reshape(B, self.n_patches, C * p * p))


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c.image_size, c.patch_size, c.in_channels, c.dim)
        self.cls_tokens = nn.Parameter(ops.zeros(1, c.n_cls_tokens, c.dim))
        self.pos_emb = nn.Parameter(ops.zeros(1, c.n_cls_tokens + self.patch_embed.n_patches, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c.dim, c.n_heads, c.mlp_ratio, causal=False, dropout=c.dropout,
                                           norm=nn.RMSNorm, fused=c.fused_norms) for _ in range(c.depth)])
        # fused: the final norm also applies the last block's MLP dropout (models/blocks.py)
        self.norm = nn.AddRMSNorm(c.dim, dropout=c.dropout) if c.fused_norms else nn.RMSNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_tokens, std=0.02)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)

    def no_weight_decay(self):
        """Parameter names AdamW should not decay: the learned tokens and positions."""
        return {"cls_tokens", "pos_emb"}

    def forward(self, images):
        """Images [B, C, H, W] (float) -> class logits [B, num_classes]."""
        x = self.patch_embed(images)
        B = x.shape[0]
        x = ops.cat([self.cls_tokens.expand(B, -1, -1), x], dim=1)
        x = self.drop(x + self.pos_emb)
        if self.config.fused_norms:
            residual = None
            for block in self.blocks:
                x, residual = block.forward_residual(x, residual)
            # The stream's dtype, as the unfused RMSNorm: the class-token mean runs before the head's cast.
            x = self.norm(x, residual, out_dtype=(residual if residual is not None else x).dtype)[0]
        else:
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)
        return self.head(x[:, :self.config.n_cls_tokens].mean(dim=1))
