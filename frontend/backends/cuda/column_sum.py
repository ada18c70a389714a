"""The bias gradient on CUDA: registry kernel "column_sum", the sum over the rows of a
contiguous (rows, cols) matrix in one deterministic launch (kernels/cuda/column_sum.cu,
`_C.column_sum`), where a two-stage `reduce` takes two.

The grid splits the rows so that about two waves of blocks run (an H200 has 132 SMs); the
per-split partial sums come from the caching allocator, and the per-tile counters that tell
the last block of a tile to finish are a zeroed buffer kept per device, stream and allocator
(each launch leaves it zeroed, and launches on one stream never overlap).  The buffer is made
outside a CUDA graph capture (a zero fill is a stream operation); a capture that finds none
big enough falls back to the two-launch reduction.
"""
from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import register
from .launch import _allocator, _empty, _lib, _ptr, _stream

_TILE_COLS = 32          # columns per block (column_sum.cu kTileCols)
_TARGET_BLOCKS = 264     # two waves of 132 SMs
_MIN_SPLIT_ROWS = 64     # rows a split sums at least
_FLOATS = (dt.float16, dt.bfloat16, dt.float32, dt.float64)
_counters = {}           # (device index, stream) -> (allocator, int32 tensor of zeros)


def column_splits(rows, cols):
    """How many row splits a (rows, cols) column sum launches with."""
    tiles = -(-cols // _TILE_COLS)
    return max(1, min(-(-_TARGET_BLOCKS // max(tiles, 1)), rows // _MIN_SPLIT_ROWS, 65535))


def _counter_buffer(dev, stream, tiles):
    """The zeroed counters of (dev, stream), or None when making them would be captured."""
    alloc = _allocator(dev.index)
    entry = _counters.get((dev.index, stream))
    if entry is not None and entry[0] is alloc and entry[1]._shape[0] >= tiles:
        return entry[1]
    from ...cuda import capture_guard
    if capture_guard.any_capture_underway():
        return None
    from ...ops.creation import zeros
    buf = zeros((max(tiles, 256),), dtype=dt.int32, device=dev)
    _counters[(dev.index, stream)] = (alloc, buf)
    return buf


@register("column_sum", CUDA)
def column_sum(g, out_dtype):
    """g summed over every dim but the last, as out_dtype, or None where the caller must reduce
    another way: a non-float or non-contiguous g, or a capture without counters (see the module
    docstring)."""
    if g._dtype not in _FLOATS or out_dtype not in _FLOATS or not g._shape or not g.is_contiguous():
        return None
    dev = g._storage.device
    stream = _stream(dev.index)
    cols = g._shape[-1]
    rows = 1
    for n in g._shape[:-1]:
        rows *= n
    splits = column_splits(rows, cols)
    partials = counters = None
    if splits > 1:
        counters = _counter_buffer(dev, stream, -(-cols // _TILE_COLS))
        if counters is None:
            return None
        acc = dt.float64 if dt.float64 in (g._dtype, out_dtype) else dt.float32
        partials = _empty((splits * cols,), acc, dev, stream)
    out = _empty((cols,), out_dtype, dev, stream)
    _lib().column_sum(_ptr(g), g._dtype.index, _ptr(out), out_dtype.index, rows, cols, splits,
                      _ptr(partials) if partials is not None else 0, _ptr(counters) if counters is not None else 0,
                      stream)
    return out
