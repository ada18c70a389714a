"""Predicates on arbitrary objects (torch.is_tensor)."""
from ..tensor import Tensor


def is_tensor(obj):
    """True when obj is a cutegrad Tensor (Parameters included)."""
    return isinstance(obj, Tensor)
