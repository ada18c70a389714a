"""Fused dropout: the keep mask generated and applied by one kernel forward and one backward.

`fused_dropout(x, p, generator)` equals ops.dropout's mask-and-multiply (keep each element
with probability 1 - p, scale the kept ones by 1 / (1 - p)) where the backend has the
"dropout_fused" kernels (CUDA: kernels/cuda/dropout.cu).  The forward kernel reserves Philox
numbers from the generator and returns its state (seed, seed_ptr, offset, offset_ptr); the
autograd node keeps only that state, and the backward kernel regenerates the same keep mask
from it while scaling dy, so no mask tensor is stored and each direction is one launch.  The
pointers are set under CUDA graph capture: a replay reads its own draw's seed and offset
from device memory in both kernels.

Backends without the kernels (the CPU: its float64 mask-and-multiply is the reference) run
ops.dropout's composite.  Under create_graph the backward is dy * mask with the mask made by
the backward kernel applied to ones, so the gradient stays differentiable in dy.
"""
from .. import dtypes as dt
from ..autograd import grad_mode
from ..autograd.engine import Node, attach
from ..dispatch import kernel

_K_DROPOUT = kernel("dropout_fused").impl
_K_DROPOUT_BWD = kernel("dropout_fused_backward").impl
_FLOATS = (dt.float16, dt.bfloat16, dt.float32, dt.float64)
_state = grad_mode.state


def takes_fused_dropout(x):
    """True when x's backend has the fused dropout kernels and x's dtype is one they take."""
    return x._dtype in _FLOATS and not getattr(_K_DROPOUT[x._storage.device.backend], "missing", False)


def fused_dropout(x, p, generator=None):
    """x * keep_mask / (1 - p) for 0 < p < 1, in one kernel; see the module docstring."""
    keep = 1.0 - p
    out, rng_state = _K_DROPOUT[x._storage.device.backend](x.detach(), keep, generator)
    if _state.enabled and x._requires_grad:
        node = FusedDropoutBackward()
        node.keep, node.rng_state = keep, rng_state
        attach(out, node, (x,))
    return out


class FusedDropoutBackward(Node):
    """dx = dy * keep_mask / (1 - p), the mask regenerated from the forward's Philox state."""
    __slots__ = ("keep", "rng_state")

    def backward(self, g):
        apply_mask = _K_DROPOUT_BWD[g._storage.device.backend]
        if not _state.enabled:
            return (apply_mask(g, self.keep, self.rng_state),)
        from .creation import ones
        from .pointwise import mul
        mask = apply_mask(ones(g._shape, dtype=g._dtype, device=g._storage.device), self.keep, self.rng_state)
        return (mul(g, mask),)
