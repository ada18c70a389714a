"""NumPy model of the fused attention backward (kernels/cute/attention_bwd.py).

It runs the kernels' exact tiled algorithm on the CPU, block by block in the
order the GPU does, so the algorithm is proven against dense float64 gradients
before it ever runs on a GPU.  Layouts are the kernels': q, dq (B, Sq, Hq, D);
k, v, dk, dv (B, Sk, Hkv, D); out, dout (B, Sq, Hq, D); lse (B, Hq, Sq) natural
log of the row sums of exp(scale * q k^T) over the visible keys.

Three kernels:

1. preprocess, one program per (batch, q head, BLOCK_M query rows):
   delta[i] = rowsum(dO[i] * O[i]) in fp32; lse2[i] = lse[i] * log2(e) so the
   main loop uses exp2; both written to workspaces padded to a multiple of
   BLOCK_M rows, the padding holding delta = 0 and lse2 = +inf (so padded query
   rows get P = exp2(-inf) = 0 with no mask); the fp32 dQ accumulator zeroed.
2. main, one CTA per (key block of BLOCK_N keys, kv head, batch): dK and dV of
   the block live in registers (fp32) while the CTA walks every q head of the
   kv head's group (GQA sums over them for free) and, per head, the query
   blocks of BLOCK_M rows from the first one causality lets see the key block
   to the last.  Per query block:
     S^T  = K Q^T                (BLOCK_N x BLOCK_M, fp32 accumulate)
     P^T  = exp2(S^T * scale * log2(e) - lse2[col]), 0 where causality hides
            key j from query i (j > i), on the blocks the diagonal crosses
     dP^T = V dO^T
     dS^T = P^T * (dP^T - delta[col])
     dV  += P^T dO               (P rounded to the input dtype)
     dK  += dS^T Q               (dS rounded to the input dtype)
     dQ  += dS K  into the fp32 accumulator: atomics (any order across key
            blocks) or, in deterministic mode, one partial per key block in a
            workspace, summed by the postprocess in key-block order.
   Keys past Sk and queries past Sq are zero-filled by TMA: a padded key row
   adds 0 to dQ (its K row is 0) and its dK/dV rows are never stored; a padded
   query row has P = 0.  A key block that no query sees (causal, Sk > Sq)
   still stores dK = dV = 0.  Epilogue: dK *= scale, both rounded once.
3. postprocess: dQ = scale * (fp32 accumulator, or the ordered sum of the
   partials), rounded once to the input dtype.

Dropout (the kernels' "_dropout" specializations regenerate the forward's keep
mask with Philox): dV takes P^T * keep^T (rounded) and is scaled by 1 / (1 - p) in
the epilogue; dS^T = P^T * (dP^T * keep^T / (1 - p) - delta).

``round_operands`` is a function applied where the kernel rounds P and dS
to the input dtype before a tensor-core product (identity for the float64
check; a bf16/fp16 rounding to model the GPU's numerics).
"""
import math

import numpy as np

BLOCK_M = 64
BLOCK_N = 128
LOG2E = math.log2(math.e)


def _identity(x):
    return x


def padded_rows(n, block):
    return (n + block - 1) // block * block


def first_query_block(n_block, is_causal, block_m=BLOCK_M, block_n=BLOCK_N):
    """First query block that sees any key of key block n_block (causal: rows i >= n_block*block_n)."""
    return (n_block * block_n) // block_m if is_causal else 0


