"""Gradient clipping. The total norm stays a tensor and the scale is applied
with tensor ops, so clipping needs no host sync (and captures in a graph).

The 2-norm of contiguous CUDA gradients of one dtype and device takes the
fused path: grad_norm_clip (two launches: per-chunk partial sums, then one
block that writes the norm and the clipping coefficient) and
multi_tensor_scale (one launch per 48 gradients, reading the coefficient on the
device). Other norms, error_if_nonfinite and everything else are composite.
"""
from ... import dtypes as dt
from ... import ops
from ...tensor import Tensor
from ...autograd import grad_mode

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


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    grads = _grads(parameters)
    if not grads:
        return ops.tensor(0.0)
    norm_type = float(norm_type)
    with grad_mode.no_grad():
        if norm_type == 2.0 and not error_if_nonfinite and _fusable(grads):
            from ...backends.cuda import grad_norm_clip, multi_tensor_scale
            norm_and_coef = grad_norm_clip(grads, float(max_norm))
            multi_tensor_scale(grads, norm_and_coef[1:])
            # computed in float32; returned in the gradients' dtype, as torch's total norm is
            return norm_and_coef[0].to(grads[0].dtype)
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
