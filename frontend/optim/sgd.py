"""SGD with momentum, dampening, Nesterov and (coupled) weight decay,
following torch.optim.SGD's update order exactly."""
from .. import ops
from .optimizer import Optimizer, required


class SGD(Optimizer):
    def __init__(self, params, lr=required, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        if lr is not required and lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    def _update_group(self, group):
        lr, mom, damp, wd = group["lr"], group["momentum"], group["dampening"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            d_p = ops.neg(p.grad) if group["maximize"] else p.grad
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
