"""float64 dense attention and its gradients, the reference of the fused attention
backward's tests (NumPy model on the CPU, the kernels on a GPU)."""
import numpy as np


def dense_attention(q, k, v, dout, scale, is_causal, keep_mask=None, dropout_p=0.0):
    """float64 dense attention in (B, S, H, D) layout: out, lse (B, Hq, Sq) and (dq, dk, dv)
    from the textbook gradient of dropout(softmax(scale q k^T)) v, k/v heads repeated for GQA.
    keep_mask: (B, Hq, Sq, Sk) bool; kept probabilities are scaled by 1 / (1 - dropout_p)."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(0, 2, 1, 3)                                   # (B, Hq, Sq, D)
    kh = np.repeat(k.transpose(0, 2, 1, 3), group, axis=1)         # (B, Hq, Sk, D)
    vh = np.repeat(v.transpose(0, 2, 1, 3), group, axis=1)
    doh = dout.transpose(0, 2, 1, 3)
    s = scale * qh @ kh.transpose(0, 1, 3, 2)
    if is_causal:
        sq, sk = s.shape[-2:]
        s = np.where(np.tril(np.ones((sq, sk), bool)), s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    lse = (np.log(e.sum(-1, keepdims=True)) + mx)[..., 0]
    p = e / e.sum(-1, keepdims=True)
    z = np.ones_like(p) if keep_mask is None else keep_mask / (1.0 - dropout_p)
    pd = p * z
    out = pd @ vh
    dp = (doh @ vh.transpose(0, 1, 3, 2)) * z   # gradient w.r.t. p through the dropout
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = scale * ds @ kh
    dk = scale * ds.transpose(0, 1, 3, 2) @ qh
    dv = pd.transpose(0, 1, 3, 2) @ doh
    B, Hkv = k.shape[0], k.shape[2]

    def group_sum(x):  # (B, Hq, Sk, D) -> (B, Sk, Hkv, D)
        return x.reshape(B, Hkv, group, *x.shape[2:]).sum(2).transpose(0, 2, 1, 3)

    return (out.transpose(0, 2, 1, 3), lse, dq.transpose(0, 2, 1, 3), group_sum(dk), group_sum(dv))
