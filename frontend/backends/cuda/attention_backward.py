"""The fused attention backward on CUDA: registry kernel "sdpa_flash_backward".

`sdpa_flash_backward(q, k, v, out, lse, dout, scale, is_causal, dropout_p, rng_state)`
returns (dq, dk, dv), new contiguous tensors shaped like q, k, v in their dtype,
from the forward's (B, Sq, Hq, D) q and O, (B, Sk, Hkv, D) k and v, the fp32
(B, Hq, Sq) natural-log LSE and dout = dL/dO.  One `_C.attention_backward` call
runs the preprocess, the CuTeDSL main kernel (kernels/cute/attention_bwd.py)
and the postprocess on the device's current stream; its fp32 workspaces (the
padded lse2 and delta rows, the dQ accumulator) and the outputs come from the
caching allocator, so the call captures into a CUDA graph.

dQ is summed over key blocks with fp32 atomics by default (run-to-run
differences in the last bits); `set_deterministic(True)` (or
`deterministic=True` on a call) stores one partial per key block and sums them
in a fixed order instead, bit-identical across runs, at the cost of
(Sk / 128) x the dQ accumulator's memory.

Inputs the TMA loads cannot read in place (head dim not unit-stride, other
strides or the offset not a multiple of 16 bytes) are copied to contiguous
first.

Dropout: rng_state is the forward's Philox state, a `graphs.rng.PhiloxArgs`
(seed, seed_ptr, offset, offset_ptr) or the same four ints as a tuple; the
"_dropout" kernels regenerate the forward's keep mask from it (the mapping of
kernels/reference/attention.py's dropout_keep_mask), reading seed and offset
from device memory where the pointers are set, so a graph replay regenerates
the mask of its own forward.
"""
from ... import dtypes as dt
from ...device import CUDA
from ...dispatch import register
from .launch import _contig, _empty, _lib, _ptr, _stream

_DTYPE = {dt.bfloat16: "bf16", dt.float16: "fp16"}
_TMA_ELEMS = 8  # 16 bytes of bf16/fp16
_deterministic = False


def set_deterministic(flag):
    """Make the fused attention backward's dQ reduction bit-reproducible (True) or atomic (False, the default)."""
    global _deterministic
    _deterministic = bool(flag)


def is_deterministic():
    return _deterministic


def _tma_ready(t):
    st = t._strides  # (B, S, H, D): the three outer strides tested one by one, no generator per call
    e = _TMA_ELEMS
    return st[3] == 1 and st[0] % e == 0 and st[1] % e == 0 and st[2] % e == 0 and t._offset % e == 0


def _check(q, k, v, out, lse, dout):
    name = "sdpa_flash_backward"
    for label, t in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        if len(t._shape) != 4:
            raise RuntimeError(f"{name}: {label} must be (B, S, H, D), got shape {list(t._shape)}")
        if t._dtype is not q._dtype:
            raise RuntimeError(f"{name}: {label} is {t._dtype}, q is {q._dtype}; all must share one dtype")
        if t._storage.device is not q._storage.device:
            raise RuntimeError(f"{name}: {label} is on {t._storage.device}, q on {q._storage.device}")
    if q._dtype not in _DTYPE:
        raise RuntimeError(f"{name}: dtype {q._dtype} has no fused kernel (bfloat16 or float16)")
    if k._shape != v._shape:
        raise RuntimeError(f"{name}: k {list(k._shape)} and v {list(v._shape)} differ in shape")
    if out._shape != q._shape or dout._shape != q._shape:
        raise RuntimeError(f"{name}: out {list(out._shape)} and dout {list(dout._shape)} must have q's shape "
                           f"{list(q._shape)}")
    B, Sq, Hq, _ = q._shape
    if lse._dtype is not dt.float32 or lse._shape != (B, Hq, Sq):
        raise RuntimeError(f"{name}: lse must be float32 of shape {[B, Hq, Sq]}, got {lse._dtype} "
                           f"{list(lse._shape)}")
    if lse._storage.device is not q._storage.device:
        raise RuntimeError(f"{name}: lse is on {lse._storage.device}, q on {q._storage.device}")


