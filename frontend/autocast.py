"""Automatic mixed precision in PyTorch's style: `cutegrad.autocast(device_type, dtype)`.

Inside an enabled region, ops on tensors of that device type follow one of
two policies, chosen per op (the lists are PyTorch's CUDA autocast lists,
restricted to the ops cutegrad has, and are applied to "cpu" too so CI tests
the policy the GPU runs):

- lower precision (LOWER_PRECISION_OPS): matmul-class ops cast their floating
  tensor arguments (not float64) to the autocast dtype and run there;
- float32 (FP32_OPS): numerically sensitive ops upcast float16/bfloat16
  arguments to float32 and return float32.

Everything else runs in its inputs' dtypes; ops with mixed floating inputs
(add, mul, cat, ...) already promote to the widest.

Casts are ordinary differentiable `to_dtype` calls, so gradients reach
float32 parameters in float32 (fp32 master weights). A leaf float32 tensor
that requires grad (a parameter) is cast once per region while grad mode is
on: the cast is cached until the outermost region exits, or until the
parameter's version counter moves (an in-place update inside the region).

State is per thread, like torch's. The op entry points test one attribute,
`gate.armed` (the number of enabled regions open in any thread), so with
autocast off an op pays one attribute load; only when it is set do they call
`lower`/`fp32`, which read this thread's state.
"""
import functools
import threading

from . import dtypes as dt
from .device import CPU, CUDA
from .tensor import Tensor
from .autograd.grad_mode import state as _grad_state
from .ops.conversion import CastBackward, to_dtype
from .tensor import make

# PyTorch's CUDA autocast lists, as far as cutegrad has the ops; documentation
# and tests read these, the op entry points carry the matching hooks.
LOWER_PRECISION_OPS = ("matmul", "mm", "bmm", "linear", "scaled_dot_product_attention")
FP32_OPS = ("softmax", "log_softmax", "layer_norm", "cross_entropy", "nll_loss", "mse_loss")

_BACKEND_OF_TYPE = {"cpu": CPU, "cuda": CUDA}
_DEFAULT_DTYPE = {CPU: dt.bfloat16, CUDA: dt.float16}  # torch's defaults per device type
_LOW = (dt.float16, dt.bfloat16)
_LOWERABLE = (dt.float16, dt.bfloat16, dt.float32)  # torch: floating, not float64


class _Gate:
    __slots__ = ("armed",)

    def __init__(self):
        self.armed = 0


gate = _Gate()
_gate_lock = threading.Lock()


class _State(threading.local):
    def __init__(self):
        self.dtypes = [None, None]  # per backend index: the active autocast dtype, None where off
        self.configured = [_DEFAULT_DTYPE[CPU], _DEFAULT_DTYPE[CUDA]]  # get_autocast_dtype per backend
        self.depth = 0  # regions entered (enabled or not); the cache lives while > 0
        self.cache_enabled = True
        self.cache = {}  # id(parameter) -> (parameter, version, cast copy)


state = _State()


def _backend_of(device_type, opname):
    if not isinstance(device_type, str):
        raise ValueError(f"{opname}: expected device_type of type str, got {type(device_type).__name__}")
    backend = _BACKEND_OF_TYPE.get(device_type)
    if backend is None:
        raise ValueError(f"{opname}: unsupported device_type {device_type!r}; expected 'cpu' or 'cuda'")
    return backend


class autocast:
    """Context manager and decorator: run the ops of the region in mixed precision.

    autocast(device_type, dtype=None, enabled=True, cache_enabled=None)
    device_type: "cuda" or "cpu"; dtype: cutegrad.bfloat16 or cutegrad.float16
    (default: this thread's `get_autocast_dtype(device_type)`, float16 on cuda
    and bfloat16 on cpu, as torch). `enabled=False` switches autocast off for
    the device type inside the region; regions nest and restore on exit.
    """

    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        self._backend = _backend_of(device_type, "autocast")
        self.device = device_type
        if not isinstance(enabled, bool):
            raise ValueError(f"autocast: expected enabled of type bool, got {type(enabled).__name__}")
        if dtype is None:
            dtype = state.configured[self._backend]
        if dtype not in _LOW:
            raise ValueError(f"autocast: dtype must be cutegrad.bfloat16 or cutegrad.float16 for device_type "
                             f"{device_type!r}, got {dtype}")
        self.fast_dtype = dtype
        self._enabled = enabled
        self._cache_enabled = cache_enabled

    def __enter__(self):
        s = state
        b = self._backend
        self._prev = (s.dtypes[b], s.configured[b], s.cache_enabled)
        s.dtypes[b] = self.fast_dtype if self._enabled else None
        s.configured[b] = self.fast_dtype
        if self._cache_enabled is not None:
            s.cache_enabled = bool(self._cache_enabled)
        s.depth += 1
        if self._enabled:
            with _gate_lock:
                gate.armed += 1
        return self

    def __exit__(self, *exc):
        s = state
        b = self._backend
        s.depth -= 1
        if s.depth == 0:
            s.cache.clear()
        s.dtypes[b], s.configured[b], s.cache_enabled = self._prev
        if self._enabled:
            with _gate_lock:
                gate.armed -= 1
        return False

    def __call__(self, fn):
        args = (self.device, self.fast_dtype, self._enabled, self._cache_enabled)

        @functools.wraps(fn)
        def wrapper(*a, **kw):
            with autocast(*args):  # a fresh region per call: calls may nest or run in several threads
                return fn(*a, **kw)
        return wrapper


