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


__all__ = [
    "CudaError", "CudaNotAvailableError", "StreamCaptureError",
    "DeviceProperties", "Event", "ExternalStream", "Stream",
    "current_device", "current_stream", "default_stream", "device", "device_count",
    "empty_cache", "get_device_name", "get_device_properties", "is_available",
    "is_current_stream_capturing", "mem_get_info", "record_stream", "set_device", "set_stream",
    "stream", "synchronize",
    "dry_run",
]
