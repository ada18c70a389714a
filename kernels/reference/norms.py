"""NumPy model of the CuTeDSL norms (kernels/cute/norms.py): the same tiling and
the same float32 summation order, so its results are what the GPU kernel
computes up to the last bits of rsqrt (MUFU.RSQ is not correctly rounded).

Tests compare it with a float64 reference (tests/test_norms_reference.py), and
the GPU tests compare the kernels with it.  Row vectors: thread ``lane`` of a
row's ``tpr`` threads holds columns ``(v * tpr + lane) * vec + e``; it sums
its values in (v, e) order, then the lanes combine by a butterfly
(offsets tpr/2, ..., 1).  dweight/dbias and the column sums of dx: each CTA b
of G sums rows of the blocks b, b + G, ... per row slot in block order, then
the slots in order; the finish sums the CTAs in order.
"""
import importlib.util
import os

import numpy as np


def _kernel_family():
    # Loaded by path: this module and the kernel family share the name "norms".
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "cute", "norms.py")
    spec = importlib.util.spec_from_file_location("cutegrad_kernels_cute_norms", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


row_tiling = _kernel_family().row_tiling  # the kernel's own tiling rule

F32 = np.float32


def _thread_order(a, vec, tpr, vpt):
    """(rows, n) -> (rows, tpr, vpt * vec): each lane's values in its summation order."""
    rows = a.shape[0]
    return a.reshape(rows, vpt, tpr, vec).transpose(0, 2, 1, 3).reshape(rows, tpr, vpt * vec)


def row_sum(a, vec, tpr, vpt):
    """Per-row float32 sums of a (rows, n) float32 array in the kernel's order."""
    per_lane = _thread_order(a, vec, tpr, vpt)
    acc = np.zeros(per_lane.shape[:2], F32)
    for k in range(per_lane.shape[2]):
        acc = acc + per_lane[:, :, k]
    lanes = np.arange(tpr)
    off = tpr // 2
    while off:
        acc = acc + acc[:, lanes ^ off]
        off //= 2
    return acc[:, 0]


def _round(a, dtype):
    """float32 values rounded to the storage dtype ("bf16" or "fp32"), returned as float32."""
    if dtype == "bf16":
        import ml_dtypes
        return a.astype(ml_dtypes.bfloat16).astype(F32)
    return a.astype(F32)


def forward(x, res, weight, bias, eps, kind, dtypes):
    """(y, s, mean, rstd) of the fused forward; dtypes = (x, residual or "", y) storage dtypes.

    x, res: (rows, n) arrays holding values representable in their dtypes."""
    n = x.shape[1]
    vec, tpr, vpt, _ = row_tiling(n, dtypes)
    inv_n = F32(1.0 / n)
    s = x.astype(F32) + (res.astype(F32) if res is not None else F32(0))
    mean = row_sum(s, vec, tpr, vpt) * inv_n if kind == "layer" else np.zeros(len(s), F32)
    d = s - mean[:, None]
    rstd = (F32(1) / np.sqrt(row_sum(d * d, vec, tpr, vpt) * inv_n + F32(eps))).astype(F32)
    y = d * rstd[:, None] * weight.astype(F32)
    if kind == "layer":
        y = y + bias.astype(F32)
    s_dtype = dtypes[1] or dtypes[0]
    return _round(y, dtypes[2]), _round(s, s_dtype), mean, rstd


def backward(dy, s, dres, weight, mean, rstd, kind, dtypes, partial_rows):
    """(ds, dweight, dbias, dx_sum) of the fused backward; dtypes = (s, dy[, second ds output])
    storage dtypes (all of them decide the tiling, as in the kernel).

    ds is float32 (the kernel rounds it to each output's dtype once); dx_sum is the
    column sum of dx, ds as stored in the branch input's dtype (the second output's
    when there is one, else s's); partial_rows is G, the number of CTAs."""
    rows, n = s.shape
    vec, tpr, vpt, slots = row_tiling(n, dtypes)
    inv_n = F32(1.0 / n)
    dy = dy.astype(F32)
    xhat = (s.astype(F32) - mean[:, None]) * rstd[:, None]
    g = dy * weight.astype(F32)
    mean_gx = row_sum(g * xhat, vec, tpr, vpt) * inv_n
    mean_g = row_sum(g, vec, tpr, vpt) * inv_n if kind == "layer" else np.zeros(rows, F32)
    ds = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
    if dres is not None:
        ds = ds + dres.astype(F32)
    dweight = _param_sum(dy * xhat, slots, partial_rows)
    dbias = _param_sum(dy, slots, partial_rows) if kind == "layer" else None
    dx_dtype = dtypes[2] if len(dtypes) > 2 and dtypes[2] else dtypes[0]
    dx_sum = _param_sum(_round(ds, dx_dtype), slots, partial_rows)
    return ds, dweight, dbias, dx_sum


def _param_sum(terms, slots, partial_rows):
    """Column sums of (rows, n) float32 terms: per CTA and slot over its row blocks,
    then the slots in order (one partial row per CTA), then the CTAs in order."""
    rows, n = terms.shape
    blocks = -(-rows // slots)
    padded = np.zeros((blocks * slots, n), F32)
    padded[:rows] = terms
    padded = padded.reshape(blocks, slots, n)
    partial = np.zeros((partial_rows, n), F32)
    for b in range(partial_rows):
        acc = np.zeros((slots, n), F32)
        for blk in range(b, blocks, partial_rows):
            acc = acc + padded[blk]
        tot = acc[0].copy()
        for k in range(1, slots):
            tot = tot + acc[k]
        partial[b] = tot
    out = np.zeros(n, F32)
    for b in range(partial_rows):
        out = out + partial[b]
    return out


def _philox_model():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention.py")
    spec = importlib.util.spec_from_file_location("cutegrad_reference_attention_philox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.philox4x32


def residual_dropout_scales(seed, offset, rows, n, keep, dtypes):
    """(rows, n) float32: the residual dropout's per-element factor in the kernels, scale = fp32(1 / keep)
    where kept, else 0.  Walks the kernel's own order: thread `lane` of a row, vector v (columns
    (v * tpr + lane) * vec + e), one Philox draw per 4 elements q at counter offset / 4 + row * n / 4
    + column / 4, lane l kept iff (lane value >> 8) < fp32(keep) * 2^24."""
    philox4x32 = _philox_model()
    vec, tpr, vpt, _ = row_tiling(n, dtypes)
    cols, counters = [], []  # one entry per Philox draw, in the kernel's (row, lane, v, q) order
    for r in range(rows):
        for lane in range(tpr):
            for v in range(vpt):
                c = v * tpr + lane
                for q in range(vec // 4):
                    cols.append((r, c * vec + 4 * q))
                    counters.append(offset // 4 + r * (n // 4) + c * (vec // 4) + q)
    lanes = philox4x32(seed, np.array(counters, dtype=np.uint64))
    kept = (lanes >> np.uint32(8)).astype(F32) < F32(keep) * F32(1 << 24)
    out = np.zeros((rows, n), F32)
    for (r, col), k in zip(cols, kept):
        out[r, col:col + 4] = np.where(k, F32(1.0 / keep), F32(0.0))
    return out
