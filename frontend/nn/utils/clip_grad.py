"""Gradient clipping. The total norm stays a tensor and the scale is applied
with tensor ops, so clipping needs no host sync (and captures in a graph)."""
from ... import ops
from ...tensor import Tensor
from ...autograd import grad_mode


def _grads(parameters):
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    grads = _grads(parameters)
    if not grads:
        return ops.tensor(0.0)
    norm_type = float(norm_type)
    with grad_mode.no_grad():
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
