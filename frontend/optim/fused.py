"""Which parameters the fused multi-tensor CUDA kernels can update, and in what buckets.

The optimizers take the fused path (one launch per 48 tensors of a (device,
parameter dtype, gradient dtype) bucket, cutegrad.backends.cuda's
adamw_multi_tensor / sgd_multi_tensor) when every parameter of a group that has
a gradient can be updated by it; otherwise the group keeps the composite path
(tensor ops per parameter), which is also the CPU path. `fused` is the
optimizers' constructor option, in torch's spirit: None chooses per step, True
requires the fused path and raises naming the first parameter that is not
eligible, False always takes the composite path.

On the fused path everything a captured CUDA graph must see change between
replays is device memory: the Adam step count (state["step"], a one-element
float32 tensor on the parameter's device, incremented by the kernel launch),
and the learning rate when group["lr"] is a one-element float32 tensor (read
by the kernel; schedules fill it in place).
"""
from .. import dtypes as dt
from ..tensor import Tensor

_PARAM_DTYPES = (dt.float32, dt.float16, dt.bfloat16)
_GRAD_DTYPES = (dt.float32, dt.float16, dt.bfloat16, dt.float64)


def check_fused_option(fused):
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"fused must be None, True or False, got {fused!r}")


def param_blocker(i, p):
    """Why parameter i cannot be updated by the fused kernels (None: it can)."""
    if p.device.type != "cuda":
        return f"parameter {i} is on {p.device}; the fused kernels need CUDA tensors"
    if p.dtype not in _PARAM_DTYPES:
        return f"parameter {i} is {p.dtype}; the fused kernels take float32, float16 or bfloat16 parameters"
    if not p.is_contiguous():
        return f"parameter {i} (shape {list(p.shape)}) is not contiguous"
    return None


def grad_blocker(i, p):
    """Why the gradient of parameter i cannot be read by the fused kernels (None: it can)."""
    g = p.grad
    if g.device != p.device:
        return f"the gradient of parameter {i} is on {g.device}, the parameter on {p.device}"
    if g.dtype not in _GRAD_DTYPES:
        return f"the gradient of parameter {i} is {g.dtype}; the fused kernels need a floating-point gradient"
    if tuple(g.shape) != tuple(p.shape):
        return f"the gradient of parameter {i} has shape {list(g.shape)}, the parameter {list(p.shape)}"
    if not g.is_contiguous():
        return f"the gradient of parameter {i} is not contiguous"
    return None


def lr_blocker(lr, devices):
    """Why a group's lr cannot be handed to the kernels on these devices (None: it can)."""
    if not isinstance(lr, Tensor):
        return None
    if lr.device.type != "cuda" or lr.dtype is not dt.float32 or lr.numel() != 1:
        return (f"lr is a {lr.dtype} tensor of {lr.numel()} element(s) on {lr.device}; the fused kernels read a "
                f"one-element float32 CUDA tensor")
    for d in devices:
        if d != lr.device:
            return f"lr is on {lr.device}, a parameter on {d}"
    return None


def group_blocker(params, lr, check_grads):
    """The first reason the fused path cannot take these parameters, or None."""
    for i, p in enumerate(params):
        why = param_blocker(i, p) or (grad_blocker(i, p) if check_grads and p.grad is not None else None)
        if why:
            return why
    return lr_blocker(lr, {p.device for p in params})


def use_fused(opt_name, group, params, option_blocker=None):
    """True when this step of the group goes through the fused kernels; raises if fused=True cannot."""
    fused = group.get("fused")
    if fused is False or not params:
        return False
    why = option_blocker or group_blocker(params, group["lr"], check_grads=True)
    if why is None:
        return True
    if fused:
        raise ValueError(f"{opt_name}(fused=True): {why}")
    return False


def check_fused_at_construction(opt_name, groups, option_blocker):
    """fused=True must be satisfiable by the parameters themselves (gradients are checked per step)."""
    for group in groups:
        if group.get("fused"):
            why = option_blocker(group) or group_blocker(group["params"], group["lr"], check_grads=False)
            if why:
                raise ValueError(f"{opt_name}(fused=True): {why}")


def buckets(params, key_extra=None):
    """Parameters grouped by (device, parameter dtype, gradient dtype[, key_extra(p)]), in order."""
    out = {}
    for p in params:
        key = (p.device, p.dtype, p.grad.dtype) if key_extra is None else \
            (p.device, p.dtype, p.grad.dtype, key_extra(p))
        out.setdefault(key, []).append(p)
    return out
