"""unique: the distinct values (or slices along a dim) of a tensor, sorted, with
the inverse indices and counts on request (torch.unique).

The output's length depends on the data, so the values are read on the host
(a CUDA input is a host sync, as it is in torch) and np.unique does the work;
results go back to the input's device. Not differentiable (as torch's)."""
import numpy as np

from .. import dtypes as dt
from ..tensor import Tensor, from_numpy_owned


def unique(input, sorted=True, return_inverse=False, return_counts=False, dim=None):
    """Sorted unique values; sorted=False is accepted and also sorts (torch allows any order)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"unique(): argument 'input' must be Tensor, not {type(input).__name__}")
    arr = input.detach()._host_array()
    host = arr.astype(np.float32) if input._dtype is dt.bfloat16 else arr  # ml_dtypes' sort is slow and NaN-unaware
    if dim is None:
        vals, inv, counts = np.unique(host.reshape(-1), return_inverse=True, return_counts=True)
        inv = inv.reshape(input._shape)
    else:
        vals, inv, counts = np.unique(host, return_inverse=True, return_counts=True, axis=input._wrap_dim(dim))
        inv = inv.reshape(-1)
    dev = input._storage.device

    def out(a, dtype):
        t = from_numpy_owned(np.ascontiguousarray(a.astype(dtype.np)), dtype)
        return t if dev.type == "cpu" else t.to(dev)

    result = (out(vals, input._dtype),)
    if return_inverse:
        result += (out(inv, dt.int64),)
    if return_counts:
        result += (out(counts, dt.int64),)
    return result[0] if len(result) == 1 else result
