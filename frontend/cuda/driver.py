"""The CUDA driver API (cuda-bindings), loaded and initialised on first use.

`import cutegrad` never touches CUDA: the bindings are imported and cuInit runs
the first time something asks for the driver, so CPU-only use stays fast and
works on machines with no driver at all. A failed initialisation is remembered
and every later CUDA use raises the same `CudaNotAvailableError`.

Contexts: cutegrad runs on each device's *primary* context
(cuDevicePrimaryCtxRetain), the one the CUDA runtime, PyTorch and CuPy use, so
pointers, streams and events are interchangeable with theirs in one process.
The current context is per thread; `activate(i)` makes device i's primary
context current on the calling thread and caches that fact in a thread-local
so the common case costs one attribute read. If foreign code switches the
thread's context behind cutegrad's back, `cutegrad.cuda.set_device` restores it.

Errors: `call(name, *args)` runs one driver function, turns a failing CUresult
into `CudaError` naming the call and the CUDA error, and returns the outputs.
A stream-capture error (the driver refusing work because a graph is being
captured) first aborts the calling thread's captures through
`capture_guard`, then raises `StreamCaptureError`, so the process stays usable.
"""
import threading

from . import capture_guard
from .errors import CudaError, CudaNotAvailableError, StreamCaptureError

_lock = threading.Lock()
_drv = None
_init_failure = None  # message of the first failed initialisation, reraised on each use
_device_count = 0
_primary_ctx = {}  # device index -> CUcontext, retained for the life of the process
class _ThreadState(threading.local):
    ctx_device = None  # device whose primary context is current on this thread (class default: none)


_tls = _ThreadState()

# CUresult codes meaning "not allowed while a stream is capturing".
_CAPTURE_ERROR_NAMES = (
    "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
    "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
    "CUDA_ERROR_STREAM_CAPTURE_MERGE",
    "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
    "CUDA_ERROR_STREAM_CAPTURE_UNJOINED",
    "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
    "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT",
    "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
    "CUDA_ERROR_CAPTURED_EVENT",
)
_capture_error_codes = frozenset()

# Raw memory management outside the allocator. Under thread-local capture CUDA
# may accept some of these, but an address obtained or freed behind the graph's
# pool cannot be trusted at replay, so cutegrad refuses them explicitly.
_RAW_MEMORY_CALLS = frozenset((
    "cuMemAlloc", "cuMemAllocPitch", "cuMemAllocManaged", "cuMemAllocHost", "cuMemHostAlloc",
    "cuMemFree", "cuMemFreeHost", "cuMemAllocAsync", "cuMemFreeAsync",
))

NOT_READY = 600  # CUDA_ERROR_NOT_READY: an asynchronous query found work pending


def _no_device(reason):
    return CudaNotAvailableError(
        f"no CUDA device available: {reason}. CUDA tensors, streams and graphs "
        "need an NVIDIA GPU and driver; use device='cpu' on this machine."
    )


def _initialize():
    global _drv, _init_failure, _device_count, _capture_error_codes
    with _lock:
        if _drv is not None:
            return
        if _init_failure is not None:
            raise _no_device(_init_failure)
        try:
            from cuda.bindings import driver as d
        except Exception as e:  # package missing or broken: CUDA is simply unavailable
            _init_failure = f"the cuda-bindings package could not be imported ({type(e).__name__}: {e})"
            raise _no_device(_init_failure) from None
        try:
            (err,) = d.cuInit(0)
        except Exception as e:  # the bindings raise when libcuda.so cannot be loaded
            _init_failure = f"the NVIDIA driver library could not be loaded ({type(e).__name__}: {e})"
            raise _no_device(_init_failure) from None
        if err != 0:
            _init_failure = f"cuInit failed with {_error_name(d, err)} ({_error_string(d, err)})"
            raise _no_device(_init_failure)
        err, count = d.cuDeviceGetCount()
        if err != 0 or count == 0:
            _init_failure = ("the driver reports no GPU" if err == 0 else
                             f"cuDeviceGetCount failed with {_error_name(d, err)}")
            raise _no_device(_init_failure)
        _device_count = count
        _capture_error_codes = frozenset(
            int(getattr(d.CUresult, n)) for n in _CAPTURE_ERROR_NAMES if hasattr(d.CUresult, n))
        _drv = d


