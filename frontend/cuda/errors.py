"""Exceptions of the CUDA runtime layer.

Every failing driver call surfaces as `CudaError` naming the call and the CUDA
error, so a log line is enough to know what broke. Subclasses separate the two
cases a caller may want to handle differently: no usable GPU at all, and work
that CUDA graph capture forbids.
"""


class CudaError(RuntimeError):
    """A CUDA driver call failed.

    Attributes: `call` (driver function name), `code` (the CUresult as int, or
    None when the failure did not come from a CUresult), `error_name`
    (e.g. "CUDA_ERROR_OUT_OF_MEMORY").
    """

    def __init__(self, message, *, call=None, code=None, error_name=None):
        super().__init__(message)
        self.call = call
        self.code = code
        self.error_name = error_name


class CudaNotAvailableError(CudaError):
    """No CUDA device can be used in this process (no driver, or no GPU)."""


class StreamCaptureError(CudaError):
    """Work that is illegal while a CUDA graph is being captured.

    By the time this is raised, cutegrad has already ended and discarded the
    capture and released its memory pool, so the stream and allocator are
    usable again.
    """
