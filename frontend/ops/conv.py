"""2-D convolution as im2col + GEMM: F.unfold, F.fold and F.conv2d.

unfold (im2col) reads the (N, C, kh, kw, OH, OW) windows of the input as one
strided view of its storage (no index tensor) and copies it contiguous as
(N, C*kh*kw, OH*OW); fold (col2im) is its adjoint: kh*kw strided in-place
adds into a zero image, each window offset (i, j) adding the (N, C, OH, OW)
slab of the columns at that offset, then the padding cropped. Each is the
other's gradient, written in ops, so both differentiate again and run on
every backend. conv2d is unfold then one matmul against the (C_out, C/groups
*kh*kw) weight (a batched matmul over groups), which on CUDA goes through
cutegrad's GEMM: no kernel of its own, no host sync (shapes only are read on
the host). The price is the column buffer, kh*kw times the input.
"""
import builtins

from ..autocast import gate as _AC, lower as _ac_lower
from ..autograd import grad_mode
from ..autograd.engine import Node, attach
from ..tensor import Tensor
from . import pointwise as P
from . import shape as S
from .linalg import matmul

_state = grad_mode.state


def _pair(v, name, opname, allow_zero=True):
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in t):
        raise TypeError(f"{opname}(): {name} must be an int or a pair of ints, got {v!r}")
    low = 0 if allow_zero else 1
    if any(e < low for e in t):
        raise RuntimeError(f"{opname}(): {name} must be {'non-negative' if allow_zero else 'positive'}, got {v!r}")
    return t


