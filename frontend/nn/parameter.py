"""Parameter: a leaf Tensor that Modules register and optimizers update."""
from ..tensor import Tensor, make


class Parameter(Tensor):
    __slots__ = ()

    def __new__(cls, data=None, requires_grad=True):
        if data is None:
            from ..ops import empty
            data = empty(0)
        if not isinstance(data, Tensor):
            raise TypeError(f"Parameter(): data must be a Tensor, got {type(data).__name__}")
        src = data.detach()
        p = make(src._storage, src._shape, src._strides, src._offset, src._dtype)
        p.__class__ = cls
        if requires_grad:
            p.requires_grad_(True)
        return p

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()

    def __reduce__(self):
        import numpy as np
        return (_rebuild_parameter, (np.array(self._host_array()), self._dtype, str(self.device), self._requires_grad))


def _rebuild_parameter(arr, dtype, device, requires_grad):
    from ..ops import tensor
    return Parameter(tensor(arr, dtype=dtype, device=device), requires_grad)


class Buffer:
    """Marker for tensors registered as module buffers through assignment."""

    def __init__(self, data, persistent=True):
        self.data = data
        self.persistent = persistent
