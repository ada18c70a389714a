"""scaled_dot_product_attention with PyTorch's semantics, and its fused path.

Two paths compute the same thing:

* the fused path: the registry kernel "sdpa_flash" (CUDA: the CuTeDSL
  FlashAttention kernel, kernels/cute/attention_fwd.py) reads q, k and v in
  place as (B, S, H, D) views, writes O as a new contiguous (B, Sq, Hq, D)
  tensor plus the fp32 row log-sum-exp, and records one autograd node that
  saves q, k, v, O and the LSE -- never the (Sq, Sk) scores.  Its backward is
  the "sdpa_flash_backward" kernel where the backend has one, else a composite
  that recomputes the probabilities from the LSE.
* the composite path: scale q, batched matmul, (masked) softmax, dropout,
  matmul, every step a differentiable op; it serves every backend and every
  input the fused kernels do not take.

`sdpa_path` is the dispatcher: a pure function of the arguments' shapes,
strides, dtypes and the backend's fused-kernel capabilities, returning the
path and, for the composite, the reason (docs/attention.md lists them).
"""
import math
from typing import NamedTuple

from .. import dtypes as dt
from ..autocast import gate as _AC, lower as _ac_lower, call_excluded as _ac_call_excluded
from ..autograd import grad_mode
from ..autograd.engine import Node, attach
from ..dispatch import kernel
from ..tensor import Tensor
from . import pointwise as P
from . import reduction as R
from . import shape as S
from .linalg import matmul
from .nn import _softmax_causal, _tril, dropout, softmax, _K_SOFTMAX_CAUSAL

_K_FLASH = kernel("sdpa_flash").impl
_K_FLASH_BWD = kernel("sdpa_flash_backward").impl
_state = grad_mode.state
_NAME = "scaled_dot_product_attention"
_INT32_MAX = 2 ** 31 - 1


class FlashCaps(NamedTuple):
    """What a backend's fused attention kernels take (set by the backend module)."""
    dtypes: tuple        # input dtypes (cutegrad dtypes)
    head_dims: tuple     # head dims with a specialization
    dropout: bool        # dropout inside the forward kernel
    backward: bool       # a fused backward kernel ("sdpa_flash_backward")
    align_elems: int     # every non-unit stride and the storage offset a multiple of this (TMA: 16 bytes)


# backend number -> FlashCaps, or a function of the device returning FlashCaps or None
# (the CUDA backend checks the device's compute capability); no entry: no fused path
FLASH_CAPS = {}
_MAX_GRID = 65535


def flash_caps(device):
    """The fused-attention capabilities of `device`, or None."""
    entry = FLASH_CAPS.get(device.backend)
    return entry(device) if callable(entry) else entry


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, generator=None):
    """softmax(q k^T * scale + mask) v over the last two dims, as torch.nn.functional's.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev); the
    leading dims broadcast; enable_gqa lets Hkv divide Hq.  attn_mask: bool
    (True = attend) or float (added to the scores), broadcast to (..., L, S).
    is_causal: the top-left aligned mask ones(L, S).tril(0).  scale defaults to
    1 / sqrt(E).  Rows with every key masked give 0, as PyTorch 2.13 does."""
    if _AC.armed and isinstance(query, Tensor):
        # a lower-precision op: cast once, then run the whole body (its
        # softmax included) in that dtype, as torch's autocast does
        query, key, value, attn_mask = _ac_lower(query, key, value, attn_mask)
        return _ac_call_excluded(query, _sdpa, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                 enable_gqa, generator)
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, generator)