def out_size(n, k, d, p, s):
    """Output length of a sliding window: floor((n + 2p - d(k-1) - 1) / s) + 1."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _windows(x, k, d, s, opname):
    """(N, C, kh, kw, OH, OW) strided view of the windows of an unpadded 4-D x."""
    n, c, h, w = x._shape
    oh, ow = out_size(h, k[0], d[0], 0, s[0]), out_size(w, k[1], d[1], 0, s[1])
    if oh <= 0 or ow <= 0:
        raise RuntimeError(f"{opname}(): the (padded) input of spatial size ({h}, {w}) is smaller than the "
                           f"kernel of extent ({d[0] * (k[0] - 1) + 1}, {d[1] * (k[1] - 1) + 1})")
    sn, sc, sh, sw = x._strides
    view = S._view(x, (n, c, k[0], k[1], oh, ow), (sn, sc, d[0] * sh, d[1] * sw, s[0] * sh, s[1] * sw), x._offset)
    return view, oh, ow


class UnfoldBackward(Node):
    __slots__ = ("hw", "k", "d", "s")

    def backward(self, g):
        return (_fold(g, self.hw, self.k, self.d, self.s),)


def _unfold(x, k, d, s):
    """im2col of an unpadded 4-D x: (N, C*kh*kw, OH*OW)."""
    from .conversion import contiguous
    with grad_mode.no_grad():
        view, oh, ow = _windows(x, k, d, s, "unfold")
        out = S.reshape(contiguous(view), (x._shape[0], x._shape[1] * k[0] * k[1], oh * ow))
    if _state.enabled and x._requires_grad:
        node = UnfoldBackward()
        node.hw, node.k, node.d, node.s = x._shape[2:], k, d, s
        attach(out, node, (x,))
    return out


class FoldBackward(Node):
    __slots__ = ("k", "d", "s")

    def backward(self, g):
        return (_unfold(g, self.k, self.d, self.s),)


def _fold(cols, hw, k, d, s):
    """col2im into an unpadded (N, C, H, W): the adjoint of _unfold."""
    from .creation import zeros
    n, ckk, _ = cols._shape
    c = ckk // (k[0] * k[1])
    with grad_mode.no_grad():
        out = zeros((n, c) + tuple(hw), dtype=cols._dtype, device=cols._storage.device)
        oh, ow = out_size(hw[0], k[0], d[0], 0, s[0]), out_size(hw[1], k[1], d[1], 0, s[1])
        slabs = S.reshape(cols, (n, c, k[0], k[1], oh, ow))
        sn, sc, sh, sw = out._strides
        for i in range(k[0]):
            for j in range(k[1]):
                region = S._view(out, (n, c, oh, ow), (sn, sc, s[0] * sh, s[1] * sw), i * d[0] * sh + j * d[1] * sw)
                region.add_(slabs[:, :, i, j])
    if _state.enabled and cols._requires_grad:
        node = FoldBackward()
        node.k, node.d, node.s = k, d, s
        attach(out, node, (cols,))
    return out


def _batched(x, opname, what="input"):
    if not isinstance(x, Tensor):
        raise TypeError(f"{opname}(): argument '{what}' must be Tensor, not {type(x).__name__}")
    if len(x._shape) == 3:
        return S.unsqueeze(x, 0), True
    if len(x._shape) != 4:
        raise RuntimeError(f"{opname}(): expected a 3-D (unbatched) or 4-D (batched) {what}, got shape "
                           f"{list(x._shape)}")
    return x, False


def unfold(input, kernel_size, dilation=1, padding=0, stride=1):
    """torch.nn.functional.unfold: (N, C, H, W) -> (N, C*kh*kw, L) sliding windows (im2col)."""
    k = _pair(kernel_size, "kernel_size", "unfold", allow_zero=False)
    d = _pair(dilation, "dilation", "unfold", allow_zero=False)
    p = _pair(padding, "padding", "unfold")
    s = _pair(stride, "stride", "unfold", allow_zero=False)
    x, unbatched = _batched(input, "unfold")
    if p != (0, 0):
        from .padding import pad
        x = pad(x, (p[1], p[1], p[0], p[0]))
    out = _unfold(x, k, d, s)
    return S.squeeze(out, 0) if unbatched else out


def fold(input, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """torch.nn.functional.fold: (N, C*kh*kw, L) -> (N, C, H, W), summing overlapping windows (col2im)."""
    hw = _pair(output_size, "output_size", "fold", allow_zero=False)
    k = _pair(kernel_size, "kernel_size", "fold", allow_zero=False)
    d = _pair(dilation, "dilation", "fold", allow_zero=False)
    p = _pair(padding, "padding", "fold")
    s = _pair(stride, "stride", "fold", allow_zero=False)
    if not isinstance(input, Tensor):
        raise TypeError(f"fold(): argument 'input' must be Tensor, not {type(input).__name__}")
    unbatched = len(input._shape) == 2
    cols = S.unsqueeze(input, 0) if unbatched else input
    if len(cols._shape) != 3:
        raise RuntimeError(f"fold(): expected a 2-D (unbatched) or 3-D (batched) input, got {list(input._shape)}")
    padded = (hw[0] + 2 * p[0], hw[1] + 2 * p[1])
    blocks = out_size(hw[0], k[0], d[0], p[0], s[0]) * out_size(hw[1], k[1], d[1], p[1], s[1])
    if cols._shape[1] % (k[0] * k[1]) or cols._shape[2] != blocks:
        raise RuntimeError(f"fold(): input of shape {list(input._shape)} does not hold C*{k[0]}*{k[1]} rows and "
                           f"{blocks} blocks for output_size {list(hw)}, kernel {list(k)}, dilation {list(d)}, "
                           f"padding {list(p)}, stride {list(s)}")
    out = _fold(cols, padded, k, d, s)
    if p != (0, 0):
        out = S.narrow(S.narrow(out, 2, p[0], hw[0]), 3, p[1], hw[1])
    return S.squeeze(out, 0) if unbatched else out


def _same_padding(k, d, s):
    if s != (1, 1):
        raise RuntimeError("conv2d(): padding='same' is not supported for strided convolutions")
    total = [di * (ki - 1) for ki, di in zip(k, d)]
    return [(t // 2, t - t // 2) for t in total]


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """torch.nn.functional.conv2d (cross-correlation), input (N, C, H, W) or (C, H, W)."""
    opname = "conv2d"
    if _AC.armed and isinstance(input, Tensor):  # a lower-precision op under autocast, as in torch
        input, weight, bias = _ac_lower(input, weight, bias)
    x, unbatched = _batched(input, opname)
    if not isinstance(weight, Tensor) or len(weight._shape) != 4:
        raise RuntimeError(f"conv2d(): expected a 4-D weight (out_channels, in_channels/groups, kh, kw), got "
                           f"{list(weight._shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if not isinstance(groups, int) or groups < 1:
        raise RuntimeError(f"conv2d(): groups must be a positive int, got {groups!r}")
    cout, cin_g, kh, kw = weight._shape
    n, c, h, w = x._shape
    if c != cin_g * groups:
        raise RuntimeError(f"conv2d(): input of shape {list(input._shape)} has {c} channels but weight of shape "
                           f"{list(weight._shape)} with groups={groups} expects {cin_g * groups}")
    if cout % groups:
        raise RuntimeError(f"conv2d(): out_channels {cout} is not divisible by groups={groups}")
    if bias is not None and tuple(bias._shape) != (cout,):
        raise RuntimeError(f"conv2d(): bias of shape {list(bias._shape)} does not match out_channels {cout}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t._dtype is not x._dtype:
            raise RuntimeError(f"conv2d(): input is {x._dtype} but {name} is {t._dtype}; they must match")
        if t is not None and t._storage.device is not x._storage.device:
            raise RuntimeError(f"conv2d(): input is on {x.device} but {name} is on {t.device}")
    if not x._dtype.is_floating_point:
        raise RuntimeError(f"conv2d(): expected a floating point input, got {x._dtype}")
    k = (kh, kw)
    s = _pair(stride, "stride", opname, allow_zero=False)
    d = _pair(dilation, "dilation", opname, allow_zero=False)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"conv2d(): padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        pads = _same_padding(k, d, s) if padding == "same" else [(0, 0), (0, 0)]
    else:
        pads = [(p, p) for p in _pair(padding, "padding", opname)]
    if any(builtins.sum(p) for p in pads):
        from .padding import pad
        x = pad(x, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
    cols = _unfold(x, k, d, s)                       # (N, C*kh*kw, L)
    oh = out_size(x._shape[2], kh, d[0], 0, s[0])
    ow = out_size(x._shape[3], kw, d[1], 0, s[1])
    if groups == 1:
        out = matmul(S.reshape(weight, (cout, cin_g * kh * kw)), cols)
    else:
        wg = S.reshape(weight, (groups, cout // groups, cin_g * kh * kw))
        out = matmul(wg, S.reshape(cols, (n, groups, cin_g * kh * kw, oh * ow)))
    out = S.reshape(out, (n, cout, oh, ow))
    if bias is not None:
        out = P.add(out, S.reshape(bias, (1, cout, 1, 1)))
    return S.squeeze(out, 0) if unbatched else out
