"""Streams and the current stream of each thread and device.

`Stream()` creates a non-blocking stream (it does not synchronise with the
legacy default stream), as PyTorch's side streams do. `default_stream()` is the
legacy default stream, handle 0, the one PyTorch and CuPy also start on, so
work ordered on it is ordered with theirs.

The current stream is per thread and per device: entering `with s:` or
`with cutegrad.cuda.stream(s):` makes `s` current for its device and makes
that device current, and the exit restores both. The restore stack lives in
thread-local storage, so one Stream object can be entered in several threads.
"""
import threading

from . import driver as _drv
from . import index_errors as _index_errors
from .capture_guard import _check_not_capturing
from .device import _make_current, current_device, device_index

class _ThreadState(threading.local):
    """Per-thread state; the class defaults make an unset entry a plain attribute read (the
    CUDA backend reads `current` on every op), where getattr(tls, name, None) raises inside."""
    current = None  # device index -> current Stream; None until a stream is made current
    stack = None
    sync_events = None


_tls = _ThreadState()
_default_streams = {}


class Stream:
    """A CUDA stream on one device. `.handle` is the CUstream as an int."""

    __slots__ = ("device", "handle", "priority", "_cu", "_owned", "__weakref__")

    def __init__(self, device=None, priority=0):
        idx = device_index(device)
        _drv.activate(idx)
        least, greatest = _drv.call("cuCtxGetStreamPriorityRange")
        if not isinstance(priority, int) or not greatest <= priority <= least:
            raise ValueError(f"stream priority must be an int in [{greatest}, {least}] "
                             f"(lower is more urgent), got {priority!r}")
        d = _drv.driver()
        self._cu = _drv.call("cuStreamCreateWithPriority",
                             d.CUstream_flags.CU_STREAM_NON_BLOCKING, priority)
        self._owned = True
        self.device = idx
        self.handle = int(self._cu)
        self.priority = priority

    @classmethod
    def _wrap(cls, handle, device, owned=False):
        """A Stream object for an existing CUstream (not destroyed by cutegrad)."""
        s = object.__new__(cls)
        s._cu = _drv.driver().CUstream(handle)
        s._owned = owned
        s.device = device
        s.handle = int(handle)
        s.priority = 0
        return s

    def __del__(self):
        if getattr(self, "_owned", False):
            try:
                _drv.call_status("cuStreamDestroy", self._cu)
            except Exception:  # interpreter shutdown may have torn the bindings down
                pass

    def wait_stream(self, other):
        """Make future work on this stream wait for all work queued on `other` so far."""
        if other.device == self.device and other.handle == self.handle:
            return
        ev = _sync_event(other.device)
        _drv.call("cuEventRecord", ev, other._cu)
        _drv.call("cuStreamWaitEvent", self._cu, ev, 0)

    def wait_event(self, event):
        """Make future work on this stream wait for `event`'s last record."""
        event.wait(self)

    def record_event(self, event=None):
        """Record `event` (a new Event if None) on this stream and return it."""
        from .events import Event
        if event is None:
            event = Event()
        event.record(self)
        return event

    def query(self):
        """True when all work queued on this stream has completed."""
        status = _drv.call_status("cuStreamQuery", self._cu)
        if status == 0:
            return True
        if status == _drv.NOT_READY:
            return False
        raise _drv.error("cuStreamQuery", status)

    def synchronize(self):
        """Wait on the host until all work queued on this stream has completed.

        Raises the IndexError a kernel recorded on this stream's device since
        the last check (see index_errors).
        """
        _check_not_capturing("Stream.synchronize()", self.device, self.handle)
        _drv.call("cuStreamSynchronize", self._cu)
        _index_errors.raise_pending(self.device)

    def __enter__(self):
        stack = _tls.stack
        if stack is None:
            stack = _tls.stack = []
        stack.append((current_device(), current_stream(self.device)))
        _make_current(self.device)
        _set_current(self)
        return self

    def __exit__(self, *exc):
        prev_device, prev_stream = _tls.stack.pop()
        _set_current(prev_stream)
        _make_current(prev_device)
        return False

    def __eq__(self, other):
        return isinstance(other, Stream) and self.device == other.device and self.handle == other.handle

    def __hash__(self):
        return hash((self.device, self.handle))

    def __repr__(self):
        return f"<cutegrad.cuda.Stream device=cuda:{self.device} handle={self.handle:#x}>"


def ExternalStream(handle, device=None):
    """Wrap a CUstream created elsewhere (PyTorch, CuPy); cutegrad never destroys it."""
    if not isinstance(handle, int):
        handle = int(handle)
    return Stream._wrap(handle, device_index(device))


def default_stream(device=None):
    """The legacy default stream (handle 0) of `device`."""
    idx = device_index(device)
    s = _default_streams.get(idx)
    if s is None:
        s = _default_streams.setdefault(idx, Stream._wrap(0, idx))
    return s


def current_stream(device=None):
    """The calling thread's current stream on `device` (default: current device)."""
    idx = device_index(device)
    cur = _tls.current
    if cur is not None:
        s = cur.get(idx)
        if s is not None:
            return s
    return default_stream(idx)


def _set_current(s):
    cur = _tls.current
    if cur is None:
        cur = _tls.current = {}
    cur[s.device] = s


def set_stream(s):
    """Make `s` the current stream of its device for the calling thread (no restore)."""
    _set_current(s)


class stream:
    """Context manager: `with cutegrad.cuda.stream(s):` runs the block on `s`.

    `stream(None)` is a no-op, so code can take an optional stream argument.
    """

    def __init__(self, s):
        self.s = s

    def __enter__(self):
        if self.s is not None:
            self.s.__enter__()
        return self.s

    def __exit__(self, *exc):
        if self.s is not None:
            self.s.__exit__(*exc)
        return False


def _sync_event(dev):
    """A per-thread, per-device event for wait_stream, reused to avoid create/destroy."""
    evs = _tls.sync_events
    if evs is None:
        evs = _tls.sync_events = {}
    ev = evs.get(dev)
    if ev is None:
        _drv.activate(dev)
        d = _drv.driver()
        ev = evs[dev] = _drv.call("cuEventCreate", d.CUevent_flags.CU_EVENT_DISABLE_TIMING)
    return ev
