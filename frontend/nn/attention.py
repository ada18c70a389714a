"""MultiheadAttention (torch.nn.MultiheadAttention's parameters, masks and outputs).

Projections are linears; attention runs through F.scaled_dot_product_attention
when the weights are not asked for (need_weights=False: the fused kernels on
CUDA), and as softmax(q k^T / sqrt(d) + mask) v in ops when they are (the
weights are an output then, as in torch). Boolean masks mean what torch's
MultiheadAttention says, True = not allowed (the opposite of
scaled_dot_product_attention's boolean masks); both masks are merged into
one additive float mask of -inf and 0.
"""
import math

from .. import dtypes as dt
from .. import ops
from .module import Module
from .parameter import Parameter
from .linear import Linear
from . import functional as F
from . import init


class MultiheadAttention(Module):
    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads}), both positive")
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("MultiheadAttention: add_bias_kv and add_zero_attn are not supported")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        kw = dict(device=device, dtype=dtype)
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(ops.empty(3 * embed_dim, embed_dim, **kw))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = Parameter(ops.empty(embed_dim, embed_dim, **kw))
            self.k_proj_weight = Parameter(ops.empty(embed_dim, self.kdim, **kw))
            self.v_proj_weight = Parameter(ops.empty(embed_dim, self.vdim, **kw))
        if bias:
            self.in_proj_bias = Parameter(ops.empty(3 * embed_dim, **kw))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, **kw)
        self._reset_parameters()

    def _reset_parameters(self):
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    def _projections(self):
        if self._qkv_same_embed_dim:
            ws = ops.chunk(self.in_proj_weight, 3)
        else:
            ws = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        bs = ops.chunk(self.in_proj_bias, 3) if self.in_proj_bias is not None else (None,) * 3
        return ws, bs

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: need attn_mask if specifying the is_causal hint (as torch: the "
                               "mask is what is applied)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (ops.unsqueeze(t, 1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = ops.unsqueeze(key_padding_mask, 0)
        elif query.dim() != 3:
            raise RuntimeError(f"MultiheadAttention: query should be unbatched 2D or batched 3D, got "
                               f"{query.dim()}D of shape {list(query.shape)}")
        elif self.batch_first:
            query, key, value = (ops.transpose(t, 0, 1) for t in (query, key, value))
        L, N, E = query.shape
        S = key.shape[0]
        if E != self.embed_dim:
            raise RuntimeError(f"MultiheadAttention: expected embed_dim {self.embed_dim}, got query of shape "
                               f"{list(query.shape)}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != N:
            raise RuntimeError(f"MultiheadAttention: key {list(key.shape)} and value {list(value.shape)} must share "
                               f"their sequence and batch sizes with the query's batch {N}")
        (wq, wk, wv), (bq, bk, bv) = self._projections()
        H, hd = self.num_heads, self.head_dim

        def heads(x, w, b, n):  # (n, N, *) -> (N, H, n, hd)
            return ops.permute(ops.reshape(F.linear(x, w, b), (n, N, H, hd)), (1, 2, 0, 3))

        q, k, v = heads(query, wq, bq, L), heads(key, wk, bk, S), heads(value, wv, bv, S)
        # As torch: with the is_causal hint and nothing else to mask, attention applies the causal mask
        # itself (on CUDA, in the softmax kernel) instead of reading attn_mask.
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None if causal else self._merged_mask(attn_mask, key_padding_mask, N, L, S, q)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = ops.matmul(ops.mul(q, 1.0 / math.sqrt(hd)), ops.transpose(k, -2, -1))
            if mask is not None:
                scores = ops.add(scores, mask)
            weights = F.softmax(scores, -1)
            if p > 0.0:
                weights = F.dropout(weights, p)
            out = ops.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(ops.reshape(ops.permute(out, (2, 0, 1, 3)), (L, N, E)))
        if unbatched:
            out = ops.squeeze(out, 1)
        elif self.batch_first:
            out = ops.transpose(out, 0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = ops.mean(weights, 1)
            if unbatched:
                weights = ops.squeeze(weights, 0)
        return out, weights

    def _merged_mask(self, attn_mask, key_padding_mask, N, L, S, like):
        """One additive float mask broadcastable to (N, H, L, S), or None."""
        merged = None
        if attn_mask is not None:
            m = _additive(attn_mask, like)
            if m.dim() == 2:
                if tuple(m.shape) != (L, S):
                    raise RuntimeError(f"MultiheadAttention: the 2D attn_mask should be of size {[L, S]}, got "
                                       f"{list(m.shape)}")
            elif m.dim() == 3 and tuple(m.shape) == (N * self.num_heads, L, S):
                m = ops.reshape(m, (N, self.num_heads, L, S))
            else:
                raise RuntimeError(f"MultiheadAttention: attn_mask should be (L, S) = {[L, S]} or (N*num_heads, L, "
                                   f"S) = {[N * self.num_heads, L, S]}, got {list(m.shape)}")
            merged = m
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise RuntimeError(f"MultiheadAttention: key_padding_mask should be (N, S) = {[N, S]}, got "
                                   f"{list(key_padding_mask.shape)}")
            kpm = ops.reshape(_additive(key_padding_mask, like), (N, 1, 1, S))
            merged = kpm if merged is None else ops.add(merged, kpm)
        return merged


def _additive(mask, like):
    """A bool mask (True = not allowed) as -inf/0 in like's dtype; a float mask as is."""
    if mask.dtype is dt.bool_:
        return ops.masked_fill(ops.zeros(mask.shape, dtype=like.dtype, device=like.device), mask, float("-inf"))
    return mask.to(like.dtype)
