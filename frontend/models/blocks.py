"""The pre-norm transformer block shared by the GPT and ViT reference models.

    x = x + attn(norm1(x))
    x = x + mlp(norm2(x))

With `fused=True` the norms are nn.AddLayerNorm / nn.AddRMSNorm and the
block also runs as `forward_residual(h, residual) -> (h', residual')`, where
the residual stream x = h + residual is never summed by a kernel of its own:
each norm adds its input to the residual in the same pass (ops.add_layer_norm),
so a stack of blocks threads (branch output, residual) pairs and the model
adds the last pair inside its final norm.  Same parameters, same values.
The branches' residual dropout moves into the norm that adds the branch:
the attention branch's into norm2, the MLP branch's into the next block's
norm1 (or the model's final norm), each with the mask the branch's own
dropout would have drawn at the same point of the generator's stream.

Attention goes through `F.scaled_dot_product_attention` (causal for GPT,
bidirectional for ViT), so the CUDA backend's fused attention kernel serves
both models without model changes.
"""
from .. import nn
from ..nn import functional as F


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, dim, n_heads, causal, dropout=0.0, bias=True, out_dropout=True):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"SelfAttention: dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        # out_dropout=False: the caller applies the output's dropout (a fused add+norm)
        self.resid_drop = nn.Dropout(dropout if out_dropout else 0.0)

    def forward(self, x):
        B, T, C = x.shape
        hs = C // self.n_heads
        # q, k and v stay packed in the projection's (B, T, 3, heads, hs) output: the fused
        # attention kernel reads them in place, its backward writes their gradients into one
        # buffer shaped like it, and y comes back as a (B, heads, T, hs) view of (B, T, heads, hs),
        # so the transpose + reshape below is free too.
        qkv = self.qkv(x).reshape(B, T, 3, self.n_heads, hs)
        y = F.qkv_attention(qkv, dropout_p=self.dropout if self.training else 0.0, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """proj(gelu_tanh(fc(x))) as one fused op (F.mlp_gelu): the bias and GELU ride in fc's GEMM
    epilogue and the GELU backward in proj's input-gradient GEMM, so the activation launches
    no kernel of its own in either direction."""

    def __init__(self, dim, hidden, dropout=0.0, bias=True):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(F.mlp_gelu(x, self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias))


_FUSED_NORM = {nn.LayerNorm: nn.AddLayerNorm, nn.RMSNorm: nn.AddRMSNorm}


class Block(nn.Module):
    """Pre-norm transformer block; `norm` is nn.LayerNorm (GPT) or nn.RMSNorm (ViT);
    fused: use its add+norm twin (see the module docstring)."""

    def __init__(self, dim, n_heads, mlp_ratio=4, causal=True, dropout=0.0, bias=True, norm=nn.LayerNorm,
                 fused=False):
        super().__init__()
        self.fused = fused
        self.dropout = dropout
        if fused:  # each norm drops the branch it adds (see the module docstring)
            self.norm1 = _FUSED_NORM[norm](dim, dropout=dropout)
            self.norm2 = _FUSED_NORM[norm](dim, dropout=dropout)
        else:
            self.norm1, self.norm2 = norm(dim), norm(dim)
        self.attn = SelfAttention(dim, n_heads, causal, dropout, bias, out_dropout=not fused)
        self.mlp = MLP(dim, mlp_ratio * dim, 0.0 if fused else dropout, bias)

    def forward(self, x):
        if self.fused:
            h, residual = self.forward_residual(x, None)
            return F.dropout(h, self.dropout, self.training) + residual
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_residual(self, h, residual):
        """(h, residual) -> (h', residual') with dropout(h') + residual' = block(dropout(h) + residual);
        fused blocks only.  h is a branch output whose dropout is still to come (the next add+norm applies it).

        residual None: the stream is h itself, not dropped (the first block)."""
        a, residual = self.norm1(h, residual)
        n, residual = self.norm2(self.attn(a), residual)
        return self.mlp(n), residual
