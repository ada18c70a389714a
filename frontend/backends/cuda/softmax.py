"""softmax, causal softmax and the fused softmax backward (kernels/cuda/softmax.cu).
"""
from ...device import CUDA
from ...dispatch import register
from ...tensor import numel_of
from .launch import _contig, _empty, _lib, _ptr, _stream


@register("softmax", CUDA)
def softmax(x, dim, log):
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape
    d = dim + len(shape) if dim < 0 else dim
    out = _empty(shape, x._dtype, dev, stream)
    _lib().softmax(_ptr(x), _ptr(out), x._dtype.index, numel_of(shape[:d]), shape[d], numel_of(shape[d + 1:]),
                   bool(log), 0, stream)
    return out


@register("softmax_causal", CUDA)
def softmax_causal(x):
    """softmax over the last dim of a (..., L, S) tensor with columns j > i of query row i
    (the top-left aligned tril of (L, S)) at -inf: 0 in the output; no mask tensor."""
    if len(x._shape) < 2:
        raise RuntimeError(f"softmax_causal: expected a (..., L, S) input, got shape {list(x._shape)}")
    dev = x._storage.device
    stream = _stream(dev.index)
    x = _contig(x, stream)
    shape = x._shape
    out = _empty(shape, x._dtype, dev, stream)
    _lib().softmax(_ptr(x), _ptr(out), x._dtype.index, numel_of(shape[:-1]), shape[-1], 1, False, shape[-2], stream)
    return out


@register("softmax_backward", CUDA)
def softmax_backward(y, dy, dim, log):
    """Gradient of softmax (log=False) or log_softmax (log=True) along dim from its output y."""
    if dy._shape != y._shape:
        raise RuntimeError(f"softmax_backward: grad_output of shape {list(dy._shape)} does not match the output's "
                           f"shape {list(y._shape)}")
    if dy._storage.device is not y._storage.device:
        raise RuntimeError(f"softmax_backward: grad_output on {dy._storage.device}, output on {y._storage.device}")
    dev = y._storage.device
    stream = _stream(dev.index)
    if dy._dtype is not y._dtype:
        dy = dy.to(y._dtype)
    y = _contig(y, stream)
    dy = _contig(dy, stream)
    shape = y._shape
    d = dim + len(shape) if dim < 0 else dim
    dx = _empty(shape, y._dtype, dev, stream)
    _lib().softmax_backward(_ptr(y), _ptr(dy), _ptr(dx), y._dtype.index, numel_of(shape[:d]), shape[d],
                            numel_of(shape[d + 1:]), bool(log), stream)
    return dx
