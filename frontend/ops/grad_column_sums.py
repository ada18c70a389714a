"""Column sums that a backward computed alongside a gradient, for the node that receives it.

The add+norm backward (ops/fused_norms.py) hands dx to the branch that produced x; when that
branch is a Linear, the Linear's bias gradient is dx summed over every dim but the last, and
the CuTeDSL norm backward already reduces exactly that in its dweight/dbias stages.  The
producer records the sum here against the dx tensor it returns; the Linear's backward
(ops/linalg.py) takes it instead of launching a column sum.

A recorded sum is used only for that very tensor, unmodified: the entry holds a weak
reference and the storage version seen when it was recorded, so a gradient that the engine
summed with another contribution (a new tensor), a hook's replacement (a new tensor) or an
in-place change (a new version) finds no sum and is reduced as usual.  An entry goes when it
is taken or its tensor dies.

A node that can use such a sum says so with a `takes_column_sum` attribute, so producers
spend nothing where no consumer would take it.
"""
import weakref

_known = {}  # id(gradient) -> (weak reference to it, its storage version, column sum)


def record(grad, column_sum):
    """Remember column_sum (grad summed over every dim but the last) for grad itself."""
    key = id(grad)
    ref = weakref.ref(grad, lambda _, key=key: _known.pop(key, None))
    _known[key] = (ref, grad._storage.version, column_sum)


def take(grad):
    """The column sum recorded for grad, or None; either way grad's entry is gone afterwards."""
    entry = _known.pop(id(grad), None)
    if entry is None or entry[0]() is not grad or entry[1] != grad._storage.version:
        return None
    return entry[2]


def wants_column_sum(node):
    """True when the autograd node `node` would use a column sum of the gradient it receives."""
    return node is not None and getattr(node, "takes_column_sum", False)
