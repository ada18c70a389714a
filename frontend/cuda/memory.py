"""torch.cuda's memory statistics, read from cutegrad's caching allocator.

Without a GPU (or before the first CUDA allocation of a device) there are no
statistics: the readers return 0 and `memory_stats` {} as torch's do;
`reset_peak_memory_stats` raises CudaNotAvailableError, as torch raises.
"""
from . import driver as _drv


def _stats(dev):
    if not _drv.is_available():
        return {}
    from cutegrad.allocator import get_allocator
    from .device import device_index
    return get_allocator(device_index(dev)).memory_stats()


def memory_stats(device=None):
    """The allocator's counters in torch.cuda.memory_stats' layout ({} without CUDA)."""
    return _stats(device)


def memory_allocated(device=None):
    """Bytes held by live tensors on the device."""
    return _stats(device).get("allocated_bytes.all.current", 0)


def max_memory_allocated(device=None):
    """Peak of memory_allocated since start or the last reset_peak_memory_stats."""
    return _stats(device).get("allocated_bytes.all.peak", 0)


def memory_reserved(device=None):
    """Bytes the allocator holds from the driver (allocated plus cached)."""
    return _stats(device).get("reserved_bytes.all.current", 0)


def max_memory_reserved(device=None):
    """Peak of memory_reserved since start or the last reset_peak_memory_stats."""
    return _stats(device).get("reserved_bytes.all.peak", 0)


def reset_peak_memory_stats(device=None):
    """Restart the peaks (max_memory_allocated, max_memory_reserved, ...) from the current values."""
    from cutegrad.allocator import get_allocator
    from .device import device_index
    get_allocator(device_index(device)).reset_peak_memory_stats()


__all__ = ["memory_stats", "memory_allocated", "max_memory_allocated", "memory_reserved",
           "max_memory_reserved", "reset_peak_memory_stats"]
