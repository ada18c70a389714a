"""Broadcasting rules and the gradient reduction that undoes them."""

_BROADCAST = {}  # (shape, shape, ...) -> broadcast shape: a model repeats few combinations


def broadcast_shapes(*shapes):
    """The shape `shapes` broadcast to (a tuple); RuntimeError naming them if they do not.

    Results are remembered per combination of tuple shapes, so the frontend's
    check and the backend's launch shape cost one computation between them.
    """
    try:
        out = _BROADCAST.get(shapes)
    except TypeError:  # a list among the shapes: not hashable, computed every time
        return _broadcast(shapes)
    if out is None:
        out = _broadcast(shapes)
        if len(_BROADCAST) < 4096:
            _BROADCAST[shapes] = out
    return out


def _broadcast(shapes):
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for s in shapes:
        off = ndim - len(s)
        for i, n in enumerate(s):
            cur = out[off + i]
            if n == cur or n == 1:
                continue
            if cur == 1:
                out[off + i] = n
            else:
                raise RuntimeError(
                    f"shapes {' and '.join(str(list(x)) for x in shapes)} cannot be broadcast together: "
                    f"size {cur} vs {n} at non-singleton dimension {i - len(s)}")
    return tuple(out)


def sum_to(grad, shape):
    """Sum grad over the dimensions that broadcasting expanded to reach shape."""
    gshape = grad._shape
    if gshape == shape:
        return grad
    lead = len(gshape) - len(shape)
    dims = list(range(lead))
    for i, n in enumerate(shape):
        if n == 1 and gshape[lead + i] != 1:
            dims.append(lead + i)
    from .reduction import sum as _sum
    out = _sum(grad, tuple(dims), keepdim=True) if dims else grad
    if lead:
        from .shape import reshape
        out = reshape(out, shape)
    return out