def _check_grads_into(q, k, v, grads):
    name = "sdpa_flash_backward"
    if len(grads) != 3:
        raise RuntimeError(f"{name}: grads_into must be (dq, dk, dv), got {len(grads)} tensors")
    for label, t, like in (("dq", grads[0], q), ("dk", grads[1], k), ("dv", grads[2], v)):
        if t._shape != like._shape or t._dtype is not like._dtype or t._storage.device is not like._storage.device:
            raise RuntimeError(f"{name}: grads_into {label} must be {like._dtype} {list(like._shape)} on "
                               f"{like._storage.device}, got {t._dtype} {list(t._shape)} on {t._storage.device}")
        if t._strides[3] != 1:
            raise RuntimeError(f"{name}: grads_into {label} must have unit stride on the head dim, got strides "
                               f"{list(t._strides)}")


@register("sdpa_flash_backward", CUDA)
def sdpa_flash_backward(q, k, v, out, lse, dout, scale, is_causal, dropout_p, rng_state, deterministic=None,
                        grads_into=None):
    """(dq, dk, dv) of fused attention; see the module docstring.

    grads_into: (dq, dk, dv) tensors shaped like q, k, v (any strides with a unit head-dim
    stride, e.g. the slots of one (B, S, 3, H, D) buffer) that the kernels write instead of
    new ones; they are returned."""
    _check(q, k, v, out, lse, dout)
    if grads_into is not None:
        _check_grads_into(q, k, v, grads_into)
    philox = (0, 0, 0, 0)
    if dropout_p > 0.0:
        if rng_state is None or len(rng_state) != 4:
            raise RuntimeError("sdpa_flash_backward: dropout_p > 0 needs the forward's rng_state (seed, seed_ptr, "
                               f"offset, offset_ptr), got {rng_state!r}")
        philox = tuple(int(x) for x in rng_state)
    det = _deterministic if deterministic is None else bool(deterministic)
    dev = q._storage.device
    stream = _stream(dev.index)
    q, k, v, dout = (t if _tma_ready(t) else _contig(t, stream) for t in (q, k, v, dout))
    if out._strides[3] != 1:
        out = _contig(out, stream)
    if lse._strides[2] != 1:
        lse = _contig(lse, stream)
    B, Sq, Hq, D = q._shape
    Sk = k._shape[1]
    lib = _lib()
    stat_elems, acc_elems, _ = lib.attention_backward_workspace(B, Sq, Hq, Sk, D, det)
    lse2 = _empty((stat_elems,), dt.float32, dev, stream)
    delta = _empty((stat_elems,), dt.float32, dev, stream)
    dq_acc = _empty((acc_elems,), dt.float32, dev, stream)
    rng = _empty((2,), dt.int64, dev, stream) if dropout_p > 0.0 else None
    if grads_into is not None:
        dq, dk, dv = grads_into
    else:
        dq = _empty(q._shape, q._dtype, dev, stream)
        dk = _empty(k._shape, k._dtype, dev, stream)
        dv = _empty(v._shape, v._dtype, dev, stream)
    lib.attention_backward(_ptr(q), q._shape, q._strides, _ptr(k), k._shape, k._strides, _ptr(v), v._strides,
                           _ptr(out), out._strides, _ptr(dout), dout._strides, _ptr(lse), lse._strides,
                           _ptr(dq), dq._strides, _ptr(dk), dk._strides, _ptr(dv), dv._strides,
                           _ptr(lse2), _ptr(delta), _ptr(dq_acc), _DTYPE[q._dtype], float(scale), bool(is_causal),
                           det, float(dropout_p), philox[0], philox[1], philox[2], philox[3],
                           _ptr(rng) if rng is not None else 0, stream)
    return dq, dk, dv