def _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """Every bad-input error, raised before anything is launched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_NAME}(): argument '{name}' must be Tensor, not {type(t).__name__}")
        if not t._dtype.is_floating_point:
            raise RuntimeError(f"{_NAME}(): expected floating point query, key and value, got {name} {t._dtype}")
    if not (len(query._shape) >= 2 and len(key._shape) >= 2 and len(value._shape) >= 2):
        raise RuntimeError(f"{_NAME}(): query, key and value must be at least 2-D, got shapes {list(query._shape)}, "
                           f"{list(key._shape)} and {list(value._shape)}")
    if not query._dtype is key._dtype is value._dtype:
        raise RuntimeError(f"{_NAME}(): query, key and value must have the same dtype, got {query._dtype}, "
                           f"{key._dtype} and {value._dtype}")
    devs = (query._storage.device, key._storage.device, value._storage.device)
    if not devs[0] == devs[1] == devs[2]:
        raise RuntimeError(f"{_NAME}(): query, key and value must be on the same device, got {devs[0]}, {devs[1]} "
                           f"and {devs[2]}")
    if query._shape[-1] != key._shape[-1]:
        raise RuntimeError(f"{_NAME}(): query and key head dims differ: {query._shape[-1]} vs {key._shape[-1]} "
                           f"(query {list(query._shape)}, key {list(key._shape)})")
    if key._shape[-2] != value._shape[-2]:
        raise RuntimeError(f"{_NAME}(): key and value sequence lengths differ: key {list(key._shape)} vs value "
                           f"{list(value._shape)}")
    if is_causal and attn_mask is not None:
        raise RuntimeError(f"{_NAME}(): explicit attn_mask should not be set when is_causal=True")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{_NAME}(): dropout_p must be in [0, 1], got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{_NAME}(): attn_mask must be a Tensor or None, not {type(attn_mask).__name__}")
        if attn_mask._dtype is not dt.bool_ and attn_mask._dtype is not query._dtype:
            raise RuntimeError(f"{_NAME}(): a float attn_mask must have query's dtype {query._dtype}, got "
                               f"{attn_mask._dtype}")
        if attn_mask._storage.device != devs[0]:
            raise RuntimeError(f"{_NAME}(): attn_mask is on {attn_mask._storage.device}, query on {devs[0]}")
    hq, hk, hv = (t._shape[-3] if len(t._shape) >= 3 else 1 for t in (query, key, value))
    if enable_gqa and (hk != hv or hq % hk):
        raise RuntimeError(f"{_NAME}(): with enable_gqa the key and value heads must be equal and divide the query "
                           f"heads, got query {list(query._shape)}, key {list(key._shape)}, value "
                           f"{list(value._shape)}")
    # broadcasting of the leading dims (heads included unless grouped) is matmul's rule
    from .broadcast import broadcast_shapes
    lead_k = key._shape[:-3] + ((hq,) if enable_gqa and len(key._shape) >= 3 else key._shape[-3:-2])
    try:
        broadcast_shapes(query._shape[:-2], lead_k, value._shape[:-3] + lead_k[len(lead_k) - 1:]
                         if len(value._shape) >= 3 else ())
    except RuntimeError:
        raise RuntimeError(f"{_NAME}(): the batch and head dims of query {list(query._shape)}, key "
                           f"{list(key._shape)} and value {list(value._shape)} do not broadcast (different head "
                           f"counts need enable_gqa=True)") from None


def sdpa_path(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, caps, needs_grad):
    """("flash", "") when the fused kernels take these arguments, else ("composite", why not).

    Pure: reads only shapes, strides, offsets and dtypes of the (already
    checked) arguments and `caps`, the backend's FlashCaps or None."""
    if caps is None:
        return "composite", "no fused attention kernel on this device"
    if attn_mask is not None:
        return "composite", "attn_mask given (the fused kernels take no mask)"
    if len(query._shape) != 4 or len(key._shape) != 4 or len(value._shape) != 4:
        return "composite", "query, key and value are not all 4-D (B, H, S, D)"
    if query._dtype not in caps.dtypes:
        return "composite", f"dtype {query._dtype} has no fused kernel"
    B, Hq, Sq, D = query._shape
    Bk, Hkv, Sk, Dk = key._shape
    if D not in caps.head_dims or value._shape[-1] != D:
        return "composite", f"head dim {D} (value {value._shape[-1]}) has no fused kernel"
    if Bk != B or value._shape[0] != B or value._shape[1] != Hkv:
        return "composite", "broadcast batch or head dims"
    if Hkv != Hq and not (enable_gqa and Hq % Hkv == 0):
        return "composite", "broadcast head dims"
    if B * Hq * Sq == 0 or Sk == 0:
        return "composite", "empty input"
    if max(Sq, Sk) > _INT32_MAX:
        return "composite", "sequence longer than 32-bit extents"
    if B > _MAX_GRID or Hq > _MAX_GRID:
        return "composite", "more than 65535 batches or heads (grid limit)"
    a = caps.align_elems
    for t in (query, key, value):
        st = t._strides
        if st[3] != 1:
            return "composite", "head dim not contiguous (unit stride)"
        # the stride of an extent-1 dim addresses nothing (the backend substitutes one)
        if any(n > 1 and (s <= 0 or s % a) for n, s in zip(t._shape[:3], st[:3])) or t._offset % a:
            return "composite", f"strides or offset not a positive multiple of {a} elements (16 bytes)"
    if dropout_p > 0.0:
        if not caps.dropout:
            return "composite", "dropout is not inside the fused kernel"
        if needs_grad and not caps.backward:
            return "composite", "dropout with gradients needs the fused backward (it regenerates the mask)"
    return "flash", ""


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, generator):
    _check(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    dev = query._storage.device
    s = float(scale) if scale is not None else 1.0 / math.sqrt(query._shape[-1])
    needs_grad = _state.enabled and (query._requires_grad or key._requires_grad or value._requires_grad)
    path, _ = sdpa_path(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa,
                        flash_caps(dev), needs_grad)
    if path == "flash":
        return _flash(query, key, value, s, is_causal, dropout_p, generator, needs_grad)
    return _composite(query, key, value, attn_mask, dropout_p, is_causal, s, enable_gqa, generator)


def _repeat_heads(t, group):
    """(..., Hkv, S, D) -> (..., Hkv * group, S, D), head h reading head h // group (GQA)."""
    if group == 1:
        return t
    shp = t._shape
    x = S.unsqueeze(t, -3)
    x = S.expand(x, *(shp[:-2] + (group,) + shp[-2:]))
    return S.reshape(x, shp[:-3] + (shp[-3] * group,) + shp[-2:])


def _composite(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, generator):
    L, Sk = query._shape[-2], key._shape[-2]
    if enable_gqa and len(key._shape) >= 3 and key._shape[-3] != query._shape[-3]:
        group = query._shape[-3] // key._shape[-3]
        key, value = _repeat_heads(key, group), _repeat_heads(value, group)
    # scale q rather than the (L, Sk) scores: the same math on a tensor Sk/E times smaller
    scores = matmul(P.mul(query, scale), S.transpose(key, -2, -1))
    if Sk == 0:
        # no key to attend to: zeros, as PyTorch 2.13 gives (a matmul over an empty dim)
        return matmul(scores, value)
    fused_causal = is_causal and not getattr(_K_SOFTMAX_CAUSAL[scores._storage.device.backend], "missing", False)
    if fused_causal:
        attn = _softmax_causal(scores)
    else:
        if is_causal:
            from .creation import ones
            causal = _tril(ones((L, Sk), dtype=dt.bool_, device=query._storage.device))
            scores = P.masked_fill(scores, P.logical_not(causal), float("-inf"))
        elif attn_mask is not None:
            if not _broadcasts_into(attn_mask._shape, scores._shape):
                raise RuntimeError(f"{_NAME}(): attn_mask of shape {list(attn_mask._shape)} does not broadcast to "
                                   f"the attention scores' shape {list(scores._shape)}")
            if attn_mask._dtype is dt.bool_:
                scores = P.masked_fill(scores, P.logical_not(attn_mask), float("-inf"))
            else:
                scores = P.add(scores, attn_mask)
        attn = softmax(scores, -1)
        if attn_mask is not None:
            # a row with every key masked is 0, not NaN (PyTorch's safe softmax)
            dead = R.all(P.eq(scores, float("-inf")), -1, keepdim=True)
            attn = P.where(dead, 0.0, attn)
    if dropout_p > 0.0:
        attn = dropout(attn, dropout_p, True, generator)
    return matmul(attn, value)


def _broadcasts_into(mask_shape, shape):
    from .broadcast import broadcast_shapes
    try:
        return broadcast_shapes(mask_shape, shape) == tuple(shape)
    except RuntimeError:
        return False


def _flash(query, key, value, scale, is_causal, dropout_p, generator, needs_grad, packed=None):
    """The fused path: (B, H, S, D) arguments read as (B, S, H, D) views, O returned as a (B, H, Sq, D) view.

    packed: the (B, S, 3, H, D) tensor that query, key and value are (detached) views of
    (qkv_attention); the node then has it as its single input and its gradient is one buffer."""
    q, k, v = (S.transpose(t, 1, 2) for t in (query, key, value))
    backend = query._storage.device.backend
    out, lse, rng_state = _K_FLASH[backend](q.detach(), k.detach(), v.detach(), scale, is_causal, dropout_p,
                                            generator)
    if needs_grad:
        node = FlashAttentionBackward()
        node.scale, node.causal, node.dropout_p, node.rng_state = scale, is_causal, dropout_p, rng_state
        node.packed = packed is not None
        node.save(q, k, v, out, lse)
        attach(out, node, (packed,) if node.packed else (q, k, v))
    return S.transpose(out, 1, 2)


class FlashAttentionBackward(Node):
    """Gradient of the fused attention from q, k, v, O and the LSE (no saved scores).
    packed: the input is one (B, S, 3, H, D) tensor and the gradient is shaped like it."""
    __slots__ = ("scale", "causal", "dropout_p", "rng_state", "packed")

    def backward(self, g):
        q, k, v, out, lse = self.saved_tensors
        fused = _K_FLASH_BWD[q._storage.device.backend]
        if not _state.enabled and not getattr(fused, "missing", False):
            if not self.packed:
                return fused(q, k, v, out, lse, g, self.scale, self.causal, self.dropout_p, self.rng_state)
            # dq, dk and dv are written straight into their slots of one (B, S, 3, H, D) buffer
            from .creation import empty
            B, Sq, H, D = q._shape
            dqkv = empty((B, Sq, 3, H, D), dtype=q._dtype, device=q._storage.device)
            fused(q, k, v, out, lse, g, self.scale, self.causal, self.dropout_p, self.rng_state,
                  grads_into=tuple(S.select(dqkv, 2, i) for i in range(3)))
            return (dqkv,)
        if self.dropout_p > 0.0:
            raise RuntimeError(f"{_NAME}: the backward of fused attention with dropout needs the fused backward "
                               "kernel (only it regenerates the dropout mask); create_graph is not supported there")
        grads = flash_backward_composite(q, k, v, out, lse, g, self.scale, self.causal)
        return (S.stack(grads, 2),) if self.packed else grads


def qkv_attention(qkv, dropout_p=0.0, is_causal=False, scale=None, generator=None):
    """Self-attention over q, k and v packed in one (B, S, 3, H, D) tensor (a fused q/k/v
    projection's output reshaped), returned as (B, H, S, D).

    Equal to scaled_dot_product_attention(*qkv.transpose(1, 3).unbind(2), ...) in values and
    gradients.  On the fused path the autograd node takes qkv itself as its input and the
    backward kernel writes dq, dk and dv into their slots of one gradient shaped like qkv: no
    zero-filled buffers, copies or adds assemble the projection's gradient from three views."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv_attention(): argument 'qkv' must be Tensor, not {type(qkv).__name__}")
    if len(qkv._shape) != 5 or qkv._shape[2] != 3:
        raise RuntimeError(f"qkv_attention(): qkv must be (B, S, 3, H, D), got shape {list(qkv._shape)}")
    if _AC.armed:
        (qkv,) = _ac_lower(qkv)
        return _ac_call_excluded(qkv, _qkv_attention, qkv, dropout_p, is_causal, scale, generator)
    return _qkv_attention(qkv, dropout_p, is_causal, scale, generator)


def _qkv_attention(qkv, dropout_p, is_causal, scale, generator):
    q, k, v = S.unbind(S.transpose(qkv.detach(), 1, 3), 2)
    _check(q, k, v, None, dropout_p, is_causal, False)
    needs_grad = _state.enabled and qkv._requires_grad
    path, _ = sdpa_path(q, k, v, None, dropout_p, is_causal, False, flash_caps(qkv._storage.device), needs_grad)
    if path != "flash":
        q, k, v = S.unbind(S.transpose(qkv, 1, 3), 2)
        return _sdpa(q, k, v, None, dropout_p, is_causal, scale, False, generator)
    s = float(scale) if scale is not None else 1.0 / math.sqrt(q._shape[-1])
    return _flash(q, k, v, s, is_causal, dropout_p, generator, needs_grad, packed=qkv)


def flash_backward_composite(q, k, v, out, lse, dout, scale, is_causal):
    """dq, dk, dv of attention from the saved (B, S, H, D) q/k/v/O and the (B, Hq, Sq) LSE, in ops.

    P is recomputed as exp(q k^T * scale - lse); with D_i = rowsum(dO * O):
    dV = P^T dO, dS = P * (dO V^T - D_i), dQ = dS K * scale, dK = dS^T Q * scale;
    the grouped (GQA) k/v heads sum the gradients of the q heads that read them."""
    Hq, Hkv = q._shape[2], k._shape[2]
    group = Hq // Hkv
    qh, kh, vh, oh, gh = (S.transpose(t, 1, 2) for t in (q, k, v, out, dout))
    f32 = dt.float32 if q._dtype in (dt.float16, dt.bfloat16) else q._dtype
    qh, kh, vh, oh, gh = (t.to(f32) for t in (qh, kh, vh, oh, gh))
    kf, vf = _repeat_heads(kh, group), _repeat_heads(vh, group)
    s = P.mul(matmul(qh, S.transpose(kf, -2, -1)), scale)
    if is_causal:
        from .creation import ones
        Sq, Sk = s._shape[-2], s._shape[-1]
        keep = _tril(ones((Sq, Sk), dtype=dt.bool_, device=q._storage.device))
        s = P.masked_fill(s, P.logical_not(keep), float("-inf"))
    p = P.exp(P.sub(s, S.unsqueeze(lse.to(f32), -1)))
    dv = matmul(S.transpose(p, -2, -1), gh)
    dp = matmul(gh, S.transpose(vf, -2, -1))
    di = R.sum(P.mul(gh, oh), -1, keepdim=True)
    ds = P.mul(p, P.sub(dp, di))
    dq = P.mul(matmul(ds, kf), scale)
    dk = P.mul(matmul(S.transpose(ds, -2, -1), qh), scale)
    if group > 1:
        B, _, Sk, D = dk._shape
        dk = R.sum(S.reshape(dk, (B, Hkv, group, Sk, D)), 2)
        dv = R.sum(S.reshape(dv, (B, Hkv, group, Sk, D)), 2)
    return tuple(S.transpose(t, 1, 2).to(q._dtype) for t in (dq, dk, dv))