def is_autocast_enabled(device_type="cuda"):
    """Whether ops on tensors of device_type are autocast in this thread now."""
    return state.dtypes[_backend_of(device_type, "is_autocast_enabled")] is not None


def get_autocast_dtype(device_type):
    """The dtype autocast uses for device_type in this thread (the innermost region's, else the default)."""
    return state.configured[_backend_of(device_type, "get_autocast_dtype")]


def set_autocast_dtype(device_type, dtype):
    """Set this thread's default autocast dtype for device_type (the dtype an `autocast` without one takes)."""
    backend = _backend_of(device_type, "set_autocast_dtype")
    if dtype not in _LOW:
        raise ValueError(f"set_autocast_dtype: dtype must be cutegrad.bfloat16 or cutegrad.float16, got {dtype}")
    state.configured[backend] = dtype


def clear_autocast_cache():
    """Drop this thread's cached casts of parameters (the outermost region's exit does this too)."""
    state.cache.clear()


def _cast_cached(t, dtype):
    # torch caches casts of leaf float32 tensors that require grad (parameters);
    # only while grad mode is on, so a cached copy always carries its autograd edge
    s = state
    if not (s.cache_enabled and t._requires_grad and t.grad_fn is None and t._base is None
            and t._dtype is dt.float32 and _grad_state.enabled):
        return to_dtype(t, dtype)
    key = id(t)
    hit = s.cache.get(key)
    version = t._storage.version
    if hit is not None and hit[0] is t and hit[1] == version and hit[2]._dtype is dtype:
        return hit[2]
    out = _cast_parameter(t, dtype) if t._storage.device.backend == CUDA else to_dtype(t, dtype)
    s.cache[key] = (t, version, out)
    return out


_weight_shadows = None  # cutegrad.optim.weight_shadows, imported on first use


def _cast_parameter(t, dtype):
    """A CUDA parameter's cast from its copy kept across steps (optim/weight_shadows.py:
    the fused optimizers write it), so a training step launches no cast; made and kept on a miss."""
    global _weight_shadows
    weight_shadows = _weight_shadows
    if weight_shadows is None:  # not at import time: cutegrad.optim imports the ops, which import this
        from .optim import weight_shadows
        _weight_shadows = weight_shadows
    shadow = weight_shadows.lookup(t, dtype)
    if shadow is None:
        out = to_dtype(t, dtype)
        weight_shadows.remember(t, make(out._storage, out._shape, out._strides, out._offset, out._dtype))
        return out
    alias = make(shadow._storage, shadow._shape, shadow._strides, shadow._offset, shadow._dtype)
    return CastBackward.record(alias, (t,), (), t._dtype)


def _autocast_device(ts):
    """(backend, autocast dtype) of the first tensor in ts, or None when autocast is off for its device."""
    for t in ts:
        if isinstance(t, Tensor):
            backend = t._storage.device.backend
            dtype = state.dtypes[backend]
            return None if dtype is None else (backend, dtype)
    return None


def lower(*ts):
    """ts for a lower-precision op: floating tensors (not float64) on an autocast device cast to its dtype."""
    found = _autocast_device(ts)
    if found is None:
        return ts
    backend, dtype = found
    out = list(ts)
    for i, t in enumerate(ts):
        if isinstance(t, Tensor) and t._dtype is not dtype and t._dtype in _LOWERABLE \
                and t._storage.device.backend == backend:
            out[i] = _cast_cached(t, dtype)
    return out


def fp32(*ts):
    """ts for a float32 op: float16/bfloat16 tensors on an autocast device cast to float32."""
    found = _autocast_device(ts)
    if found is None:
        return ts
    backend = found[0]
    out = list(ts)
    for i, t in enumerate(ts):
        if isinstance(t, Tensor) and t._dtype in _LOW and t._storage.device.backend == backend:
            out[i] = to_dtype(t, dt.float32)
    return out


def wants_fp32(t):
    """Whether a float32 op would upcast t (a 16-bit tensor on a device autocast is on for)."""
    return isinstance(t, Tensor) and t._dtype in _LOW and state.dtypes[t._storage.device.backend] is not None


def call_excluded(t, fn, *args, **kwargs):
    """fn(*args, **kwargs) with autocast off for t's device type: a lower-precision op whose body
    calls other listed ops (attention's softmax) runs wholly in the dtype it was cast to, as in torch."""
    s = state
    backend = t._storage.device.backend
    prev = s.dtypes[backend]
    s.dtypes[backend] = None
    try:
        return fn(*args, **kwargs)
    finally:
        s.dtypes[backend] = prev


__all__ = ["autocast", "is_autocast_enabled", "get_autocast_dtype", "set_autocast_dtype", "clear_autocast_cache",
           "LOWER_PRECISION_OPS", "FP32_OPS"]
