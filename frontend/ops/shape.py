"""Views and shape ops. Views share storage and compute only new
(shape, strides, offset), so one implementation serves every backend; the
copying ones (cat, stack, a reshape that cannot be a view) go through kernels.
"""
import builtins

from ..dispatch import kernel
from ..tensor import Tensor, make, contiguous_strides, numel_of
from ..autograd import grad_mode
from ..autograd.engine import Node, edge
from ..autograd.function import _OutputSlot

_K_CAT = kernel("cat").impl
_K_COPY = kernel("copy_").impl
_state = grad_mode.state


def _view(x, shape, strides, offset):
    return make(x._storage, tuple(shape), tuple(strides), offset, x._dtype,
                x._base if x._base is not None else x)


class ReshapeBackward(Node):
    __slots__ = ("in_shape",)

    def __init__(self, in_shape):
        self.in_shape = in_shape

    def backward(self, g):
        return (reshape(g, self.in_shape),)


def _reshaped(out, x):
    """out, a view of x with x's elements in another shape, recorded for autograd."""
    return ReshapeBackward.record(out, (x,), (), x._shape)


_VIEW_GEOMETRY = {}  # (shape request, old shape, old strides) -> (new shape, strides or None); a model repeats few


def _reshape_geometry(x, shape, opname):
    """(new shape, view strides or None) of x reshaped to the requested `shape` (as view/reshape got it).

    Both are pure functions of the request and x's shape and strides: remembered
    per combination, so a model's repeated reshapes cost one dict lookup.
    """
    sizes = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    # only plain ints as keys: a 0-dim tensor in the request could change value in place
    key = (tuple(sizes), x._shape, x._strides)
    for s in sizes:  # a loop, not all(<generator>): this runs on every reshape of a step
        if s.__class__ is not int:
            key = None
            break
    hit = _VIEW_GEOMETRY.get(key) if key is not None else None
    if hit is None:
        new = _infer_shape(shape, numel_of(x._shape), opname)
        hit = (new, _view_strides(x._shape, x._strides, new))
        if key is not None and len(_VIEW_GEOMETRY) < 4096:
            _VIEW_GEOMETRY[key] = hit
    return hit


def _infer_shape(shape, numel, opname):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    shape = [int(s) for s in shape]
    neg = [i for i, s in enumerate(shape) if s == -1]
    if len(neg) > 1:
        raise RuntimeError(f"{opname}: only one dimension can be inferred")
    known = 1
    for s in shape:
        if s != -1:
            if s < 0:
                raise RuntimeError(f"{opname}: invalid shape dimension {s}")
            known *= s
    if neg:
        if known == 0 or numel % known:
            raise RuntimeError(f"{opname}: shape '{shape}' is invalid for input of size {numel}")
        shape[neg[0]] = numel // known
    elif known != numel:
        raise RuntimeError(f"{opname}: shape '{shape}' is invalid for input of size {numel}")
    return tuple(shape)


def _view_strides(old_shape, old_strides, new_shape):
    """Strides making new_shape a view of (old_shape, old_strides), or None."""
    if numel_of(old_shape) == 0 or not old_shape:
        return contiguous_strides(new_shape)
    new_strides = [0] * len(new_shape)
    view_d = len(new_shape) - 1
    chunk_base = old_strides[-1]
    tensor_numel = 1
    view_numel = 1
    for d in range(len(old_shape) - 1, -1, -1):
        tensor_numel *= old_shape[d]
        if d == 0 or (old_shape[d - 1] != 1 and old_strides[d - 1] != tensor_numel * chunk_base):
            while view_d >= 0 and (view_numel < tensor_numel or new_shape[view_d] == 1):
                new_strides[view_d] = view_numel * chunk_base
                view_numel *= new_shape[view_d]
                view_d -= 1
            if view_numel != tensor_numel:
                return None
            if d > 0:
                chunk_base = old_strides[d - 1]
                tensor_numel = 1
                view_numel = 1
    if view_d != -1:
        return None
    return tuple(new_strides)


