"""Custom differentiable functions, in torch.autograd.Function's style.

    class Square(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x
        @staticmethod
        def backward(ctx, grad):
            x, = ctx.saved_tensors
            return 2 * x * grad

    y = Square.apply(x)
"""
from . import grad_mode
from .engine import Node, attach


class FunctionCtx(Node):
    __slots__ = ("_fn", "_n_inputs", "needs_input_grad", "__dict__")

    def save_for_backward(self, *tensors):
        self.save(*tensors)

    def mark_non_differentiable(self, *tensors):
        self._nondiff = set(id(t) for t in tensors)

    def backward(self, grad):
        with grad_mode.set_grad_enabled(grad_mode.state.enabled):
            grads = self._fn.backward(self, grad)
        if not isinstance(grads, tuple):
            grads = (grads,)
        if len(grads) != self._n_inputs:
            raise RuntimeError(f"function {self._fn.__name__}.backward returned {len(grads)} gradients, "
                               f"expected {self._n_inputs} (one per forward argument)")
        return tuple(g for g, keep in zip(grads, self._tensor_mask) if keep)

    def name(self):
        return self._fn.__name__ + "Backward"


class Function:
    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args):
        from ..tensor import Tensor
        ctx = FunctionCtx()
        ctx._fn = cls
        ctx._n_inputs = len(args)
        ctx._tensor_mask = [isinstance(a, Tensor) for a in args]
        ctx.needs_input_grad = tuple(isinstance(a, Tensor) and a._requires_grad for a in args)
        with grad_mode.no_grad():
            out = cls.forward(ctx, *args)
        if not isinstance(out, Tensor):
            raise TypeError(f"{cls.__name__}.forward must return a single Tensor")
        if grad_mode.state.enabled and any(ctx.needs_input_grad):
            if out._base is not None or any(out is a for a in args):
                out = out.clone() if out._base is None else out.detach().clone()
            attach(out, ctx, [a for a in args if isinstance(a, Tensor)])
        return out