def driver():
    """The `cuda.bindings.driver` module, initialising CUDA on first use."""
    if _drv is None:
        _initialize()
    return _drv


def is_initialized():
    return _drv is not None


def is_available():
    """True when a CUDA driver and at least one GPU can be used; never raises."""
    try:
        driver()
    except Exception:
        return False
    return True


def device_count():
    return _device_count if is_available() else 0


def _error_name(d, err):
    try:
        return d.CUresult(int(err)).name
    except Exception:  # a code newer than these bindings know
        return f"CUresult {int(err)}"


def _error_string(d, err):
    try:
        e, s = d.cuGetErrorString(err)
        if e == 0 and s:
            return s.decode() if isinstance(s, bytes) else str(s)
    except Exception:
        pass
    return "no description"


def error(name, err):
    """Build the exception for driver function `name` having returned `err`."""
    d = driver()
    code = int(err)
    ename = _error_name(d, code)
    text = f"{name} failed: {ename} ({_error_string(d, code)})"
    if code in _capture_error_codes:
        aborted = capture_guard.abort_thread_captures(f"{name} returned {ename}")
        if aborted:
            text += (f". The CUDA driver refused it because a graph capture was underway; "
                     f"cutegrad ended and discarded {aborted} capture(s) and released their memory pools")
        return StreamCaptureError(text, call=name, code=code, error_name=ename)
    return CudaError(text, call=name, code=code, error_name=ename)


def call(name, *args):
    """Run driver function `name`; raise CudaError on failure, return its outputs.

    Returns None for a function with no outputs, the single output, or a tuple.
    Raw memory calls (cuMemAlloc, cuMemFree, ...) are refused while the calling
    thread captures a graph: memory in a graph must come from its pool.
    """
    d = _drv if _drv is not None else driver()
    if capture_guard._active_count and name in _RAW_MEMORY_CALLS:
        capture_guard._check_not_capturing(f"raw driver memory call {name}")
    res = getattr(d, name)(*args)
    err = res[0]
    if err != 0:
        raise error(name, err)
    n = len(res)
    if n == 1:
        return None
    if n == 2:
        return res[1]
    return res[1:]


def call_status(name, *args):
    """Run driver function `name` and return its raw CUresult as an int, unchecked.

    For calls whose non-success codes are answers (cuStreamQuery's NOT_READY)
    or that run during error recovery, where raising would hide the first error.
    """
    d = _drv if _drv is not None else driver()
    return int(getattr(d, name)(*args)[0])


def check_device_index(index):
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"CUDA device index must be an int, got {type(index).__name__}")
    driver()
    n = _device_count
    if not 0 <= index < n:
        raise ValueError(f"CUDA device index {index} out of range: {n} device(s) visible")
    return index


def primary_context(index):
    ctx = _primary_ctx.get(index)
    if ctx is None:
        check_device_index(index)
        with _lock:
            ctx = _primary_ctx.get(index)
            if ctx is None:
                dev = call("cuDeviceGet", index)
                ctx = call("cuDevicePrimaryCtxRetain", dev)
                _primary_ctx[index] = ctx
    return ctx


def activate(index):
    """Make device `index`'s primary context current on the calling thread."""
    if _tls.ctx_device != index:
        call("cuCtxSetCurrent", primary_context(index))
        _tls.ctx_device = index
        from . import index_errors  # a device's error record exists from its first use, never made mid-capture
        if index not in index_errors._records:
            index_errors._allocate(index)


def forget_active_context():
    """Drop the cached 'which context is current' so the next activate() sets it."""
    _tls.ctx_device = None
