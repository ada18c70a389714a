"""CudaMemory: the memory backend on the CUDA driver API (cuda-bindings).

cuda-bindings is imported when a CudaMemory is created, not when
``cutegrad.allocator`` is imported, so the package works on machines with no
GPU or driver. Memory lives in the device's primary context, the one PyTorch
and CuPy use, so pointers and stream handles interoperate.

Driver calls that need a current context (cuMemAlloc, cuMemFree, cuEventCreate,
cuMemGetInfo) push the primary context and pop it afterwards, leaving the
caller's current context as it was. They are all off the allocator's hot path;
the hot path calls only cuEventRecord / cuEventQuery, which need no current
context.

During a capture the allocator still needs new segments for the private pool.
cuMemAlloc is not a stream operation, so it is safe to run while capturing,
but a global-mode capture forbids it on any thread; ``malloc`` therefore
switches this thread to relaxed capture mode around the call (as PyTorch does).
"""

from __future__ import annotations


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the error."""


class NoCudaDeviceError(RuntimeError):
    """No CUDA driver or device is available."""


def _load_driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise NoCudaDeviceError(f"no CUDA device: cuda-bindings is not importable ({e})") from None
    try:
        (err,) = driver.cuInit(0)
    except Exception as e:  # the bindings raise when libcuda.so cannot be loaded
        raise NoCudaDeviceError(f"no CUDA device: the NVIDIA driver could not be loaded ({e})") from None
    if err != driver.CUresult.CUDA_SUCCESS:
        raise NoCudaDeviceError(f"no CUDA device: cuInit failed with {err.name}")
    return driver


class CudaMemory:
    def __init__(self, device_index=0):
        cu = _load_driver()
        self._cu = cu
        self._SUCCESS = cu.CUresult.CUDA_SUCCESS
        self._NOT_READY = cu.CUresult.CUDA_ERROR_NOT_READY
        self._OOM = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
        self._IMPLICIT = cu.CUresult.CUDA_ERROR_STREAM_CAPTURE_IMPLICIT
        count = self._check("cuDeviceGetCount", cu.cuDeviceGetCount())
        if count == 0:
            raise NoCudaDeviceError("no CUDA device: the driver reports 0 devices")
        if not 0 <= device_index < count:
            raise ValueError(f"CudaMemory: device index {device_index} out of range (0..{count - 1})")
        self.device = device_index
        self._dev = self._check("cuDeviceGet", cu.cuDeviceGet(device_index))
        self._ctx = self._check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(self._dev))
        self._total = self._check("cuDeviceTotalMem", cu.cuDeviceTotalMem(self._dev))
        self._relaxed = cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
        self._capture_active = cu.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_ACTIVE
        self._event_flags = cu.CUevent_flags.CU_EVENT_DISABLE_TIMING

    def _check(self, name, result):
        err = result[0]
        if err != self._SUCCESS:
            raise CudaDriverError(f"{name} failed: {err.name} ({int(err)})")
        if len(result) == 1:
            return None
        return result[1] if len(result) == 2 else result[1:]

    def _push(self):
        self._check("cuCtxPushCurrent", self._cu.cuCtxPushCurrent(self._ctx))

    def _pop(self):
        self._check("cuCtxPopCurrent", self._cu.cuCtxPopCurrent())

    def total_memory(self):
        return int(self._total)

    def mem_get_info(self):
        self._push()
        try:
            free, total = self._check("cuMemGetInfo", self._cu.cuMemGetInfo())
        finally:
            self._pop()
        return int(free), int(total)

    def malloc(self, nbytes, capture_underway=False):
        cu = self._cu
        self._push()
        try:
            if capture_underway:
                old = self._check("cuThreadExchangeStreamCaptureMode",
                                  cu.cuThreadExchangeStreamCaptureMode(self._relaxed))
                try:
                    err, ptr = cu.cuMemAlloc(nbytes)
                finally:
                    self._check("cuThreadExchangeStreamCaptureMode", cu.cuThreadExchangeStreamCaptureMode(old))
            else:
                err, ptr = cu.cuMemAlloc(nbytes)
        finally:
            self._pop()
        if err == self._OOM:
            return None
        if err != self._SUCCESS:
            raise CudaDriverError(f"cuMemAlloc({nbytes}) failed: {err.name} ({int(err)})")
        return int(ptr)

    def free(self, ptr):
        self._push()
        try:
            self._check("cuMemFree", self._cu.cuMemFree(ptr))
        finally:
            self._pop()

    def fill(self, ptr, nbytes, value, stream):
        self._check("cuMemsetD8Async", self._cu.cuMemsetD8Async(ptr, value, nbytes, stream))

    def event_create(self):
        self._push()
        try:
            return self._check("cuEventCreate", self._cu.cuEventCreate(self._event_flags))
        finally:
            self._pop()

    def event_record(self, event, stream):
        self._check("cuEventRecord", self._cu.cuEventRecord(event, stream))

    def event_query(self, event):
        (err,) = self._cu.cuEventQuery(event)
        if err == self._SUCCESS:
            return True
        if err == self._NOT_READY:
            return False
        raise CudaDriverError(f"cuEventQuery failed: {err.name} ({int(err)})")

    def event_synchronize(self, event):
        self._check("cuEventSynchronize", self._cu.cuEventSynchronize(event))

    def capture_id(self, stream):
        result = self._cu.cuStreamGetCaptureInfo(stream)
        err = result[0]
        if err != self._SUCCESS:
            if err == self._IMPLICIT:
                # The legacy stream while a blocking stream captures: it is not
                # part of any capture (and any work on it would end the capture).
                return None
            raise CudaDriverError(f"cuStreamGetCaptureInfo failed: {err.name} ({int(err)})")
        return int(result[2]) if result[1] == self._capture_active else None
