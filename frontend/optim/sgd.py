"""SGD with momentum, dampening, Nesterov and (coupled) weight decay,
following torch.optim.SGD's update order exactly.

Two paths (see fused.py for when each is taken): the fused multi-tensor CUDA
kernel, one launch per 48 parameters of a (device, dtype, has a momentum
buffer yet) bucket -- parameters without a buffer get an uninitialised one
that the kernel fills with the first step's direction, as torch's first step
clones it; and the composite path (tensor ops per parameter), the CPU path.
"""
from .. import ops
from ..dispatch import kernel
from . import weight_shadows
from .fused import buckets, check_fused_option, use_fused
from .optimizer import Optimizer, check_lr, lr_value, required

_K_SGD = kernel("sgd_multi_tensor")


class SGD(Optimizer):
    def __init__(self, params, lr=required, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, fused=None):
        if lr is not required:
            check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_fused_option(fused)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, fused=fused))

    def _update_group(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if use_fused(type(self).__name__, group, params):
            self._fused_update(group, params)
        else:
            self._composite_update(group, params)

    def _has_buffer(self, p):
        return self.state.get(p, {}).get("momentum_buffer") is not None

    def _takes_grad_scale(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        return not params or use_fused(type(self).__name__, group, params)

    def _fused_update(self, group, params):
        mom = group["momentum"]
        for (device, pdt, _, had_buffer), ps in buckets(params, self._has_buffer if mom else lambda p: False).items():
            bufs = None
            if mom:
                bufs = []
                for p in ps:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = ops.empty_like(p)
                    elif buf.dtype is not pdt:
                        buf = state["momentum_buffer"] = buf.to(pdt)
                    bufs.append(buf)
            shadows, shadow_dtype = weight_shadows.shadows_for(ps)
            _K_SGD.impl[device.backend](
                ps, [p.grad for p in ps], bufs, group["lr"], mom, group["dampening"], group["weight_decay"],
                group["nesterov"], first_step=bool(mom) and not had_buffer, maximize=group["maximize"],
                grad_scale=self._grad_scale, shadows=shadows, shadow_dtype=shadow_dtype)
            weight_shadows.refresh(ps, shadows)

    def _composite_update(self, group, params):
        lr, mom, damp, wd = lr_value(group["lr"]), group["momentum"], group["dampening"], group["weight_decay"]
        for p in params:
            d_p = ops.neg(p.grad) if group["maximize"] else p.grad
            if self._grad_scale is not None:
                d_p = ops.mul(d_p, self._grad_scale.to(d_p.device).to(d_p.dtype))
            if wd:
                d_p = ops.add(d_p, p, alpha=wd)
            if mom:
                state = self.state.setdefault(p, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = ops.clone(d_p)
                else:
                    buf.mul_(mom).add_(d_p, alpha=1 - damp)
                d_p = ops.add(d_p, buf, alpha=mom) if group["nesterov"] else buf
            p.add_(d_p, alpha=-lr)
