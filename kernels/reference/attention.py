"""NumPy model of the fused attention forward kernel (kernels/cute/attention_fwd.py).

This is the kernel's algorithm written out step by step on the CPU, so it can be
proven against float64 dense attention in CI before it ever runs on a GPU.  It
follows the kernel exactly where the order of operations matters:

* tiling: one CTA owns `block_m` query rows of one (batch, q-head) pair and walks
  the key/value blocks of `block_n` keys in increasing order;
* grouped-query attention: q head h reads k/v head h // (Hq // Hkv);
* scores are kept in the log2 domain, s2 = (q . k) * scale * log2(e), and the
  online softmax keeps per row a running maximum m (of s2) and a running sum l
  of exp2(s2 - m) in fp32; when the maximum grows the accumulator and l are
  rescaled by exp2(m_old - m_new);
* masking: columns >= Sk of the last, partial key block and (causal) columns
  j > i are set to -inf before the maximum; only the blocks that need it are
  masked (the kernel skips the compares elsewhere, which gives the same values);
* causal block skipping: the CTA of rows [m0, m0 + block_m) stops after the key
  block holding column m0 + block_m - 1 (top-left aligned causal mask, as
  PyTorch's is_causal: row i sees keys j <= i, whatever Sq and Sk are);
* P = exp2(s2 - m) is rounded to the input dtype before the PV product (it is a
  wgmma operand held in registers), while l sums the unrounded fp32 values;
* dropout zeroes P after l has been summed (the softmax normaliser counts every
  key) and the 1 / (1 - p) factor is applied once, to O, in the epilogue (the
  kernel zeroes the already rounded P: rounding and zeroing commute);
* the long kernels pipeline the loop (block nb's softmax runs while the tensor
  cores add P(nb - 1) V(nb - 1) to O, and O is rescaled by block nb's alpha
  afterwards): O still sees acc * alpha(nb) + P(nb) V(nb) block after block, the
  order modelled here; flash_forward(pipelined=True) runs that schedule, and the
  tests show its results are bitwise the plain loop's;
* epilogue: O = acc / l (rounded to the input dtype) and the natural-log
  LSE = (m + log2(l)) * ln(2) in fp32, shaped (B, Hq, Sq).

Dropout mask (shared with the backward kernel and its model): element
(b, h, i, j) of the (B, Hq, Sq, Sk) probability matrix has linear index
v = ((b * Hq + h) * Sq + i) * Sk + j; its uniform number is lane v % 4 of
Philox4x32-10(key = seed, counter = offset // 4 + v // 4) -- the same stream as
kernels/cuda/random.cu -- taken as (lane >> 8) * 2**-24 (fp32 exact), and the
element is kept iff that number is < float32(1 - p).  A launch reserves
B * Hq * Sq * Sk values from the generator (rounded up to 4).

Importable without cutegrad (tests load it by path).
"""
import math

import numpy as np

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)


