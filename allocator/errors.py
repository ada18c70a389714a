"""Exceptions raised by the allocator."""


def format_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.2f} KiB"
    if n < 1 << 30:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / (1 << 30):.2f} GiB"


class OutOfMemoryError(RuntimeError):
    """The allocator could not satisfy a request even after releasing its cache.

    The numbers that explain the failure are attributes as well as text, so a
    caller can decide to shrink a batch instead of parsing the message.
    """

    def __init__(self, *, device, requested, rounded, device_free, device_total,
                 reserved, allocated, largest_free_block, allowed=None,
                 in_private_pools=0):
        self.device = device
        self.requested = requested
        self.rounded = rounded
        self.device_free = device_free
        self.device_total = device_total
        self.reserved = reserved
        self.allocated = allocated
        self.reserved_unallocated = reserved - allocated
        self.largest_free_block = largest_free_block
        self.allowed = allowed
        self.in_private_pools = in_private_pools
        cap = f" The memory fraction cap: {format_size(allowed)} allowed." if allowed is not None else ""
        pools = (f" {format_size(in_private_pools)} of the reserved memory is cached in "
                 "CUDA-graph private pools." if in_private_pools else "")
        super().__init__(
            f"CUDA out of memory on device {device}: tried to allocate "
            f"{format_size(rounded)} (requested {requested} bytes). The device has "
            f"{format_size(device_total)} in total, of which "
            f"{format_size(device_free) if device_free is not None else 'an unknown amount'} is free."
            f"{cap} cutegrad has {format_size(reserved)} reserved, {format_size(allocated)} "
            f"allocated, so {format_size(self.reserved_unallocated)} is reserved but unallocated; "
            f"the largest free cached block is {format_size(largest_free_block)}"
            f"{' (fragmentation: try max_split_size_mb in CUTEGRAD_CUDA_ALLOC_CONF)' if self.reserved_unallocated > rounded else ''}."
            f"{pools}"
        )


class CaptureError(RuntimeError):
    """An operation that is illegal while a CUDA graph capture is underway."""
