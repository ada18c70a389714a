"""Fused optimizer steps and gradient clipping over many tensors per launch
(kernels/cuda/optim.cu); CUDA only, the CPU optimizers use the ordinary ops.
"""
from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import register
from ...tensor import Tensor, numel_of
from .launch import _empty, _is_cuda, _lib, _ptr, _stream


_MT_CHUNK = 8192  # elements per block of the multi-tensor kernels


def _multi_tensor_lists(name, tensor_lists):
    """Pointer lists of equally long lists of contiguous CUDA tensors on one device, their sizes and dtypes."""
    ref = tensor_lists[0]
    dev = ref[0]._storage.device if ref and _is_cuda(ref[0]) else None
    out = []
    for lst in tensor_lists:
        if len(lst) != len(ref):
            raise ValueError(f"{name}: tensor lists differ in length ({len(lst)} vs {len(ref)})")
        dtype = lst[0]._dtype if lst else None
        ptrs = []
        for i, t in enumerate(lst):
            if not _is_cuda(t) or not t.is_contiguous():
                raise ValueError(f"{name}: tensor {i} must be a contiguous CUDA tensor")
            if t._storage.device != dev:
                raise ValueError(f"{name}: tensor {i} is on {t._storage.device}, the others on {dev}")
            if t._dtype is not dtype:
                raise ValueError(f"{name}: tensor {i} is {t._dtype}, the others of its list {dtype}")
            if t._shape != ref[i]._shape:
                raise ValueError(f"{name}: tensor {i} has shape {list(t._shape)}, expected {list(ref[i]._shape)}")
            ptrs.append(_ptr(t))
        out.append((ptrs, dtype))
    numels = [numel_of(t._shape) for t in ref]
    return out, numels


def _scalar_ptr(t, name, what, dev):
    """Device address of an optional one-element float32 tensor on dev (0 for None)."""
    if t is None:
        return 0
    if not _is_cuda(t) or t._dtype is not dt.float32 or numel_of(t._shape) != 1:
        raise ValueError(f"{name}: {what} must be a one-element float32 CUDA tensor")
    if t._storage.device != dev:
        raise ValueError(f"{name}: {what} is on {t._storage.device}, the tensors on {dev}")
    return _ptr(t)


def _lr_args(lr, name, dev):
    """(float lr, device lr pointer): a tensor lr is read by the kernel from device memory."""
    if isinstance(lr, Tensor):
        return 0.0, _scalar_ptr(lr, name, "lr", dev)
    return float(lr), 0


@register("adamw_multi_tensor", CUDA)
def adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step,
                       maximize=False, grad_scale=None, decoupled=True, increment_step=False, shadows=None,
                       shadow_dtype=None):
    """Adam(W) on every parameter in place, 48 tensors per launch (torch.optim.AdamW's update).

    lr: a float, or a one-element float32 CUDA tensor read on the device (a
    schedule may change it between replays of a captured graph).
    step: the step count after this update as an int; or one one-element
    float32 CUDA tensor read by every parameter; or a list of such tensors, one
    per parameter. increment_step (list only): add 1 to each counter on the
    device first (one extra one-block launch per 48 tensors, queued before the
    update, so the update reads the incremented count) -- the optimizer's
    capturable path. decoupled: AdamW's decay p *= 1 - lr*wd (True) or Adam's
    g += wd*p (False). grad_scale: None or a one-element float32 CUDA tensor
    every gradient is multiplied by (the clipping coefficient of grad_norm_clip).
    shadows: None, or per parameter None or a contiguous shadow_dtype (bfloat16/float16)
    tensor of its shape that the kernel also writes the updated parameter into
    (the low-precision copy autocast reads: optim/weight_shadows.py).
    """
    if not params:
        return
    name = "adamw_multi_tensor"
    ((pp, pdt), (gp, gdt), (mp, mdt), (vp, vdt)), numels = _multi_tensor_lists(
        name, (params, grads, exp_avgs, exp_avg_sqs))
    if mdt is not pdt or vdt is not pdt:
        raise ValueError(f"{name}: optimizer states ({mdt}, {vdt}) must have the parameters' dtype {pdt}")
    dev = params[0]._storage.device
    step_ptrs = []
    if isinstance(step, (list, tuple)):
        if len(step) != len(params):
            raise ValueError(f"{name}: {len(step)} step counters for {len(params)} parameters")
        step_ptrs = [_scalar_ptr(s, name, f"step {i}", dev) for i, s in enumerate(step)]
        if increment_step and len(set(step_ptrs)) != len(step_ptrs):
            raise ValueError(f"{name}: increment_step needs a distinct step counter per parameter")
        step = 0.0
    elif isinstance(step, Tensor):
        if increment_step:
            raise ValueError(f"{name}: increment_step needs a list of step counters, one per parameter")
        step_ptrs, step = [_scalar_ptr(step, name, "step", dev)] * len(params), 0.0
    elif increment_step:
        raise ValueError(f"{name}: increment_step needs device step counters, got step={step!r}")
    lr, lr_ptr = _lr_args(lr, name, dev)
    _lib().adamw(pp, gp, mp, vp, numels, pdt.index, gdt.index, lr, lr_ptr, float(beta1), float(beta2), float(eps),
                 float(weight_decay), bool(decoupled), float(step), step_ptrs, bool(increment_step),
                 _scalar_ptr(grad_scale, name, "grad_scale", dev), bool(maximize), _MT_CHUNK, _stream(dev.index),
                 *_shadow_args(name, params, shadows, shadow_dtype))


