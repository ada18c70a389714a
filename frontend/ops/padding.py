"""F.pad: constant, reflect, replicate and circular padding of the last dims.

Composite over existing ops so it runs (and differentiates) on every backend
without a kernel of its own or a host read: constant padding concatenates
blocks of the fill value (a negative pad narrows), the other modes gather
the padded dim with index_select through an index computed on the device
from arange (reflect: n-1 - |n-1 - |i||, replicate: clamp, circular: i mod n),
so the gradient is index_select's (index_add: contributions of a source
element read twice are summed, as torch's).
"""
from ..tensor import Tensor
from . import pointwise as P
from . import shape as S

_MODES = ("constant", "reflect", "replicate", "circular")


def pad(input, pad, mode="constant", value=None):
    """torch.nn.functional.pad: `pad` lists (left, right) amounts from the last dim backwards."""
    if not isinstance(input, Tensor):
        raise TypeError(f"pad(): argument 'input' must be Tensor, not {type(input).__name__}")
    pad = tuple(pad)
    if len(pad) % 2 or not all(isinstance(p, int) for p in pad):
        raise ValueError(f"pad(): padding must be a sequence of ints of even length, got {pad!r}")
    if mode not in _MODES:
        raise NotImplementedError(f"pad(): mode {mode!r} is not one of {list(_MODES)}")
    ndim = len(input._shape)
    if len(pad) // 2 > ndim:
        raise ValueError(f"pad(): padding of length {len(pad)} pads {len(pad) // 2} dims but the input has only "
                         f"{ndim} (shape {list(input._shape)})")
    if mode != "constant" and value:
        raise ValueError(f"pad(): padding mode {mode!r} doesn't take in value argument")
    x = input
    for k in range(len(pad) // 2):
        d, (left, right) = ndim - 1 - k, pad[2 * k:2 * k + 2]
        if left or right:
            x = _constant(x, d, left, right, 0 if value is None else value) if mode == "constant" else \
                _gather(x, d, left, right, mode)
    return x if x is not input else S.view(input, input._shape)


def _constant(x, d, left, right, value):
    from .creation import full
    n = x._shape[d]
    if left + n + right < 0 or left < -n or right < -n:
        raise RuntimeError(f"pad(): padding ({left}, {right}) would leave dim {d} of size {n} with a negative size")
    if left < 0:
        x, n, left = S.narrow(x, d, -left, n + left), n + left, 0
    if right < 0:
        x, n, right = S.narrow(x, d, 0, n + right), n + right, 0
    parts = []
    for amount in (left, None, right):
        if amount is None:
            parts.append(x)
        elif amount:
            shape = x._shape[:d] + (amount,) + x._shape[d + 1:]
            parts.append(full(shape, value, dtype=x._dtype, device=x._storage.device))
    return S.cat(parts, d) if len(parts) > 1 else x


def _gather(x, d, left, right, mode):
    from .creation import arange
    from .indexing import index_select
    n = x._shape[d]
    if left < 0 or right < 0:
        raise RuntimeError(f"pad(): negative padding ({left}, {right}) is supported in 'constant' mode only")
    limit = n - 1 if mode == "reflect" else n
    if mode in ("reflect", "circular") and (left > limit or right > limit):
        what = "less than" if mode == "reflect" else "at most"
        raise RuntimeError(f"pad(): {mode} padding ({left}, {right}) must be {what} the size {n} of dim {d}")
    if n == 0:
        raise RuntimeError(f"pad(): {mode} padding needs a non-empty dim {d}, got size 0")
    i = arange(-left, n + right, device=x._storage.device)
    if mode == "reflect":
        i = P.rsub(P.abs(P.rsub(P.abs(i), n - 1)), n - 1)
    elif mode == "replicate":
        i = P.clamp(i, 0, n - 1)
    else:
        i = P.remainder(i, n)
    return index_select(x, d, i)