def view(x, *shape):
    shape, strides = _reshape_geometry(x, shape, "view")
    if strides is None:
        raise RuntimeError("view size is not compatible with input tensor's size and stride (at least one dimension "
                           "spans across two contiguous subspaces). Use .reshape(...) instead.")
    return _reshaped(_view(x, shape, strides, x._offset), x)


def reshape(x, *shape):
    shape, strides = _reshape_geometry(x, shape, "reshape")
    if shape == x._shape:
        return x
    if strides is not None:
        return _reshaped(_view(x, shape, strides, x._offset), x)
    from .conversion import contiguous
    c = contiguous(x)
    return _reshaped(_view(c, shape, contiguous_strides(shape), c._offset), c)


def flatten(x, start_dim=0, end_dim=-1):
    if not x._shape:
        return reshape(x, 1)
    s = x._wrap_dim(start_dim)
    e = x._wrap_dim(end_dim)
    if s > e:
        raise RuntimeError("flatten() has invalid args: start_dim cannot come after end_dim")
    shape = x._shape[:s] + (numel_of(x._shape[s:e + 1]),) + x._shape[e + 1:]
    return reshape(x, shape)


def unflatten(x, dim, sizes):
    d = x._wrap_dim(dim)
    sizes = _infer_shape(tuple(sizes), x._shape[d], "unflatten")
    return reshape(x, x._shape[:d] + sizes + x._shape[d + 1:])


class PermuteBackward(Node):
    __slots__ = ("inverse",)

    def __init__(self, inverse):
        self.inverse = inverse

    def backward(self, g):
        inv = self.inverse
        if _state.enabled or len(g._shape) != len(inv):  # create_graph (recorded), or permute's error
            return (permute(g, inv),)
        # inv is a permutation of g's dims: permute's checks would pass
        return (_view(g, [g._shape[d] for d in inv], [g._strides[d] for d in inv], g._offset),)


def permute(x, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    n = len(x._shape)
    if len(dims) != n:
        raise RuntimeError(f"permute(sparse_coo): number of dimensions in the tensor input does not match the "
                           f"length of the desired ordering of dimensions i.e. input.dim() = {n} is not equal "
                           f"to len(dims) = {len(dims)}")
    dims = tuple(x._wrap_dim(d) for d in dims)
    if sorted(dims) != list(range(n)):
        raise RuntimeError(f"permute(): dims {list(dims)} are not a permutation of {n} dimensions")
    out = _view(x, [x._shape[d] for d in dims], [x._strides[d] for d in dims], x._offset)
    if not (x._requires_grad and _state.enabled):
        return out
    inv = [0] * n
    for i, d in enumerate(dims):
        inv[d] = i
    return PermuteBackward.record(out, (x,), (), tuple(inv))


def transpose(x, dim0, dim1):
    n = len(x._shape)
    if n == 0:
        x._wrap_dim(dim0)
        x._wrap_dim(dim1)
        return x
    # _wrap_dim's in-range int case inline; anything else goes through it (and raises there)
    d0 = (dim0 + n if dim0 < 0 else dim0) if dim0.__class__ is int and -n <= dim0 < n else x._wrap_dim(dim0)
    d1 = (dim1 + n if dim1 < 0 else dim1) if dim1.__class__ is int and -n <= dim1 < n else x._wrap_dim(dim1)
    shape, strides = list(x._shape), list(x._strides)
    shape[d0], shape[d1] = shape[d1], shape[d0]
    strides[d0], strides[d1] = strides[d1], strides[d0]
    out = _view(x, shape, strides, x._offset)
    if not (x._requires_grad and _state.enabled):
        return out
    swap = list(range(n))  # a transposition is its own inverse
    swap[d0], swap[d1] = d1, d0
    return PermuteBackward.record(out, (x,), (), tuple(swap))


def t(x):
    if len(x._shape) > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {len(x._shape)}D")
    return transpose(x, 0, 1) if len(x._shape) == 2 else x


def movedim(x, source, destination):
    n = len(x._shape)
    src = [x._wrap_dim(source)] if isinstance(source, int) else [x._wrap_dim(s) for s in source]
    dst = [x._wrap_dim(destination)] if isinstance(destination, int) else [x._wrap_dim(d) for d in destination]
    order = [None] * n
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(n) if i not in src)
    order = [o if o is not None else next(rest) for o in order]
    return permute(x, order)