def _shadow_args(name, params, shadows, shadow_dtype):
    """(pointer per parameter, 0 for none; dtype index) of the low-precision copies to write."""
    if shadows is None or all(s is None for s in shadows):
        return [], 0
    if len(shadows) != len(params):
        raise ValueError(f"{name}: {len(shadows)} shadows for {len(params)} parameters")
    if shadow_dtype not in (dt.bfloat16, dt.float16):
        raise ValueError(f"{name}: shadow_dtype must be bfloat16 or float16, got {shadow_dtype}")
    ptrs = []
    for i, (p, s) in enumerate(zip(params, shadows)):
        if s is None:
            ptrs.append(0)
            continue
        if not _is_cuda(s) or not s.is_contiguous() or s._dtype is not shadow_dtype or s._shape != p._shape \
                or s._storage.device != p._storage.device:
            raise ValueError(f"{name}: shadow {i} must be a contiguous {shadow_dtype} CUDA tensor of shape "
                             f"{list(p._shape)} on {p._storage.device}")
        ptrs.append(_ptr(s))
    return ptrs, shadow_dtype.index


@register("sgd_multi_tensor", CUDA)
def sgd_multi_tensor(params, grads, momentum_buffers, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, first_step=False, maximize=False, grad_scale=None, shadows=None,
                     shadow_dtype=None):
    """SGD (momentum, dampening, Nesterov, weight decay) on every parameter in place, as torch.optim.SGD.

    lr: a float, or a one-element float32 CUDA tensor read on the device.
    momentum_buffers: None for momentum 0; first_step: the buffers are
    initialised from the gradient (torch's first step) instead of updated.
    """
    if not params:
        return
    name = "sgd_multi_tensor"
    lists = (params, grads) if momentum_buffers is None else (params, grads, momentum_buffers)
    parts, numels = _multi_tensor_lists(name, lists)
    (pp, pdt), (gp, gdt) = parts[0], parts[1]
    bp = parts[2][0] if momentum_buffers is not None else []
    if momentum_buffers is not None and parts[2][1] is not pdt:
        raise ValueError(f"{name}: momentum buffers must have the parameters' dtype {pdt}")
    dev = params[0]._storage.device
    lr, lr_ptr = _lr_args(lr, name, dev)
    _lib().sgd(pp, gp, bp, numels, pdt.index, gdt.index, lr, lr_ptr, float(momentum), float(dampening),
               float(weight_decay), bool(nesterov), bool(first_step), _scalar_ptr(grad_scale, name, "grad_scale", dev),
               bool(maximize), _MT_CHUNK, _stream(dev.index), *_shadow_args(name, params, shadows, shadow_dtype))


@register("multi_tensor_scale", CUDA)
def multi_tensor_scale(tensors, scale):
    """Multiply every tensor (contiguous, one float dtype, one device) in place by a device scalar.

    scale: a one-element float32 CUDA tensor, read on the device (the clipping
    coefficient of grad_norm_clip), so no host sync; one launch per 48 tensors.
    """
    if not tensors:
        return
    name = "multi_tensor_scale"
    ((tp, tdt),), numels = _multi_tensor_lists(name, (tensors,))
    dev = tensors[0]._storage.device
    _lib().multi_tensor_scale(tp, numels, tdt.index, _scalar_ptr(scale, name, "scale", dev), _MT_CHUNK,
                              _stream(dev.index))


@register("grad_norm_clip", CUDA)
def grad_norm_clip(grads, max_norm):
    """A float32 CUDA tensor [total L2 norm of grads, min(1, max_norm / (norm + 1e-6))], computed on the device.

    The second element is the scale clip_grad_norm_ applies; pass out[1:] as
    grad_scale of the fused optimizers to clip and step without a host sync.
    The summation order is fixed (per-chunk partials, then one block), so the
    result is the same bits on every run.
    """
    if not grads:
        raise ValueError("grad_norm_clip: no gradients")
    ((gp, gdt),), numels = _multi_tensor_lists("grad_norm_clip", (grads,))
    dev = grads[0]._storage.device
    stream = _stream(dev.index)
    n_partial = max(1, sum((n + _MT_CHUNK - 1) // _MT_CHUNK for n in numels))
    partial = _empty((n_partial,), dt.float32, dev, stream)
    out = _empty((2,), dt.float32, dev, stream)
    _lib().grad_norm(gp, numels, gdt.index, _ptr(partial), n_partial, _ptr(out), float(max_norm), _MT_CHUNK, stream)
    return out