def key_blocks_seen(m_block, n_blocks, is_causal, block_m=BLOCK_M, block_n=BLOCK_N):
    """Number of leading key blocks query block m_block sees (the deterministic postprocess sums these)."""
    if not is_causal:
        return n_blocks
    return min(n_blocks, (m_block * block_m + block_m - 1) // block_n + 1)


def block_needs_causal_mask(m_block, n_block, block_m=BLOCK_M, block_n=BLOCK_N):
    """True when some key j of the key block lies after some query i of the query block."""
    return n_block * block_n + block_n - 1 > m_block * block_m


def preprocess(out, dout, lse, block_m=BLOCK_M):
    """delta (B, H, Sq_pad) fp32, lse2 (B, H, Sq_pad) fp32 (lse * log2 e, +inf padding)."""
    B, Sq, H, _ = out.shape
    pad = padded_rows(Sq, block_m)
    delta = np.zeros((B, H, pad), np.float32)
    lse2 = np.full((B, H, pad), np.inf, np.float32)
    prod = out.astype(np.float32) * dout.astype(np.float32)
    delta[:, :, :Sq] = prod.sum(axis=-1, dtype=np.float32).transpose(0, 2, 1)
    lse2[:, :, :Sq] = lse.astype(np.float32) * np.float32(LOG2E)
    return delta, lse2


def attention_backward(q, k, v, out, lse, dout, scale, is_causal, deterministic=False, acc=np.float64,
                       round_operands=_identity, dq_order_seed=0, keep_mask=None, dropout_p=0.0,
                       block_m=BLOCK_M, block_n=BLOCK_N):
    """(dq, dk, dv) by the kernels' tiled algorithm, accumulating in `acc` (np.float32 on the GPU).

    Atomic mode adds each key block's dQ contribution in a shuffled key-block
    order (dq_order_seed), as concurrent CTAs may; deterministic mode stores
    per-key-block partials and sums them in key-block order.

    Dropout: keep_mask (B, Hq, Sq, Sk) bool, the forward's mask
    (kernels/reference/attention.py: dropout_keep_mask regenerates it from the
    forward's seed and offset).  Per block: dV += (P^T * keep^T) dO, scaled by
    1 / (1 - p) once at the end, and dS^T = P^T * (dP^T * keep^T / (1 - p) -
    delta); delta = rowsum(dO * O) already holds the dropout through O."""
    B, Sq, Hq, D = q.shape
    _, Sk, Hkv, _ = k.shape
    if Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    group = Hq // Hkv
    sq_pad, sk_pad = padded_rows(Sq, block_m), padded_rows(Sk, block_n)
    m_blocks, n_blocks = sq_pad // block_m, sk_pad // block_n

    delta, lse2 = preprocess(out, dout, lse, block_m)
    delta, lse2 = delta.astype(acc), lse2.astype(acc)

    def pad(x, rows):  # TMA's zero fill past the sequence end
        p = np.zeros((x.shape[0], rows) + x.shape[2:], acc)
        p[:, :x.shape[1]] = x
        return p

    qp, dop = pad(q, sq_pad), pad(dout, sq_pad)
    keep = None
    if keep_mask is not None:  # the keep mask, zero on padding; 1 / (1 - p) kept apart
        keep = np.zeros((B, Hq, sq_pad, sk_pad), acc)
        keep[:, :, :Sq, :Sk] = keep_mask
        keep_scale = acc(1.0 / (1.0 - dropout_p))
    kp, vp = pad(k, sk_pad), pad(v, sk_pad)
    dk = np.zeros((B, sk_pad, Hkv, D), acc)
    dv = np.zeros((B, sk_pad, Hkv, D), acc)
    # atomics: one zeroed accumulator; deterministic: one partial per key block,
    # NaN where the main kernel writes nothing (the postprocess must not read it)
    if deterministic:
        dq_parts = np.full((n_blocks, B, Hq, sq_pad, D), np.nan, acc)
    else:
        dq_parts = np.zeros((1, B, Hq, sq_pad, D), acc)
    order = np.random.default_rng(dq_order_seed).permutation(n_blocks)
    scale2 = acc(scale * LOG2E)

    for b in range(B):
        for kvh in range(Hkv):
            for n in (range(n_blocks) if deterministic else order):
                keys = slice(n * block_n, (n + 1) * block_n)
                kb, vb = kp[b, keys, kvh], vp[b, keys, kvh]          # (BN, D)
                dk_acc = np.zeros((block_n, D), acc)
                dv_acc = np.zeros((block_n, D), acc)
                for g in range(group):
                    h = kvh * group + g
                    for m in range(first_query_block(n, is_causal, block_m, block_n), m_blocks):
                        rows = slice(m * block_m, (m + 1) * block_m)
                        qb, dob = qp[b, rows, h], dop[b, rows, h]     # (BM, D)
                        st = kb @ qb.T                                 # S^T (BN, BM)
                        st = st * scale2 - lse2[b, h, rows][None, :]
                        if is_causal and block_needs_causal_mask(m, n, block_m, block_n):
                            i = m * block_m + np.arange(block_m)[None, :]
                            j = n * block_n + np.arange(block_n)[:, None]
                            st = np.where(j > i, -np.inf, st)
                        pt = np.exp2(st)
                        dpt = vb @ dob.T                               # dP^T (BN, BM)
                        pt_v = pt
                        if keep is not None:
                            kt = keep[b, h, rows, keys].T
                            pt_v, dpt = pt * kt, dpt * kt * keep_scale
                        dst = pt * (dpt - delta[b, h, rows][None, :])
                        pt_r, dst_r = round_operands(pt_v), round_operands(dst)
                        dv_acc += pt_r @ dob
                        dk_acc += dst_r @ qb
                        if deterministic:
                            dq_parts[n, b, h, rows] = dst_r.T @ kb
                        else:
                            dq_parts[0, b, h, rows] += dst_r.T @ kb
                dk[b, keys, kvh] = dk_acc * acc(scale)
                dv[b, keys, kvh] = dv_acc if keep is None else dv_acc * keep_scale

    # postprocess: deterministic partials summed in key-block order, only those written
    if deterministic:
        dq_acc = np.zeros((B, Hq, sq_pad, D), acc)
        for m in range(m_blocks):
            rows = slice(m * block_m, (m + 1) * block_m)
            for n in range(key_blocks_seen(m, n_blocks, is_causal, block_m, block_n)):
                dq_acc[:, :, rows] += dq_parts[n, :, :, rows]
    else:
        dq_acc = dq_parts[0]
    dq = (dq_acc * acc(scale)).transpose(0, 2, 1, 3)[:, :Sq]
    return dq, dk[:, :Sk], dv[:, :Sk]
