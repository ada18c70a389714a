"""A stand-in for the CUDA driver API (`cuda.bindings.driver`) used by the dry run.

It answers every driver function cutegrad's runtime calls with the shape of a
real answer (a CUresult first, then the outputs) and never touches a GPU:
streams and events are counters, contexts are device indices, and nothing
queued on a stream runs. Device memory comes from the caching allocator over
`SimulatedMemory`, never from here; page-locked host memory (pinned staging
buffers, the index-error records) is real host memory, because cutegrad writes
it through ctypes. A device-to-host copy writes zeros: no kernel ran, so a
dry-run tensor has no values to read back.

Calls that queue work on a stream (copies, memsets, graph launches) are
recorded in `work` as `(name, args)`, next to the `_C` calls of the dry run
(cutegrad.cuda.dry_run), so a launch count includes the driver's memsets.
A driver function this module does not know raises NotImplementedError
naming it, rather than answering something plausible and wrong.
"""
import ctypes
import enum


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_NOT_SUPPORTED = 801


class CUstream(int):
    """A stream handle; int() of it is the handle, as with cuda-bindings."""


class CUevent(int):
    pass


class _Flags:
    """Enum namespaces of cuda-bindings, with the values cutegrad reads."""

    def __init__(self, **values):
        self.__dict__.update(values)


CUstream_flags = _Flags(CU_STREAM_NON_BLOCKING=1)
CUevent_flags = _Flags(CU_EVENT_DISABLE_TIMING=2, CU_EVENT_BLOCKING_SYNC=1)
CUstreamCaptureMode = _Flags(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL=1)
CUdevice_attribute = _Flags(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR=75,
                            CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR=76,
                            CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT=16,
                            CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE=38)
CU_MEMHOSTALLOC_PORTABLE = 1
CU_MEMHOSTALLOC_DEVICEMAP = 2

# An H200's answers, so code that sizes grids from the properties sees a Hopper GPU.
DEVICE_NAME = b"cutegrad dry-run device (H200-like)"
TOTAL_MEMORY = 141 << 30
_ATTRIBUTES = {75: 9, 76: 0, 16: 132, 38: 60 << 20}

# Driver calls that queue work on a stream: recorded like kernel launches.
STREAM_WORK = frozenset((
    "cuMemcpyHtoDAsync", "cuMemcpyDtoHAsync", "cuMemcpyAsync", "cuMemsetD8Async", "cuMemsetD16Async",
    "cuMemsetD32Async", "cuMemsetD2D32Async", "cuGraphLaunch",
))
_OK = (0,)


class DryDriver:
    """The driver module's stand-in for `devices` GPUs; `work` lists the stream work queued."""

    CUresult = CUresult
    CUstream = CUstream
    CUevent = CUevent
    CUstream_flags = CUstream_flags
    CUevent_flags = CUevent_flags
    CUstreamCaptureMode = CUstreamCaptureMode
    CUdevice_attribute = CUdevice_attribute
    CU_MEMHOSTALLOC_PORTABLE = CU_MEMHOSTALLOC_PORTABLE
    CU_MEMHOSTALLOC_DEVICEMAP = CU_MEMHOSTALLOC_DEVICEMAP

    def __init__(self, devices=1, work=None):
        self.devices = devices
        self.work = [] if work is None else work
        self._next_handle = 0x1000
        self._host = {}  # pointer -> ctypes buffer keeping page-locked memory alive

    def _handle(self):
        self._next_handle += 0x10
        return self._next_handle

    # --- initialisation, devices, contexts -------------------------------------------
    def cuInit(self, flags):
        return _OK

    def cuDeviceGetCount(self):
        return 0, self.devices

    def cuDeviceGet(self, index):
        return 0, index

    def cuDevicePrimaryCtxRetain(self, dev):
        return 0, ("dry-context", dev)

    def cuCtxSetCurrent(self, ctx):
        return _OK

    def cuCtxSynchronize(self):
        return _OK

    def cuCtxGetStreamPriorityRange(self):
        return 0, 0, -5

    def cuDeviceGetName(self, length, dev):
        return 0, DEVICE_NAME

    def cuDeviceGetAttribute(self, attr, dev):
        return 0, _ATTRIBUTES.get(int(attr), 0)

    def cuDeviceTotalMem(self, dev):
        return 0, TOTAL_MEMORY

    def cuMemGetInfo(self):
        return 0, TOTAL_MEMORY, TOTAL_MEMORY

    def cuGetErrorString(self, err):
        return 0, b"cutegrad dry run"

    # --- streams and events ------------------------------------------------------------
    def cuStreamCreateWithPriority(self, flags, priority):
        return 0, CUstream(self._handle())

    def cuEventCreate(self, flags):
        return 0, CUevent(self._handle())

    def cuStreamIsCapturing(self, stream):
        return 0, 0

    def cuEventElapsedTime(self, start, end):
        return 0, 0.0

    cuStreamDestroy = cuEventDestroy = cuEventRecord = cuEventQuery = cuStreamQuery = \
        cuEventSynchronize = cuStreamSynchronize = staticmethod(lambda *args: _OK)

    def cuStreamWaitEvent(self, stream, event, flags):
        return _OK

    # --- host memory ---------------------------------------------------------------------
    def cuMemHostAlloc(self, nbytes, flags):
        buf = ctypes.create_string_buffer(max(int(nbytes), 1))
        ptr = ctypes.addressof(buf)
        self._host[ptr] = buf
        return 0, ptr

    def cuMemHostGetDevicePointer(self, host, flags):
        return 0, int(host)

    def cuMemFreeHost(self, ptr):
        self._host.pop(int(ptr), None)
        return _OK

    # --- stream work ---------------------------------------------------------------------
    def cuMemcpyDtoHAsync(self, dst, src, nbytes, stream):
        self.work.append(("cuMemcpyDtoHAsync", (dst, src, nbytes, int(stream))))
        ctypes.memset(int(dst), 0, int(nbytes))
        return _OK

    def __getattr__(self, name):
        if name in STREAM_WORK:
            work = self.work

            def queue(*args):
                work.append((name, args))
                return _OK
            setattr(self, name, queue)
            return queue
        if name.startswith("cu"):
            raise NotImplementedError(f"the cutegrad dry run does not simulate the driver function {name}")
        raise AttributeError(name)