def philox4x32(seed, counters):
    """Philox4x32-10 of kernels/cuda/random.cu: key = seed (64 bits), counter =
    (counters low, counters high, 0, 0).  Returns a (len, 4) uint32 array."""
    ctr = np.asarray(counters, dtype=np.uint64)
    c0 = (ctr & _LO).astype(np.uint64)
    c1 = (ctr >> np.uint64(32)).astype(np.uint64)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint32(seed & 0xFFFFFFFF)
    k1 = np.uint32((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _LO
        hi1, lo1 = p1 >> np.uint64(32), p1 & _LO
        c0 = hi1 ^ c1 ^ np.uint64(k0)
        c1 = lo1
        c2 = hi0 ^ c3 ^ np.uint64(k1)
        c3 = lo0
        k0 = np.uint32((int(k0) + int(_W0)) & 0xFFFFFFFF)
        k1 = np.uint32((int(k1) + int(_W1)) & 0xFFFFFFFF)
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def dropout_uniform(seed, offset, n_values, start=0):
    """The fp32 uniforms of values [start, start + n_values) of a launch at (seed, offset)."""
    v = np.arange(start, start + n_values, dtype=np.uint64)
    lanes = philox4x32(seed, np.uint64(offset // 4) + v // np.uint64(4))
    x = lanes[np.arange(len(v)), (v % np.uint64(4)).astype(np.int64)]
    return (x >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)


def dropout_keep_mask(seed, offset, B, H, Sq, Sk, p):
    """Boolean (B, H, Sq, Sk) keep mask of attention dropout with probability p
    (H = number of query heads); see the module docstring for the mapping."""
    u = dropout_uniform(seed, offset, B * H * Sq * Sk)
    return (u < np.float32(1.0 - p)).reshape(B, H, Sq, Sk)


def dropout_values_reserved(B, H, Sq, Sk):
    """How many Philox values one forward launch reserves from the generator."""
    return B * H * Sq * Sk


def causal_last_block(m0, block_m, block_n, Sk):
    """Number of key blocks a causal CTA of rows [m0, m0 + block_m) visits."""
    return min(-(-Sk // block_n), -(-(m0 + block_m) // block_n))


def block_needs_mask(n0, block_n, m0, block_m, Sk, causal):
    """Whether key block [n0, n0 + block_n) needs element masking for rows [m0, m0 + block_m)."""
    partial = n0 + block_n > Sk
    diagonal = causal and n0 + block_n - 1 > m0
    return partial or diagonal


def _round(x, dtype):
    return x if dtype is None else x.astype(dtype).astype(np.float32)


def flash_forward(q, k, v, scale, is_causal=False, block_m=128, block_n=128, p_dtype=None,
                  keep_mask=None, dropout_p=0.0, acc_dtype=np.float32, pipelined=False):
    """The forward kernel's tiled algorithm.

    q: (B, Sq, Hq, D), k, v: (B, Sk, Hkv, D) arrays (any float dtype; they are
    read as acc_dtype, as the tensor cores read exact bf16/fp16 products).
    p_dtype: the dtype P is rounded to before PV (the input dtype; None keeps it).
    keep_mask: (B, Hq, Sq, Sk) bool from dropout_keep_mask when dropout_p > 0.
    pipelined: the long kernels' schedule -- block nb's P V is added to O during
    iteration nb + 1, before O is rescaled by that block's alpha, and dropout
    zeroes the already rounded P; the same operations on O in the same order,
    so the results are bitwise those of the plain loop (tests prove it).
    Returns (out (B, Sq, Hq, D) in acc_dtype, lse (B, Hq, Sq) in acc_dtype,
    blocks_visited (B, Hq, row tiles) for the block-skipping test)."""
    B, Sq, Hq, D = q.shape
    _, Sk, Hkv, _ = k.shape
    if Hq % Hkv:
        raise ValueError(f"q heads {Hq} are not a multiple of k/v heads {Hkv}")
    group = Hq // Hkv
    qf, kf, vf = (np.asarray(t).astype(acc_dtype) for t in (q, k, v))
    scale_log2 = acc_dtype(scale * LOG2E)
    out = np.empty((B, Sq, Hq, D), dtype=acc_dtype)
    lse = np.empty((B, Hq, Sq), dtype=acc_dtype)
    m_tiles = -(-Sq // block_m)
    visited = np.zeros((B, Hq, m_tiles), dtype=np.int64)
    n_blocks_all = -(-Sk // block_n)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for t in range(m_tiles):
                m0 = t * block_m
                rows = np.arange(m0, min(m0 + block_m, Sq))
                qt = qf[b, rows, h, :]
                m = np.full(len(rows), -np.inf, dtype=acc_dtype)
                l = np.zeros(len(rows), dtype=acc_dtype)
                acc = np.zeros((len(rows), D), dtype=acc_dtype)
                n_blocks = causal_last_block(m0, block_m, block_n, Sk) if is_causal else n_blocks_all
                visited[b, h, t] = n_blocks
                pending = None  # pipelined: (P, V) of the block whose P V is still to be added
                for nb in range(n_blocks):
                    n0 = nb * block_n
                    cols = np.arange(n0, n0 + block_n)
                    valid_cols = cols[cols < Sk]
                    kt = kf[b, valid_cols, hk, :]
                    vt = vf[b, valid_cols, hk, :]
                    s = np.full((len(rows), block_n), -np.inf, dtype=acc_dtype)
                    s[:, :len(valid_cols)] = (qt @ kt.T) * scale_log2
                    if block_needs_mask(n0, block_n, m0, block_m, Sk, is_causal) and is_causal:
                        s = np.where(cols[None, :] > rows[:, None], acc_dtype(-np.inf), s)
                    m_new = np.maximum(m, s.max(axis=1))
                    # a row whose every score so far is masked keeps m = -inf; use 0 so exp2 gives 0, not NaN
                    m_safe = np.where(np.isneginf(m_new), acc_dtype(0), m_new)
                    alpha = np.exp2(m - m_safe)
                    p = np.exp2(s - m_safe[:, None])
                    l = l * alpha + p.sum(axis=1)
                    keep = None
                    if keep_mask is not None:
                        keep = keep_mask[b, h][np.ix_(rows, valid_cols)]
                    p = p[:, :len(valid_cols)]
                    if pipelined:
                        p = _round(p, p_dtype).astype(acc_dtype)
                        if keep is not None:
                            p = np.where(keep, p, acc_dtype(0))
                        if pending is not None:
                            acc = acc + pending[0] @ pending[1]
                        acc = acc * alpha[:, None]
                        pending = (p, vt)
                    else:
                        if keep is not None:
                            p = np.where(keep, p, acc_dtype(0))
                        acc = acc * alpha[:, None] + _round(p, p_dtype).astype(acc_dtype) @ vt
                    m = m_new
                if pending is not None:
                    acc = acc + pending[0] @ pending[1]
                inv_l = np.where(l > 0, acc_dtype(1) / np.where(l > 0, l, 1), acc_dtype(0))
                if keep_mask is not None:
                    inv_l = inv_l * acc_dtype(1.0 / (1.0 - dropout_p))
                out[b, rows, h, :] = acc * inv_l[:, None]
                lse[b, h, rows] = np.where(l > 0, (m + np.log2(np.where(l > 0, l, 1))) * acc_dtype(LN2),
                                           acc_dtype(np.inf))
    return out, lse, visited


def dense_attention(q, k, v, scale, is_causal=False, keep_mask=None, dropout_p=0.0):
    """float64 dense reference: (out (B, Sq, Hq, D), lse (B, Hq, Sq)), same layouts as flash_forward."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qh = np.asarray(q, np.float64).transpose(0, 2, 1, 3)
    kh = np.repeat(np.asarray(k, np.float64).transpose(0, 2, 1, 3), group, axis=1)
    vh = np.repeat(np.asarray(v, np.float64).transpose(0, 2, 1, 3), group, axis=1)
    s = qh @ kh.transpose(0, 1, 3, 2) * scale
    if is_causal:
        s = np.where(np.tril(np.ones((Sq, Sk), dtype=bool)), s, -np.inf)
    mx = s.max(axis=-1, keepdims=True)
    e = np.exp(s - mx)
    den = e.sum(axis=-1, keepdims=True)
    pr = e / den
    if keep_mask is not None:
        pr = np.where(keep_mask, pr / (1.0 - dropout_p), 0.0)
    out = (pr @ vh).transpose(0, 2, 1, 3)
    lse = (mx + np.log(den))[..., 0]
    return out, lse
