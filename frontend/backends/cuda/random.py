"""Random numbers (kernels/cuda/random.cu): Philox streams from cutegrad's generators,
so a captured graph draws fresh numbers on every replay.
"""
import numpy as np

from ...device import CUDA
from ...dispatch import register
from ...tensor import numel_of
from .launch import _BERNOULLI, _NORMAL, _RANDINT, _UNIFORM, _empty, _lib, _ptr, _stream


def _philox(generator, dev, n):
    from cutegrad.graphs import rng
    if generator is None:
        generator = rng.default_generator(dev.index)
    elif not isinstance(generator, rng.Generator):
        raise TypeError(f"a CUDA random op needs a cutegrad.graphs.Generator (Philox), got {type(generator).__name__}")
    return generator.philox_args(n)


def _random(kind, shape, dtype, device, generator, a=0.0, b=0.0, low=0, span=0):
    stream = _stream(device.index)
    out = _empty(tuple(shape), dtype, device, stream)
    n = numel_of(out._shape)
    if n:
        args = _philox(generator, device, n)
        _lib().random(kind, _ptr(out), dtype.index, n, args.seed, args.seed_ptr, args.offset, args.offset_ptr,
                      float(a), float(b), int(low), int(span), stream)
    return out


@register("uniform", CUDA)
def uniform(shape, lo, hi, dtype, device, generator):
    return _random(_UNIFORM, shape, dtype, device, generator, lo, hi)


@register("normal", CUDA)
def normal(shape, mean, std, dtype, device, generator):
    return _random(_NORMAL, shape, dtype, device, generator, mean, std)


@register("randint", CUDA)
def randint(low, high, shape, dtype, device, generator):
    if high - low > 1 << 32:
        raise ValueError(f"randint on CUDA draws from at most 2**32 values, got [{low}, {high})")
    return _random(_RANDINT, shape, dtype, device, generator, low=low, span=high - low)


@register("bernoulli_scaled", CUDA)
def bernoulli_scaled(shape, keep, dtype, device, generator):
    """Dropout mask: 1/keep with probability keep, else 0 (Philox; fresh numbers on every graph replay)."""
    return _random(_BERNOULLI, shape, dtype, device, generator, keep, float(np.float32(1.0 / keep)))


@register("randperm", CUDA)
def randperm(n, dtype, device, generator):
    """A permutation drawn on the host from the device generator's Philox stream, then uploaded.

    Not capturable: the shuffle needs the numbers on the host.
    """
    args = _philox(generator, device, max(n, 1))
    if args.seed_ptr or args.offset_ptr:
        raise RuntimeError("randperm on CUDA cannot be captured into a CUDA graph (it shuffles on the host)")
    bitgen = np.random.Philox(key=args.seed, counter=args.offset // 4)
    perm = np.random.Generator(bitgen).permutation(n)
    from ...ops import tensor
    return tensor(perm, dtype=dtype, device=device)
