"""CUDA events: markers in a stream for ordering, completion queries and timing.

The CUevent is created lazily on the first `record`, on the device of the
stream it is recorded on, so an Event() can be made before knowing the device
(as in PyTorch). Events without timing are cheaper to record and wait on, so
timing is opt-in.
"""
from . import driver as _drv
from . import index_errors as _index_errors
from .capture_guard import _check_not_capturing


class Event:
    __slots__ = ("enable_timing", "blocking", "device", "_cu", "__weakref__")

    def __init__(self, enable_timing=False, blocking=False):
        self.enable_timing = bool(enable_timing)
        self.blocking = bool(blocking)
        self.device = None
        self._cu = None

    def _create(self, dev):
        _drv.activate(dev)
        flags = _drv.driver().CUevent_flags
        f = 0 if self.enable_timing else int(flags.CU_EVENT_DISABLE_TIMING)
        if self.blocking:
            f |= int(flags.CU_EVENT_BLOCKING_SYNC)
        self._cu = _drv.call("cuEventCreate", f)
        self.device = dev

    def __del__(self):
        if getattr(self, "_cu", None) is not None:
            try:
                _drv.call_status("cuEventDestroy", self._cu)
            except Exception:  # interpreter shutdown may have torn the bindings down
                pass

    @property
    def handle(self):
        """The CUevent as an int (0 before the first record)."""
        return 0 if self._cu is None else int(self._cu)

    def record(self, stream=None):
        """Record the event on `stream` (default: current stream of the current device)."""
        from .streams import current_stream
        s = current_stream() if stream is None else stream
        if self._cu is None:
            self._create(s.device)
        elif s.device != self.device:
            raise ValueError(f"event was created on cuda:{self.device} and cannot be "
                             f"recorded on a stream of cuda:{s.device}")
        _drv.call("cuEventRecord", self._cu, s._cu)

    def wait(self, stream=None):
        """Make future work on `stream` wait for this event's last record.

        Waiting on an event that was never recorded does nothing.
        """
        if self._cu is None:
            return
        from .streams import current_stream
        s = current_stream() if stream is None else stream
        _drv.call("cuStreamWaitEvent", s._cu, self._cu, 0)

    def query(self):
        """True when the work before the last record has completed (or never recorded)."""
        if self._cu is None:
            return True
        status = _drv.call_status("cuEventQuery", self._cu)
        if status == 0:
            return True
        if status == _drv.NOT_READY:
            return False
        raise _drv.error("cuEventQuery", status)

    def synchronize(self):
        """Wait on the host until the work before the last record has completed.

        Raises the IndexError a kernel recorded on the event's device since the
        last check (see index_errors).
        """
        _check_not_capturing("Event.synchronize()")
        if self._cu is not None:
            _drv.call("cuEventSynchronize", self._cu)
            _index_errors.raise_pending(self.device)

    def elapsed_time(self, end):
        """Milliseconds between this event's record and `end`'s; waits for both."""
        _check_not_capturing("Event.elapsed_time()")
        if not (self.enable_timing and end.enable_timing):
            raise ValueError("elapsed_time needs both events created with enable_timing=True")
        if self._cu is None or end._cu is None:
            raise ValueError("elapsed_time needs both events recorded first")
        _drv.call("cuEventSynchronize", self._cu)
        _drv.call("cuEventSynchronize", end._cu)
        return float(_drv.call("cuEventElapsedTime", self._cu, end._cu))

    def __repr__(self):
        where = "unrecorded" if self._cu is None else f"cuda:{self.device} handle={self.handle:#x}"
        return f"<cutegrad.cuda.Event {where}{' timing' if self.enable_timing else ''}>"
