"""cutegrad.cuda: devices, streams, events and memory on the CUDA driver API.

Built on cuda-bindings (`cuda.bindings.driver`), imported on first CUDA use so
`import cutegrad` stays fast and works without a GPU; `is_available()` is then
False and never raises, and any other CUDA use raises `CudaNotAvailableError`
("no CUDA device available: ..."). cutegrad runs on each device's primary
context, shared with PyTorch and CuPy in the same process.

Every failing driver call raises `CudaError` naming the call and the CUDA
error. Work that CUDA graph capture forbids raises `StreamCaptureError` after
the capture has been ended and discarded (see docs/graphs.md).

See docs/cuda.md for the API and its semantics.
"""
from .errors import CudaError, CudaNotAvailableError, StreamCaptureError
from .device import (
    DeviceProperties,
    current_device,
    device,
    device_count,
    get_device_name,
    get_device_properties,
    is_available,
    mem_get_info,
    set_device,
    synchronize,
)
from .streams import ExternalStream, Stream, current_stream, default_stream, set_stream, stream
from .events import Event
from .capture_guard import _check_not_capturing
from .tensors import record_stream  # importing tensors registers the CUDA storage kernels
from .memory import (memory_stats, memory_allocated, max_memory_allocated, memory_reserved, max_memory_reserved,
                     reset_peak_memory_stats)
from .pinned_tensors import is_pinned, pin_memory  # binds Tensor.pin_memory / Tensor.is_pinned
from .dry_run import dry_run


def is_current_stream_capturing():
    """True when the calling thread's current stream is being captured into a graph.

    False without touching the driver when CUDA is not initialised or no
    capture is underway anywhere in the process.
    """
    from . import capture_guard, driver
    if not driver.is_initialized() or not capture_guard.any_capture_underway():
        return False
    s = current_stream()
    if capture_guard.capture_of_stream(s.device, s.handle) is not None:
        return True
    # A stream joined to a capture by an event wait is capturing without being
    # the capture's origin; only the driver knows.
    status = driver.call("cuStreamIsCapturing", s._cu)
    return int(status) != 0


def empty_cache(device=None):
    """Return the caching allocator's unused cached memory of a device to the driver.

    Default: the current device. Illegal during graph capture (freeing device
    memory synchronises, and the capture's addresses must stay valid).
    """
    _check_not_capturing("cutegrad.cuda.empty_cache()")
    from cutegrad.allocator import get_allocator
    from .device import device_index
    get_allocator(device_index(device)).empty_cache()


def manual_seed(seed):
    """Seed the current device's generator (torch.cuda.manual_seed).

    Without a GPU, or before CUDA is initialised, the seed is applied to every
    device generator made later, as torch queues it until CUDA starts.
    """
    from cutegrad.graphs import rng
    from . import driver
    if not driver.is_initialized() and not is_available():
        rng.manual_seed(seed)
        return
    rng.default_generator(current_device()).manual_seed(seed)


def manual_seed_all(seed):
    """Seed every CUDA device's generator, including ones made later."""
    from cutegrad.graphs import rng
    rng.manual_seed(seed)


def initial_seed():
    """The seed of the current device's generator (raises without a GPU, as torch)."""
    from cutegrad.graphs import rng
    return rng.default_generator(current_device()).initial_seed()


def get_device_capability(device=None):
    """(major, minor) compute capability of a device (raises without a GPU)."""
    p = get_device_properties(device)
    return p.major, p.minor


def is_bf16_supported(including_emulation=True):
    """Whether the current device computes in bfloat16 natively (compute capability 8.0 or newer).

    False without a GPU, as torch's. cutegrad's kernels emulate nothing, so
    including_emulation changes nothing.
    """
    if not is_available():
        return False
    return get_device_capability()[0] >= 8


__all__ = [
    "CudaError", "CudaNotAvailableError", "StreamCaptureError",
    "DeviceProperties", "Event", "ExternalStream", "Stream",
    "current_device", "current_stream", "default_stream", "device", "device_count",
    "empty_cache", "get_device_name", "get_device_properties", "is_available",
    "is_current_stream_capturing", "mem_get_info", "record_stream", "set_device", "set_stream",
    "stream", "synchronize",
    "get_device_capability", "initial_seed", "is_bf16_supported", "is_pinned", "manual_seed", "manual_seed_all",
    "max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved", "memory_stats",
    "pin_memory", "reset_peak_memory_stats",
    "dry_run",
]


def __getattr__(name):
    # torch.cuda.amp, imported on first use: it needs the op layer, which imports this package
    if name == "amp":
        import importlib
        return importlib.import_module(".amp", __name__)
    raise AttributeError(f"module 'cutegrad.cuda' has no attribute {name!r}")