class ExpandBackward(Node):
    __slots__ = ("in_shape",)

    def __init__(self, in_shape):
        self.in_shape = in_shape

    def backward(self, g):
        from .broadcast import sum_to
        return (sum_to(g, self.in_shape),)


def expand(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    n_new = len(shape)
    n_old = len(x._shape)
    if n_new < n_old:
        raise RuntimeError(f"expand: the number of sizes provided ({n_new}) must be greater or equal to the number "
                           f"of dimensions in the tensor ({n_old})")
    out_shape, out_strides = [], []
    lead = n_new - n_old
    for i, s in enumerate(shape):
        if i < lead:
            if s < 0:
                raise RuntimeError(f"expand: -1 not allowed in a new leading dimension {i}")
            out_shape.append(s)
            out_strides.append(0)
            continue
        cur, st = x._shape[i - lead], x._strides[i - lead]
        if s == -1 or s == cur:
            out_shape.append(cur)
            out_strides.append(st)
        elif cur == 1:
            out_shape.append(s)
            out_strides.append(0)
        else:
            raise RuntimeError(f"The expanded size of the tensor ({s}) must match the existing size ({cur}) at "
                               f"non-singleton dimension {i}.  Target sizes: {list(shape)}.  Tensor sizes: "
                               f"{list(x._shape)}")
    out_shape = tuple(out_shape)
    if out_shape == x._shape:
        return x
    return ExpandBackward.record(_view(x, out_shape, out_strides, x._offset), (x,), (), x._shape)


def expand_as(x, other):
    return expand(x, other._shape)


def broadcast_to(x, shape):
    return expand(x, shape)


def unsqueeze(x, dim):
    n = len(x._shape) + 1
    if not -n <= dim < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {dim})")
    d = dim + n if dim < 0 else dim
    shape = list(x._shape)
    strides = list(x._strides)
    new_stride = strides[d] * shape[d] if d < len(shape) else 1
    shape.insert(d, 1)
    strides.insert(d, new_stride)
    return _reshaped(_view(x, shape, strides, x._offset), x)


def squeeze(x, dim=None):
    if dim is None:
        dims = [i for i, s in enumerate(x._shape) if s == 1]
    elif isinstance(dim, (tuple, list)):
        dims = [x._wrap_dim(d) for d in dim]
    else:
        dims = [x._wrap_dim(dim)]
    keep = [i for i in range(len(x._shape)) if not (i in dims and x._shape[i] == 1)]
    if len(keep) == len(x._shape):
        return x
    return _reshaped(_view(x, [x._shape[i] for i in keep], [x._strides[i] for i in keep], x._offset), x)


class AsStridedBackward(Node):
    __slots__ = ("in_shape", "in_dtype", "shape", "strides", "offset")

    def __init__(self, in_shape, in_dtype, shape, strides, offset):
        self.in_shape, self.in_dtype = in_shape, in_dtype
        self.shape, self.strides, self.offset = shape, strides, offset

    def backward(self, g):
        # Elements the view reaches more than once (overlapping windows) sum
        # their gradients: an index_add at each view element's flat position.
        import numpy as np
        from .creation import zeros, tensor
        from .indexing import index_add
        pos = np.full(self.shape, self.offset, dtype=np.int64)
        for d, (n, st) in enumerate(zip(self.shape, self.strides)):
            pos = pos + (np.arange(n, dtype=np.int64) * st).reshape((n,) + (1,) * (len(self.shape) - d - 1))
        flat = zeros(numel_of(self.in_shape), dtype=g._dtype, device=g._storage.device)
        idx = tensor(pos.reshape(-1), device=g._storage.device)
        return (reshape(index_add(flat, 0, idx, reshape(g, (-1,))), self.in_shape),)


