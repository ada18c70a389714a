"""Node.record: the one-call way an op records its autograd node beside its kernel call."""
import gc
import weakref

import numpy as np
import pytest

import cutegrad
from cutegrad.autograd import Node, gradcheck
from cutegrad.ops import pointwise as P


class CubeBackward(Node):
    """d(x^3 * k)/dx = 3 k x^2, from the saved input (and the saved output, when asked)."""
    __slots__ = ("k", "built")

    def __init__(self, k):
        self.k = k
        CubeBackward.built += 1

    def backward(self, g):
        saved = self.saved_tensors
        return (P.mul(g, P.mul(P.mul(saved[0], saved[0]), 3.0 * self.k)),)


CubeBackward.built = 0


def cube(x, k=1.0, save_output=False):
    with cutegrad.no_grad():
        out = P.mul(P.mul(P.mul(x, x), x), k)
    return CubeBackward.record(out, (x,), (x,), k, save_output=save_output)


def test_no_node_without_grad(rng):
    x = cutegrad.tensor(rng.standard_normal(5))
    before = CubeBackward.built
    y = cube(x)
    assert y.grad_fn is None and not y.requires_grad
    with cutegrad.no_grad():
        y = cube(x.requires_grad_())
    assert y.grad_fn is None
    assert CubeBackward.built == before


def test_records_state_edges_and_gradient(rng):
    x = cutegrad.tensor(rng.standard_normal(5), dtype=cutegrad.float64, requires_grad=True)
    y = cube(x, 2.0)
    assert isinstance(y.grad_fn, CubeBackward) and y.grad_fn.k == 2.0
    assert y.requires_grad and y.grad_fn.next_functions[0] is x._accum
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 6.0 * x.detach().numpy() ** 2, rtol=1e-12)
    assert gradcheck(lambda t: cube(t, 0.5), (x,))


def test_saved_input_modified_in_place_raises(rng):
    x = cutegrad.tensor(rng.standard_normal(4), requires_grad=True)
    base = x * 1.0
    y = cube(base)
    base.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_saved_output_keeps_no_cycle(rng):
    x = cutegrad.tensor(rng.standard_normal(3), requires_grad=True)
    y = cube(x, save_output=True)
    node = weakref.ref(y.grad_fn)
    assert len(y.grad_fn._saved) == 2 and y.grad_fn._saved[1][2] is True
    del y
    gc.disable()
    try:
        assert node() is None  # freed by reference counting: the saved output does not point back at its node
    finally:
        gc.enable()
