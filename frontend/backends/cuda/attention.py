"""Fused attention on CUDA: "sdpa_flash", the CuTeDSL forward of kernels/cute/attention_fwd.py
(through `_C.attention_fwd`), and the device check that tells the dispatcher in
frontend/ops/attention.py whether a device has it.

The kernel reads q, k and v in place as (B, S, H, D) views (any 16-byte
multiple strides on B, S and H) and writes a new contiguous (B, Sq, Hq, D)
output and the fp32 (B, Hq, Sq) log-sum-exp, on the device's current stream,
from the caching allocator: capturable in a CUDA graph.
"""
from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import has_impl, register
from ...ops.attention import FLASH_CAPS, FlashCaps
from .launch import _empty, _lib, _ptr, _stream
from .random import _philox

# The head dims kernels/cute/attention_fwd.py builds (tests/test_attention_cuda_backend.py ties the two).
HEAD_DIMS = (32, 64, 128)
_DTYPE_NAMES = {dt.bfloat16: "bf16", dt.float16: "fp16"}
_device_ok = {}
_last = [None]


def last_kernel():
    """Name of the attention kernel the last sdpa_flash call launched (for tests and benchmarks)."""
    return _last[0]


def sm90_caps(device):
    """FlashCaps on an sm_90 device (the only arch with these wgmma kernels), else None."""
    ok = _device_ok.get(device.index)
    if ok is None:
        from cutegrad.cuda import get_device_properties
        p = get_device_properties(device.index)
        ok = _device_ok[device.index] = (p.major, p.minor) == (9, 0)
    if not ok:
        return None
    return FlashCaps(dtypes=tuple(_DTYPE_NAMES), head_dims=HEAD_DIMS, dropout=True,
                     backward=has_impl("sdpa_flash_backward", CUDA), align_elems=8)


FLASH_CAPS[CUDA] = sm90_caps


SHORT_MAX_SQ, SHORT_MAX_SK = 64, 128


def kernel_variant(B, Sq, Sk, Hq, dropout_p):
    """Which forward kernel runs: "short" (Sq <= 64, Sk <= 128, no dropout: each consumer
    warpgroup takes a 64-row tile of its own (batch, head) with that head's whole K/V, where a
    128-row tile would be at least half padding), "dropout" or "long"."""
    if dropout_p > 0.0:
        return "dropout"
    if Sq <= SHORT_MAX_SQ and Sk <= SHORT_MAX_SK and B * Hq <= (2 ** 31 - 1) // 2:
        return "short"
    return "long"


def kernel_strides(t):
    """t's (B, S, H) strides for the kernel (a (B, S, H, D) view), the stride of an extent-1
    dim (any value, 0 after an expand) replaced by its contiguous one: TMA needs positive
    16-byte multiples, and such a stride addresses nothing."""
    B, S, H, D = t._shape
    natural = (S * H * D, H * D, D)
    return [st if n > 1 else nat for n, st, nat in zip(t._shape[:3], t._strides[:3], natural)]


@register("sdpa_flash", CUDA)
def sdpa_flash(q, k, v, scale, is_causal, dropout_p, generator):
    """(out (B, Sq, Hq, D) contiguous, lse (B, Hq, Sq) fp32, rng_state) of softmax(q k^T * scale) v.

    q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D) views with unit stride on D; the
    dispatcher has checked dtype, head dim, alignment and extents (and _C checks
    them again before launch).  With dropout, rng_state is the PhiloxArgs the launch
    reserved (B * Hq * Sq * Sk values; the mask's mapping is in kernels/reference/attention.py):
    the backward regenerates the same mask from it, also inside a captured graph."""
    dev = q._storage.device
    stream = _stream(dev.index)
    B, Sq, Hq, D = q._shape
    Sk, Hkv = k._shape[1], k._shape[2]
    out = _empty((B, Sq, Hq, D), q._dtype, dev, stream)
    lse = _empty((B, Hq, Sq), dt.float32, dev, stream)
    rng = _philox(generator, dev, B * Hq * Sq * Sk) if dropout_p > 0.0 else None
    _last[0] = _lib().attention_fwd(_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), B, Sq, Sk, Hq, Hkv, D,
                         kernel_strides(q), kernel_strides(k), kernel_strides(v),
                         _DTYPE_NAMES[q._dtype], float(scale), bool(is_causal), float(dropout_p),
                         *((rng.seed, rng.seed_ptr, rng.offset, rng.offset_ptr) if rng else (0, 0, 0, 0)),
                         kernel_variant(B, Sq, Sk, Hq, dropout_p) == "short", stream)
    return out, lse, rng
