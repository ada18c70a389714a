"""Finite-difference gradient checks (float64), in torch.autograd's style."""
import numpy as np

from .engine import grad as _grad
from . import grad_mode


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _numerical_jacobian(fn, inputs, i, eps):
    from ..tensor import Tensor
    x = inputs[i]
    arr = x.detach()._np
    with grad_mode.no_grad():
        base_outs = [o._np.astype(np.float64).copy() for o in _as_tuple(fn(*inputs)) if isinstance(o, Tensor)]
    cols = []
    # Index the input's own memory (a reshape of a non-contiguous input would
    # perturb a copy), in row-major order like the analytical rows.
    for j in np.ndindex(arr.shape):
        orig = arr[j]
        arr[j] = orig + eps
        with grad_mode.no_grad():
            plus = [o._np.astype(np.float64).copy() for o in _as_tuple(fn(*inputs)) if isinstance(o, Tensor)]
        arr[j] = orig - eps
        with grad_mode.no_grad():
            minus = [o._np.astype(np.float64).copy() for o in _as_tuple(fn(*inputs)) if isinstance(o, Tensor)]
        arr[j] = orig
        cols.append(np.concatenate([((p - m) / (2 * eps)).reshape(-1) for p, m in zip(plus, minus)]))
    return np.stack(cols, axis=1) if cols else np.zeros((sum(o.size for o in base_outs), 0))


def _analytical_jacobian(fn, inputs, i):
    from ..tensor import Tensor
    from .. import ops
    outs = [o for o in _as_tuple(fn(*inputs)) if isinstance(o, Tensor)]
    rows = []
    for k, o in enumerate(outs):
        for j in range(o.numel()):
            if not o._requires_grad:
                rows.append(np.zeros(inputs[i].numel()))
                continue
            seed = np.zeros(o._shape, np.float64)
            seed.reshape(-1)[j] = 1.0
            (g,) = _grad([o], [inputs[i]], [ops.tensor(seed, dtype=o._dtype)], retain_graph=True,
                         allow_unused=True)
            rows.append(np.zeros(inputs[i].numel()) if g is None else g._np.astype(np.float64).reshape(-1))
    return np.stack(rows, axis=0) if rows else np.zeros((0, inputs[i].numel()))


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=True):
    """Compare autograd's Jacobian with central differences for every input
    that requires grad. Inputs should be float64 for meaningful results."""
    from ..tensor import Tensor
    inputs = _as_tuple(inputs)
    for i, x in enumerate(inputs):
        if not (isinstance(x, Tensor) and x._requires_grad):
            continue
        if x._dtype.name != "float64":
            raise ValueError(f"gradcheck: input {i} is {x._dtype}; use float64 inputs for finite differences")
        num = _numerical_jacobian(fn, inputs, i, eps)
        ana = _analytical_jacobian(fn, inputs, i)
        if num.shape != ana.shape or not np.allclose(ana, num, atol=atol, rtol=rtol):
            if raise_exception:
                err = np.max(np.abs(ana - num)) if num.shape == ana.shape else "shape mismatch"
                raise AssertionError(f"gradcheck failed for input {i}: max abs difference {err}\n"
                                     f"numerical:\n{num}\nanalytical:\n{ana}")
            return False
    return True


def gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3):
    """gradcheck of the vector-Jacobian product (second derivatives)."""
    from ..tensor import Tensor
    from .. import ops
    inputs = _as_tuple(inputs)
    def differentiable(results):
        return [o for o in _as_tuple(results) if isinstance(o, Tensor) and o._requires_grad]

    outs = differentiable(fn(*inputs))
    rng = np.random.default_rng(0)
    seeds = [ops.tensor(rng.standard_normal(o._shape), dtype=o._dtype) for o in outs]
    diff = [x for x in inputs if isinstance(x, Tensor) and x._requires_grad]

    def vjp(*xs):
        # gradcheck evaluates this under no_grad for finite differences; the
        # first-order gradient itself still needs a graph.
        with grad_mode.enable_grad():
            ys = differentiable(fn(*xs))
            d = [x for x in xs if isinstance(x, Tensor) and x._requires_grad]
            return _grad(ys, d, seeds, create_graph=True, allow_unused=True)

    return gradcheck(lambda *xs: tuple(g for g in vjp(*xs) if g is not None), inputs, eps, atol, rtol) and bool(diff)
