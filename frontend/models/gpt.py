"""GPT: the decoder-only causal transformer behind the reverse, minigpt and
gpt2-small workloads.

Token and learned position embeddings, `n_layer` pre-norm blocks (LayerNorm,
causal attention, GELU MLP x4), a final LayerNorm and a language-model head
whose weight is tied to the token embedding, as GPT-2 does. Initialisation
is GPT-2's: N(0, 0.02) for weights and embeddings, zero biases, and the
residual projections (attention and MLP output) scaled by 1/sqrt(2 n_layer)
so the residual stream's variance does not grow with depth.
"""
import math
from dataclasses import asdict, dataclass

from .. import nn
from .. import ops
from .blocks import Block


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # longest sequence the position embedding covers
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    fused_norms: bool = True  # add+norm in one op (models/blocks.py); False: the plain modules

    def to_dict(self):
        return asdict(self)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            [Block(c.n_embd, c.n_head, 4, causal=True, dropout=c.dropout, bias=c.bias, fused=c.fused_norms)
             for _ in range(c.n_layer)])
        # fused: the final norm also applies the last block's MLP dropout (models/blocks.py)
        self.norm = nn.AddLayerNorm(c.n_embd, bias=c.bias, dropout=c.dropout) if c.fused_norms else \
            nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.reset_parameters()
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, 0.0, resid_std)
            nn.init.normal_(block.mlp.proj.weight, 0.0, resid_std)

    def forward(self, idx):
        """Token ids [B, T] (int64) -> logits [B, T, vocab_size]."""
        if idx.ndim != 2:
            raise ValueError(f"GPT: expected token ids of shape [batch, seq], got {list(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds block_size {self.config.block_size}")
        pos = ops.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        if self.config.fused_norms:
            residual = None
            for block in self.blocks:
                x, residual = block.forward_residual(x, residual)
            return self.lm_head(self.norm(x, residual)[0])
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))