def as_strided(x, size, stride, storage_offset=0):
    """View of contiguous x's elements with explicit size/stride/offset
    (relative to x's first element)."""
    if not x.is_contiguous():
        raise RuntimeError("as_strided is supported on contiguous tensors only in cutegrad")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride):
        raise RuntimeError(f"mismatch in length of strides and shape: {len(size)} vs {len(stride)}")
    if numel_of(size):
        last = storage_offset + builtins.sum((n - 1) * s for n, s in zip(size, stride))
        if storage_offset < 0 or last >= numel_of(x._shape):
            raise RuntimeError(f"as_strided: size {list(size)} stride {list(stride)} offset {storage_offset} is out "
                               f"of bounds for a tensor of {numel_of(x._shape)} elements")
    return AsStridedBackward.record(_view(x, size, stride, x._offset + storage_offset), (x,), (), x._shape, x._dtype,
                                    size, stride, storage_offset)


# --- basic indexing (views) ------------------------------------------------------
def basic_index_meta(x, key):
    """(shape, strides, offset) of x[key] for ints/slices/None/Ellipsis keys."""
    n_none, n_ellipsis = 0, 0
    for k in key:
        if k is None:
            n_none += 1
        elif k is Ellipsis:
            n_ellipsis += 1
    n_spec = len(key) - n_none - n_ellipsis
    ndim = len(x._shape)
    if n_spec > ndim:
        raise IndexError(f"too many indices for tensor of dimension {ndim}")
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    shape, strides = [], []
    offset = x._offset
    d = 0
    for k in key:
        if k is Ellipsis:
            for _ in range(ndim - n_spec):
                shape.append(x._shape[d])
                strides.append(x._strides[d])
                d += 1
        elif k is None:
            shape.append(1)
            strides.append(0)
        elif isinstance(k, slice):
            size = x._shape[d]
            start, stop, step = k.indices(size)
            if step <= 0:
                raise ValueError("step must be greater than zero")
            n = len(range(start, stop, step))
            if n:
                offset += start * x._strides[d]
            shape.append(n)
            strides.append(x._strides[d] * step)
            d += 1
        else:
            size = x._shape[d]
            i = int(k)
            if not -size <= i < size:
                raise IndexError(f"index {i} is out of bounds for dimension {d} with size {size}")
            offset += (i + size if i < 0 else i) * x._strides[d]
            d += 1
    while d < ndim:
        shape.append(x._shape[d])
        strides.append(x._strides[d])
        d += 1
    return shape, strides, offset


class BasicIndexBackward(Node):
    __slots__ = ("in_shape", "in_dtype", "key")

    def __init__(self, in_shape, in_dtype, key):
        self.in_shape, self.in_dtype, self.key = in_shape, in_dtype, key

    def backward(self, g):
        return (index_backward_basic(g, self.in_shape, self.in_dtype, self.key),)


class IndexBackwardBasicNode(Node):
    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def backward(self, gg):
        return (basic_index(gg, self.key),)


def index_backward_basic(g, in_shape, in_dtype, key):
    """zeros(in_shape) with g written at key: the gradient of x[key]."""
    from .creation import zeros
    gz = zeros(in_shape, dtype=in_dtype, device=g._storage.device)
    shape, strides, offset = basic_index_meta(gz, key)
    region = _view(gz, shape, strides, offset)
    with grad_mode.no_grad():
        kernel("copy_").impl[g._storage.device.backend](region, g)
    return IndexBackwardBasicNode.record(gz, (g,), (), key)


def basic_index(x, key):
    shape, strides, offset = basic_index_meta(x, key)
    return BasicIndexBackward.record(_view(x, shape, strides, offset), (x,), (), x._shape, x._dtype, key)


def narrow(x, dim, start, length):
    d = x._wrap_dim(dim)
    size = x._shape[d]
    if start < 0:
        start += size
    if not (0 <= start <= size and 0 <= length and start + length <= size):
        raise IndexError(f"narrow(): start ({start}) + length ({length}) exceeds dimension size ({size}).")
    return basic_index(x, (slice(None),) * d + (slice(start, start + length),))


