"""Adam and AdamW, with torch.optim's update order and bias correction, so a
cutegrad run and a PyTorch run from the same weights agree step by step.

Two paths (see fused.py for when each is taken): the fused multi-tensor CUDA
kernel, one launch per 48 parameters of a (device, dtype) bucket plus a
one-block launch before it that adds 1 to every parameter's device step
counter (state["step"], a one-element float32 tensor), so the update reads the
count after this step and a captured graph advances it on every replay; and
the composite path (tensor ops per parameter, an int step), which is the CPU
path and covers amsgrad.
"""
import math

from .. import dtypes as dt
from .. import ops
from ..tensor import Tensor
from ..dispatch import kernel
from . import weight_shadows
from .fused import buckets, check_fused_option, use_fused
from .optimizer import Optimizer, check_lr, lr_value

_K_ADAMW = kernel("adamw_multi_tensor")


class Adam(Optimizer):
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, fused=None):
        check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        check_fused_option(fused)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, fused=fused))

    def _fused_option_blocker(self, group):
        return "amsgrad is not covered by the fused kernel" if group["amsgrad"] else None

    def _update_group(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if use_fused(type(self).__name__, group, params, self._fused_option_blocker(group)):
            self._fused_update(group, params)
        else:
            self._composite_update(group, params)

    def _takes_grad_scale(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        return not params or use_fused(type(self).__name__, group, params, self._fused_option_blocker(group))

    def _fused_update(self, group, params):
        b1, b2 = group["betas"]
        for (device, _, _), ps in buckets(params).items():
            ms, vs, steps = [], [], []
            for p in ps:
                state = self.state.setdefault(p, {})
                if "exp_avg" not in state:
                    state["exp_avg"] = ops.zeros_like(p)
                    state["exp_avg_sq"] = ops.zeros_like(p)
                state["step"] = _device_step(state.get("step", 0), device)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            shadows, shadow_dtype = weight_shadows.shadows_for(ps)
            _K_ADAMW.impl[device.backend](
                ps, [p.grad for p in ps], ms, vs, group["lr"], b1, b2, group["eps"], group["weight_decay"], steps,
                maximize=group["maximize"], decoupled=self._decoupled, increment_step=True,
                grad_scale=self._grad_scale, shadows=shadows, shadow_dtype=shadow_dtype)
            weight_shadows.refresh(ps, shadows)

    def _composite_update(self, group, params):
        lr, (b1, b2), eps, wd = lr_value(group["lr"]), group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            g = ops.neg(p.grad) if group["maximize"] else p.grad
            if self._grad_scale is not None:
                g = ops.mul(g, self._grad_scale.to(g.device).to(g.dtype))
            state = self.state.setdefault(p, {})
            if not state:
                state["step"] = 0
                state["exp_avg"] = ops.zeros_like(p)
                state["exp_avg_sq"] = ops.zeros_like(p)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = ops.zeros_like(p)
            if isinstance(state["step"], Tensor):  # left by the fused path: it stays a tensor
                state["step"].add_(1.0)
                step = float(state["step"])
            else:
                state["step"] += 1
                step = state["step"]
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = ops.zeros_like(p)
            if wd:
                if self._decoupled:
                    p.mul_(1 - lr * wd)
                else:
                    g = ops.add(g, p, alpha=wd)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.add_(ops.mul(ops.sub(g, m), 1 - b1))
            v.mul_(b2).add_(ops.mul(ops.mul(g, g), 1 - b2))
            bc1 = 1 - b1 ** step
            bc2_sqrt = math.sqrt(1 - b2 ** step)
            if group["amsgrad"]:
                vmax = state["max_exp_avg_sq"]
                vmax.copy_(ops.maximum(vmax, v))
                v = vmax
            denom = ops.add(ops.div(ops.sqrt(v), bc2_sqrt), eps)
            p.sub_(ops.mul(ops.div(m, denom), lr / bc1))


def _device_step(step, device):
    """The step count as a one-element float32 tensor on the device (the kernel adds 1 to it)."""
    if isinstance(step, Tensor):
        if step.device == device and step.dtype is dt.float32 and step.numel() == 1 and step.is_contiguous():
            return step
        step = float(step)
    return ops.full((), float(step), dtype=dt.float32, device=device)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr*wd."""
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, fused)
