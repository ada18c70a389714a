"""Fused dropout on CUDA (kernels/cuda/dropout.cu through `_C.dropout`): "dropout_fused"
draws the keep mask from the generator's Philox stream and applies it; "dropout_fused_backward"
regenerates it from the returned state and applies it to dy.  Outputs come from the caching
allocator on the current stream, and a captured launch reads seed and offset from device
memory, so both capture into a CUDA graph.
"""
from ...device import CUDA
from ...dispatch import register
from ...tensor import numel_of
from .launch import _contig, _empty, _lib, _ptr, _stream
from .random import _philox


def _apply(x, keep, rng_state):
    dev = x._storage.device
    stream = _stream(dev.index)
    src = x if x.is_contiguous() else _contig(x, stream)
    out = _empty(x._shape, x._dtype, dev, stream)
    seed, seed_ptr, offset, offset_ptr = rng_state
    _lib().dropout(_ptr(src), _ptr(out), x._dtype.index, numel_of(x._shape), seed, seed_ptr, offset, offset_ptr,
                   float(keep), stream)
    return out


@register("dropout_fused", CUDA)
def dropout_fused(x, keep, generator):
    """(x * keep_mask / keep, rng_state): rng_state is the (seed, seed_ptr, offset, offset_ptr)
    the launch drew from (numel(x) Philox values, the stream bernoulli_scaled would draw)."""
    args = _philox(generator, x._storage.device, max(numel_of(x._shape), 1))
    rng_state = (args.seed, args.seed_ptr, args.offset, args.offset_ptr)
    return _apply(x, keep, rng_state), rng_state


@register("dropout_fused_backward", CUDA)
def dropout_fused_backward(dy, keep, rng_state):
    """dy * keep_mask / keep with the forward's mask, regenerated from its rng_state."""
    return _apply(dy, keep, rng_state)
