"""Devices: the current device per thread, properties, device-wide synchronisation.

The current device is per thread, as in CUDA and PyTorch; a thread that never
chose one uses device 0. Setting it also makes that device's primary context
current on the thread, so raw driver calls made afterwards (by the allocator,
by kernels) land on the right GPU.
"""
import threading
from dataclasses import dataclass

from . import driver as _drv
from . import index_errors as _index_errors
from .capture_guard import _check_not_capturing

_tls = threading.local()
_props_cache = {}


def device_index(dev=None):
    """Normalise None / int / "cuda" / "cuda:N" / cutegrad.device to a device index.

    None and a bare "cuda" mean the calling thread's current device.
    """
    if dev is None:
        return current_device()
    if isinstance(dev, bool):
        raise TypeError("a bool is not a CUDA device")
    if isinstance(dev, int):
        return _drv.check_device_index(dev)
    if isinstance(dev, str):
        kind, sep, idx = dev.partition(":")
        if kind != "cuda" or (sep and not idx.isdigit()):
            raise ValueError(f"expected a CUDA device like 'cuda' or 'cuda:1', got {dev!r}")
        return _drv.check_device_index(int(idx)) if sep else current_device()
    kind = getattr(dev, "type", None)
    if kind is not None:
        if kind != "cuda":
            raise ValueError(f"expected a CUDA device, got {dev}")
        idx = getattr(dev, "index", None)
        return current_device() if idx is None else _drv.check_device_index(idx)
    raise TypeError(f"expected a CUDA device (int, 'cuda:N' or cutegrad.device), got {type(dev).__name__}")


def is_available():
    """True when CUDA can be used in this process. Never raises."""
    return _drv.is_available()


def device_count():
    """Number of visible CUDA devices; 0 when CUDA is unavailable. Never raises."""
    return _drv.device_count()


def current_device():
    """Index of the calling thread's current CUDA device (raises without a GPU)."""
    _drv.driver()
    return getattr(_tls, "device", 0)


def set_device(dev):
    """Make `dev` the calling thread's current device and its primary context current."""
    idx = device_index(dev)
    _drv.forget_active_context()  # re-assert even if foreign code switched contexts
    _drv.activate(idx)
    _tls.device = idx


def _make_current(idx):
    """set_device for an index already validated, without re-asserting the context."""
    _drv.activate(idx)
    _tls.device = idx


class device:
    """Context manager: run the block with `dev` as current device, then restore."""

    def __init__(self, dev):
        self.index = None if dev is None else device_index(dev)
        self._prev = []

    def __enter__(self):
        if self.index is not None:
            self._prev.append(current_device())
            set_device(self.index)
        return self

    def __exit__(self, *exc):
        if self.index is not None:
            set_device(self._prev.pop())
        return False


def synchronize(dev=None):
    """Wait on the host until all work on `dev` (default: current device) is done.

    Raises the IndexError a kernel recorded on the device since the last check
    (see index_errors).
    """
    _check_not_capturing("cutegrad.cuda.synchronize()")
    idx = device_index(dev)
    _drv.activate(idx)
    _drv.call("cuCtxSynchronize")
    _index_errors.raise_pending(idx)


@dataclass(frozen=True)
class DeviceProperties:
    index: int
    name: str
    major: int
    minor: int
    total_memory: int
    multi_processor_count: int
    l2_cache_size: int

    def __repr__(self):
        return (f"DeviceProperties(name={self.name!r}, major={self.major}, minor={self.minor}, "
                f"total_memory={self.total_memory >> 20}MB, "
                f"multi_processor_count={self.multi_processor_count})")


def get_device_properties(dev=None):
    """Name, compute capability, memory, SM count and L2 size of a device."""
    idx = device_index(dev)
    props = _props_cache.get(idx)
    if props is None:
        d = _drv.driver()
        cu_dev = _drv.call("cuDeviceGet", idx)
        raw = _drv.call("cuDeviceGetName", 256, cu_dev)
        name = raw.split(b"\0", 1)[0].decode() if isinstance(raw, bytes) else str(raw)
        attr = d.CUdevice_attribute

        def get(a):
            return int(_drv.call("cuDeviceGetAttribute", a, cu_dev))

        props = DeviceProperties(
            index=idx,
            name=name,
            major=get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            minor=get(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            total_memory=int(_drv.call("cuDeviceTotalMem", cu_dev)),
            multi_processor_count=get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            l2_cache_size=get(attr.CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
        )
        _props_cache[idx] = props
    return props


def get_device_name(dev=None):
    return get_device_properties(dev).name


def mem_get_info(dev=None):
    """(free, total) bytes of device memory as the driver sees them."""
    idx = device_index(dev)
    _drv.activate(idx)
    free, total = _drv.call("cuMemGetInfo")
    return int(free), int(total)
