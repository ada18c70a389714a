"""Deferred, device-side index bounds errors (gather, index_select, scatter_add,
index_add, embedding, one_hot with a given num_classes).

Checking an index tensor's range on the host would copy it back before every
launch: a host sync per embedding lookup, and impossible inside a CUDA graph
capture. Instead each device has one error record in page-locked host memory
mapped into the device (allocated when the device's context is first made
current, so never during a capture, and at one address for the whole process,
so captured graphs keep writing to it on every replay). A kernel that meets an
index outside [0, size) skips it (gather writes 0) and, if the record is free,
claims it by atomicCAS and writes the index, the dimension, the size and the op.

The host reads the record with a plain memory load, no CUDA call, where it
waits for the device anyway: `cutegrad.cuda.synchronize()`,
`Stream.synchronize()`, `Event.synchronize()` and every device-to-host copy
(`.cpu()`, `.item()`, `.tolist()`, `.numpy()`, printing). If it is set, it is
cleared and IndexError is raised, worded like the CPU backend's eager error.
The device, the allocator and later work are unaffected: the bad index was
skipped, not followed. See docs/cuda.md.

The layout mirrors `IndexErrorRecord` in kernels/cuda/ops_args.h; kernels
write it through `report_bad_index` (kernels/cuda/index_errors.h).
"""
import ctypes
import threading

from . import driver as _drv

# error_op codes of the kernels; 0 is unused so an unset record is all zeros.
GATHER, INDEX_SELECT, SCATTER_ADD, INDEX_ADD, ONE_HOT, CROSS_ENTROPY = 1, 2, 3, 4, 5, 6
_OP_NAMES = {GATHER: "gather", INDEX_SELECT: "index_select", SCATTER_ADD: "scatter_add",
             INDEX_ADD: "index_add", ONE_HOT: "one_hot", CROSS_ENTROPY: "cross_entropy"}


class _Record(ctypes.Structure):
    _fields_ = [("flag", ctypes.c_int32), ("op", ctypes.c_int32), ("dim", ctypes.c_int32),
                ("reserved", ctypes.c_int32), ("index", ctypes.c_int64), ("size", ctypes.c_int64)]


_lock = threading.Lock()
_records = {}  # device index -> (_Record over the host memory, device pointer)


def _allocate(dev):
    """Create device `dev`'s record; its context must be current on this thread."""
    with _lock:
        if dev in _records:
            return
        d = _drv.driver()
        flags = int(d.CU_MEMHOSTALLOC_DEVICEMAP) | int(d.CU_MEMHOSTALLOC_PORTABLE)
        host = int(_drv.call("cuMemHostAlloc", ctypes.sizeof(_Record), flags))
        rec = _Record.from_address(host)
        ctypes.memset(host, 0, ctypes.sizeof(_Record))
        dptr = int(_drv.call("cuMemHostGetDevicePointer", host, 0))
        _records[dev] = (rec, dptr)  # never freed: graphs captured with dptr may replay until exit


def record_pointer(dev):
    """Device pointer of device `dev`'s error record, for a kernel launch."""
    entry = _records.get(dev)
    if entry is None:
        _drv.activate(dev)
        _allocate(dev)
        entry = _records[dev]
    return entry[1]


def error_message(op, dim, index, size, dev):
    return (f"index {index} is out of bounds for dimension {dim} with size {size} "
            f"({_OP_NAMES.get(op, f'op {op}')} on cuda:{dev}, detected on the device by a kernel queued earlier)")


def raise_pending(dev):
    """Raise the IndexError recorded on device `dev` since the last check, clearing it.

    Call only after the host has waited for the device: details written by a
    kernel still running might not be complete before that.
    """
    entry = _records.get(dev)
    if entry is None or entry[0].flag == 0:
        return
    rec = entry[0]
    op, dim, index, size = rec.op, rec.dim, rec.index, rec.size
    rec.flag = 0
    raise IndexError(error_message(op, dim, index, size, dev))


def pending(dev):
    """The message of the error recorded on device `dev`, or None; does not clear it."""
    entry = _records.get(dev)
    if entry is None or entry[0].flag == 0:
        return None
    rec = entry[0]
    return error_message(rec.op, rec.dim, rec.index, rec.size, dev)