def select(x, dim, index):
    d = x._wrap_dim(dim)
    return basic_index(x, (slice(None),) * d + (index,))


def split(x, split_size_or_sections, dim=0):
    d = x._wrap_dim(dim)
    size = x._shape[d]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        if step <= 0:
            raise RuntimeError(f"split expects split_size be positive, but got split_size={step}")
        sizes = [builtins.min(step, size - i) for i in range(0, size, step)] or [0]
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != size:
            raise RuntimeError(f"split_with_sizes expects split_sizes to sum exactly to {size} (input tensor's size "
                               f"at dimension {d}), but got split_sizes={sizes}")
    keys, start = [], 0
    for s in sizes:
        keys.append((slice(None),) * d + (slice(start, start + s),))
        start += s
    return _pieces(x, keys)


def chunk(x, chunks, dim=0):
    if chunks <= 0:
        raise RuntimeError(f"chunk expects `chunks` to be greater than 0, got: {chunks}")
    size = x._shape[x._wrap_dim(dim)]
    step = -(-size // chunks) if size else 1
    return split(x, builtins.max(step, 1), dim)


def unbind(x, dim=0):
    d = x._wrap_dim(dim)
    return _pieces(x, [(slice(None),) * d + (i,) for i in range(x._shape[d])])


class PiecesBackward(Node):
    """The gradient of split / chunk / unbind: the pieces' gradients written side by side into
    one tensor of the input's shape (one allocation and a copy per piece, where a backward per
    piece would fill an input-sized tensor with zeros for each and sum them). Each piece's
    grad_fn is an _OutputSlot feeding its gradient into this node's slot for it.

    The gradient is laid out in the input's memory order: the pieces of a permuted view (q, k,
    v of a transposed projection) then give a gradient that permutes back to a contiguous
    tensor, and the reshape before the permute needs no copy."""
    __slots__ = ("in_shape", "in_strides", "in_dtype", "keys")

    def backward(self, slots):
        grads = slots.grads
        if _state.enabled:  # create_graph: the same gradient from differentiable ops
            from .pointwise import add
            total = None
            for g, key in zip(grads, self.keys):
                if g is not None:
                    gx = index_backward_basic(g, self.in_shape, self.in_dtype, key)
                    total = gx if total is None else add(total, gx)
            return (total,)
        from .creation import empty, zeros
        dev = next(g for g in grads if g is not None)._storage.device
        if all(g is not None for g in grads):  # the pieces tile the input: nothing to fill
            strides = _dense_strides_in_order_of(self.in_shape, self.in_strides)
            flat = empty((numel_of(self.in_shape),), dtype=self.in_dtype, device=dev)
            gx = make(flat._storage, self.in_shape, strides, 0, self.in_dtype)
        else:
            gx = zeros(self.in_shape, dtype=self.in_dtype, device=dev)
        copy = _K_COPY[dev.backend]
        for g, key in zip(grads, self.keys):
            if g is not None:
                copy(_view(gx, *basic_index_meta(gx, key)), g)
        return (gx,)


def _dense_strides_in_order_of(shape, strides):
    """Strides of a dense tensor of `shape` whose dims follow the memory order of `strides`
    (smallest stride innermost); contiguous strides for a contiguous `strides`."""
    if contiguous_strides(shape) == strides:
        return contiguous_strides(shape)
    out = [0] * len(shape)
    acc = 1
    for d in sorted(range(len(shape)), key=lambda d: (strides[d], -d)):  # ties: the later dim inner
        out[d] = acc
        acc *= shape[d] if shape[d] > 1 else 1
    return tuple(out)


def _pieces(x, keys):
    """The views x[key] for each key (covering x along one dim), with one PiecesBackward."""
    outs = tuple(_view(x, *basic_index_meta(x, key)) for key in keys)
    if not (x._requires_grad and _state.enabled):
        return outs
    node = PiecesBackward()
    node.in_shape, node.in_strides, node.in_dtype, node.keys = x._shape, x._strides, x._dtype, keys
    node.next_functions = (edge(x),)
    for i, out in enumerate(outs):
        slot = _OutputSlot()
        slot.index, slot.count, slot.next_functions = i, len(outs), (node,)
        out.grad_fn = slot
        out._requires_grad = True
        out._base_fn = out._base.grad_fn  # the base history this view's node hangs off
    return outs


class CatBackward(Node):
    __slots__ = ("dim", "sizes", "metas")

    def __init__(self, dim, parts):
        self.dim = dim
        self.sizes = [t_._shape[dim] for t_ in parts]
        self.metas = [(t_._shape, t_._dtype) for t_ in parts]

    def backward(self, g):
        from .conversion import to_dtype
        out, start = [], 0
        for s, (shape, dtype) in zip(self.sizes, self.metas):
            piece = narrow(g, self.dim, start, s)
            out.append(to_dtype(piece, dtype) if dtype is not g._dtype else piece)
            start += s
        return tuple(out)


def cat(tensors, dim=0):
    from .. import dtypes as dt
    tensors = list(tensors)
    if not tensors:
        raise RuntimeError("cat(): expected a non-empty list of Tensors")
    for t_ in tensors:
        if not isinstance(t_, Tensor):
            raise TypeError(f"cat(): expected a sequence of Tensors, got {type(t_).__name__}")
    ref = builtins.max(tensors, key=lambda v: len(v._shape))
    d = ref._wrap_dim(dim)
    dev = ref._storage.device
    parts = [t_ for t_ in tensors if not (len(t_._shape) == 1 and t_._shape[0] == 0 and len(ref._shape) > 1)]
    out_dt = parts[0]._dtype
    for t_ in parts:
        if t_._storage.device is not dev:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{dev} and {t_.device}!")
        if len(t_._shape) != len(ref._shape) or any(a != b for i, (a, b) in enumerate(zip(t_._shape, ref._shape))
                                                      if i != d):
            raise RuntimeError(f"Sizes of tensors must match except in dimension {d}. Expected size "
                               f"{list(ref._shape)} but got size {list(t_._shape)} for a tensor in the list.")
        out_dt = dt.promote_types(out_dt, t_._dtype)
    return CatBackward.record(_K_CAT[dev.backend](parts, d, out_dt), parts, (), d, parts)


def stack(tensors, dim=0):
    tensors = list(tensors)
    if not tensors:
        raise RuntimeError("stack expects a non-empty TensorList")
    shape0 = tensors[0]._shape
    for i, t_ in enumerate(tensors):
        if t_._shape != shape0:
            raise RuntimeError(f"stack expects each tensor to be equal size, but got {list(shape0)} at entry 0 and "
                               f"{list(t_._shape)} at entry {i}")
    return cat([unsqueeze(t_, dim) for t_ in tensors], dim)


def repeat(x, *sizes):
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if len(sizes) < len(x._shape):
        raise RuntimeError("Number of dimensions of repeat dims can not be smaller than number of dimensions of tensor")
    lead = len(sizes) - len(x._shape)
    shape = (1,) * lead + x._shape
    xv = reshape(x, shape)
    inter, target = [], []
    for r, s in zip(sizes, shape):
        inter += [1, s]
        target += [r, s]
    return reshape(expand(reshape(xv, inter), target), [r * s for r, s in zip(sizes, shape)])


def flip(x, dims):
    """Copy of x reversed along dims (torch has no negative strides, so no view)."""
    from .indexing import index_select
    from .creation import arange
    if isinstance(dims, int):
        dims = (dims,)
    out = x
    for d in sorted(set(x._wrap_dim(d) for d in dims)):
        if not x._shape:
            continue
        n = x._shape[d]
        out = index_select(out, d, arange(n - 1, -1, -1, device=x._storage.device))
    if out is x:
        from .conversion import clone
        out = clone(x)
    return out
