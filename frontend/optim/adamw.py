"""Adam and AdamW, with torch.optim's update order and bias correction, so a
cutegrad run and a PyTorch run from the same weights agree step by step."""
import math

from .. import ops
from .optimizer import Optimizer


class Adam(Optimizer):
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize))

    def _update_group(self, group):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = ops.neg(p.grad) if group["maximize"] else p.grad
            state = self.state.setdefault(p, {})
            if not state:
                state["step"] = 0
                state["exp_avg"] = ops.zeros_like(p)
                state["exp_avg_sq"] = ops.zeros_like(p)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = ops.zeros_like(p)
            state["step"] += 1
            step = state["step"]
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


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr*wd."""
    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize)
