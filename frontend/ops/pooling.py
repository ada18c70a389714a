"""2-D pooling: max_pool2d, avg_pool2d, adaptive_avg_pool2d.

max and average pooling read the windows with unfold (conv.py) and reduce
them: max over the window (the gradient goes to the first maximum, as
torch's), sum divided by the window's count. Padding is -inf for max and
zeros for average; ceil_mode adds right/bottom padding for the last partial
window, excluded from the average's count as torch excludes it. Adaptive
average pooling is two matmuls with averaging matrices (output i averages
input rows floor(i*H/oh) .. ceil((i+1)*H/oh)), built on the device from
arange, so every path runs on every backend without a kernel of its own and
without a host read.
"""
from .. import dtypes as dt
from . import pointwise as P
from . import reduction as R
from . import shape as S
from .conv import _batched, _pair, _unfold
from .linalg import matmul


def _pool_geometry(x, kernel_size, stride, padding, dilation, ceil_mode, opname):
    k = _pair(kernel_size, "kernel_size", opname, allow_zero=False)
    s = k if stride is None or stride == () or stride == [] else _pair(stride, "stride", opname, allow_zero=False)
    p = _pair(padding, "padding", opname)
    d = _pair(dilation, "dilation", opname, allow_zero=False)
    if any(pi > ki // 2 for pi, ki in zip(p, k)):
        raise RuntimeError(f"{opname}(): pad should be at most half of effective kernel size, but got pad={list(p)} "
                           f"and kernel_size={list(k)}")
    outs, extra = [], []
    for n, ki, si, pi, di in zip(x._shape[2:], k, s, p, d):
        span = n + 2 * pi - di * (ki - 1) - 1
        o = (-(-span // si) if ceil_mode else span // si) + 1
        if ceil_mode and (o - 1) * si >= n + pi:  # the last window must start inside the input or left padding
            o -= 1
        if o <= 0:
            raise RuntimeError(f"{opname}(): input of spatial size {list(x._shape[2:])} is too small for kernel "
                               f"{list(k)} with padding {list(p)} and dilation {list(d)}")
        outs.append(o)
        extra.append(max(0, (o - 1) * si + di * (ki - 1) + 1 - (n + 2 * pi)))
    return k, s, p, d, outs, extra


def _padded(x, p, extra, value):
    from .padding import pad
    if not any(p) and not any(extra):
        return x
    return pad(x, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=value)


def _check_float(x, opname):
    if not x._dtype.is_floating_point:
        raise RuntimeError(f"{opname}(): expected a floating point input, got {x._dtype}")


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """torch.nn.functional.max_pool2d; with return_indices, the flat (h*W + w) input index of each maximum."""
    opname = "max_pool2d"
    x, unbatched = _batched(input, opname)
    _check_float(x, opname)
    k, s, p, d, (oh, ow), extra = _pool_geometry(x, kernel_size, stride, padding, dilation, ceil_mode, opname)
    n, c, h, w = x._shape
    cols = _unfold(_padded(x, p, extra, float("-inf")), k, d, s)          # (N, C*kh*kw, OH*OW)
    values, arg = R.max(S.reshape(cols, (n, c, k[0] * k[1], oh * ow)), 2)
    out = S.reshape(values, (n, c, oh, ow))
    if not return_indices:
        return S.squeeze(out, 0) if unbatched else out
    from .creation import arange
    dev = x._storage.device
    rows = P.add(P.mul(P.floor_divide(arg, k[1]), d[0]),
                 S.reshape(P.sub(P.mul(arange(oh, device=dev), s[0]), p[0]), (oh, 1)).repeat(1, ow).reshape(-1))
    cols_ = P.add(P.mul(P.remainder(arg, k[1]), d[1]),
                  S.reshape(P.sub(P.mul(arange(ow, device=dev), s[1]), p[1]), (1, ow)).repeat(oh, 1).reshape(-1))
    idx = S.reshape(P.add(P.mul(rows, w), cols_), (n, c, oh, ow)).to(dt.int64)
    return (S.squeeze(out, 0), S.squeeze(idx, 0)) if unbatched else (out, idx)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """torch.nn.functional.avg_pool2d."""
    opname = "avg_pool2d"
    x, unbatched = _batched(input, opname)
    _check_float(x, opname)
    k, s, p, d, (oh, ow), extra = _pool_geometry(x, kernel_size, stride, padding, 1, ceil_mode, opname)
    n, c, h, w = x._shape
    cols = _unfold(_padded(x, p, extra, 0.0), k, d, s)
    total = R.sum(S.reshape(cols, (n, c, k[0] * k[1], oh * ow)), 2)
    if divisor_override is not None:
        if not divisor_override:
            raise RuntimeError("avg_pool2d(): divisor must be not zero")
        out = P.div(total, divisor_override)
    elif not any(extra) and (count_include_pad or not any(p)):
        out = P.div(total, k[0] * k[1])
    else:
        from .creation import ones
        from .padding import pad
        # The count of each window: cells inside the padded input (count_include_pad) or the input itself,
        # never the ceil_mode overhang.
        if count_include_pad:
            mask = pad(ones((1, 1, h + 2 * p[0], w + 2 * p[1]), dtype=x._dtype, device=x._storage.device),
                       (0, extra[1], 0, extra[0]))
        else:
            mask = pad(ones((1, 1, h, w), dtype=x._dtype, device=x._storage.device),
                       (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))
        counts = R.sum(_unfold(mask, k, d, s), 1)                          # (1, OH*OW)
        out = P.div(total, S.reshape(counts, (1, 1, oh * ow)))
    out = S.reshape(out, (n, c, oh, ow))
    return S.squeeze(out, 0) if unbatched else out


def _averaging_matrix(n_in, n_out, like):
    """(n_out, n_in): row i holds 1/len over input cells floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out) - 1."""
    from .creation import arange
    dev = like._storage.device
    i = S.reshape(arange(n_out, device=dev), (n_out, 1))
    j = S.reshape(arange(n_in, device=dev), (1, n_in))
    start = P.floor_divide(P.mul(i, n_in), n_out)
    end = P.floor_divide(P.add(P.mul(P.add(i, 1), n_in), n_out - 1), n_out)
    inside = P.logical_and(P.ge(j, start), P.lt(j, end)).to(like._dtype)
    return P.div(inside, P.sub(end, start).to(like._dtype))


def adaptive_avg_pool2d(input, output_size):
    """torch.nn.functional.adaptive_avg_pool2d; output_size an int, a pair, or a pair with None (keep the size)."""
    opname = "adaptive_avg_pool2d"
    x, unbatched = _batched(input, opname)
    _check_float(x, opname)
    size = (output_size, output_size) if isinstance(output_size, int) or output_size is None else tuple(output_size)
    if len(size) != 2:
        raise TypeError(f"{opname}(): output_size must be an int or a pair, got {output_size!r}")
    h, w = x._shape[2:]
    oh, ow = (h if size[0] is None else size[0]), (w if size[1] is None else size[1])
    if not all(isinstance(v, int) and v > 0 for v in (oh, ow)):
        raise RuntimeError(f"{opname}(): output_size must be positive, got {output_size!r}")
    if h == 0 or w == 0:
        raise RuntimeError(f"{opname}(): input of shape {list(x._shape)} has an empty spatial dim")
    out = x
    if oh != h:
        out = matmul(_averaging_matrix(h, oh, x), out)                                  # (N, C, oh, W)
    if ow != w:
        out = matmul(out, S.transpose(_averaging_matrix(w, ow, x), 0, 1))               # (N, C, oh, ow)
    if out is x:
        out = S.view(x, x._shape)
    return S.squeeze(out, 0) if unbatched else out

