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

forward may return a tuple of Tensors; backward then receives one gradient
per output (zeros for outputs that took no part in the loss).
"""
from . import grad_mode
from .engine import Node, attach, edge


class _GradSlots:
    """The gradients of a multi-output Function's outputs, one slot each. The
    engine adds what arrives for one node, so per-output contributions meet
    here before the Function's backward runs once."""
    __slots__ = ("grads",)

    def __init__(self, grads):
        self.grads = grads

    def __add__(self, other):
        return _GradSlots(tuple(a if b is None else b if a is None else a + b
                                for a, b in zip(self.grads, other.grads)))


class _OutputSlot(Node):
    """grad_fn of output `index` of a multi-output Function: forwards its
    gradient into that output's slot of the Function's node."""
    __slots__ = ("index", "count")

    def backward(self, g):
        grads = [None] * self.count
        grads[self.index] = g
        return (_GradSlots(tuple(grads)),)


class FunctionCtx(Node):
    __slots__ = ("_fn", "_n_inputs", "needs_input_grad", "__dict__")

    def save_for_backward(self, *tensors):
        self.save(*tensors)

    def mark_non_differentiable(self, *tensors):
        self._nondiff = set(id(t) for t in tensors)

    def backward(self, grad):
        if isinstance(grad, _GradSlots):  # several outputs: unused ones get zeros, as torch materializes them
            from ..ops import zeros
            args = [g if g is not None else zeros(shape, dtype=dtype, device=device)
                    for g, (shape, dtype, device) in zip(grad.grads, self._out_meta)]
        else:
            args = [grad]
        grads = self._fn.backward(self, *args)
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
        outs = out if isinstance(out, tuple) else (out,)
        if not outs or not all(isinstance(o, Tensor) for o in outs):
            raise TypeError(f"{cls.__name__}.forward must return a Tensor or a tuple of Tensors")
        if not (grad_mode.state.enabled and any(ctx.needs_input_grad)):
            return out
        # Outputs that alias an input or a view get their own memory, so the
        # recorded history cannot be confused with the input's.
        outs = tuple(o.clone() if o._base is None and any(o is a for a in args) else
                     o.detach().clone() if o._base is not None else o for o in outs)
        inputs = [a for a in args if isinstance(a, Tensor)]
        if not isinstance(out, tuple):
            return attach(outs[0], ctx, inputs)
        nondiff = getattr(ctx, "_nondiff", ())
        ctx.next_functions = tuple(edge(t) for t in inputs)
        ctx._out_meta = [(o._shape, o._dtype, o._storage.device) for o in outs]
        for i, o in enumerate(outs):
            if o._dtype.is_floating_point and id(o) not in nondiff:
                slot = _OutputSlot()
                slot.index, slot.count, slot.next_functions = i, len(outs), (ctx,)
                o.grad_fn = slot
                o._requires_grad = True
        return outs
