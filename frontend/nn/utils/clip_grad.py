"""Gradient clipping. The total norm stays a tensor and the scale is applied
with tensor ops, so clipping needs no host sync (and captures in a graph).

The 2-norm of contiguous CUDA gradients of one dtype and device takes the
fused path: grad_norm_clip (two launches: per-chunk partial sums, then one
block that writes the norm and the clipping coefficient) and
multi_tensor_scale (one launch per 48 gradients, reading the coefficient on the
device). Other norms, error_if_nonfinite and everything else are composite.
Optimizer.clip_grad_norm_ skips the scaling pass: the fused optimizers read the
coefficient as their gradient scale.
"""
from ... import dtypes as dt
from ... import ops
from ...tensor import Tensor
from ...autograd import grad_mode
from ...device import CUDA
from ...dispatch import kernel

_K_NORM_CLIP = kernel("grad_norm_clip")
_K_SCALE = kernel("multi_tensor_scale")

_FUSED_DTYPES = (dt.float32, dt.float16, dt.bfloat16)


def _grads(parameters):
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def _fusable(grads):
    g0 = grads[0]
    if g0.device.type != "cuda" or g0.dtype not in _FUSED_DTYPES:
        return False
    return all(g.device == g0.device and g.dtype is g0.dtype and g.is_contiguous() for g in grads)


def fused_norm_and_coefficient(grads, max_norm, norm_type=2.0):
    """(total 2-norm in the gradients' dtype, float32 clipping coefficient of one element), both on
    the device, from grad_norm_clip's two launches; None where the fused kernel cannot take grads."""
    if float(norm_type) != 2.0 or not grads or not _fusable(grads):
        return None
    norm_and_coef = _K_NORM_CLIP.impl[CUDA](grads, float(max_norm))
    # computed in float32; returned in the gradients' dtype, as torch's total norm is
    return norm_and_coef[0].to(grads[0].dtype), norm_and_coef[1:]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    grads = _grads(parameters)
    if not grads:
        return ops.tensor(0.0)
    norm_type = float(norm_type)
    with grad_mode.no_grad():
        found = None if error_if_nonfinite else fused_norm_and_coefficient(grads, max_norm, norm_type)
        if found is not None:
            total, coef = found
            _K_SCALE.impl[CUDA](grads, coef)
            return total
        if norm_type == float("inf"):
            norms = [ops.amax(ops.abs(g)).to(grads[0].dtype) for g in grads]
            total = ops.amax(ops.stack(norms))
        else:
            sums = [ops.sum(ops.pow(ops.abs(g), norm_type)).to(grads[0].dtype) for g in grads]
            total = ops.pow(ops.sum(ops.stack(sums)), 1.0 / norm_type)
        if error_if_nonfinite and not bool(ops.isfinite(total)):
            raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                               f"so it cannot be clipped. To disable this error and scale the gradients by the "
                               f"non-finite norm anyway, set `error_if_nonfinite=False`")
        coef = ops.clamp(ops.div(max_norm, ops.add(total, 1e-6)), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


def clip_grad_value_(parameters, clip_value, foreach=None):
    with grad_mode.no_grad():
        for g in _grads(parameters):
            g.clamp_(-clip_value, clip_value)
