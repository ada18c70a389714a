"""Bookkeeping of CUDA graph captures underway, and the guard against host work in them.

During stream capture nothing executes: work is recorded into a graph. A host
synchronisation (waiting for a result, `.item()`, `.cpu()`, printing a CUDA
tensor, `empty_cache`) can therefore never be satisfied, and CUDA invalidates
the capture when it sees one. cutegrad captures in thread-local mode, so the
work that matters is the capturing thread's own; each such thread keeps its
captures here.

`_check_not_capturing(opname)` is the one guard every host-synchronising
operation calls first. It costs one integer test when nothing is being captured
anywhere. When the calling thread is capturing it aborts those captures (each
capture ends itself, discards the graph and releases its memory pool, see
`cutegrad.graphs`) and raises `StreamCaptureError` naming the operation, so the
stream, the allocator and the process stay usable.

A capture object registered here provides `device` (int), `stream_handle`
(int) and `abort(reason)`, which must end the capture, release its pool,
unregister it and not raise.
"""
import threading

from .errors import StreamCaptureError

_tls = threading.local()
_lock = threading.Lock()
_active_count = 0  # captures underway in all threads; zero is the fast path
_by_stream = {}  # (device, stream handle) -> capture, over all threads


def _thread_list():
    caps = getattr(_tls, "captures", None)
    if caps is None:
        caps = _tls.captures = []
    return caps


def register(capture):
    global _active_count
    key = (capture.device, capture.stream_handle)
    with _lock:
        if key in _by_stream:
            raise RuntimeError(f"stream {capture.stream_handle:#x} on cuda:{capture.device} "
                               "is already being captured")
        _by_stream[key] = capture
        _active_count += 1
    _thread_list().append(capture)


def unregister(capture):
    """Forget `capture`; a no-op when it is not registered (abort paths may race)."""
    global _active_count
    key = (capture.device, capture.stream_handle)
    with _lock:
        if _by_stream.get(key) is capture:
            del _by_stream[key]
            _active_count -= 1
    caps = getattr(_tls, "captures", None)
    if caps and capture in caps:
        caps.remove(capture)


def any_capture_underway():
    return _active_count > 0


def thread_captures():
    """The calling thread's captures underway, oldest first (a copy)."""
    return list(getattr(_tls, "captures", ()))


def capture_of_stream(device, stream_handle):
    """The capture whose origin is this stream, from any thread, or None."""
    if not _active_count:
        return None
    return _by_stream.get((device, stream_handle))


def abort_thread_captures(reason):
    """Abort every capture of the calling thread, newest first; return how many."""
    caps = thread_captures()
    for capture in reversed(caps):
        capture.abort(reason)
        unregister(capture)
    return len(caps)


def _check_not_capturing(opname, device=None, stream_handle=None):
    """Raise StreamCaptureError if `opname` would host-synchronise during a capture.

    `device`/`stream_handle` name the stream the operation waits on, when there
    is one, so that waiting on a stream another thread is capturing is caught too.
    """
    if not _active_count:
        return
    if getattr(_tls, "captures", None):
        n = abort_thread_captures(f"{opname} was called during capture")
        raise StreamCaptureError(
            f"{opname} is not allowed while a CUDA graph is being captured: it needs "
            "results on the host, but captured work does not run until the graph is "
            f"replayed. cutegrad ended and discarded the capture ({n} in this thread) "
            "and released its memory pool; move this call before the capture begins "
            "or after it ends.", call=opname)
    if stream_handle is not None and (device, stream_handle) in _by_stream:
        raise StreamCaptureError(
            f"{opname} waits on stream {stream_handle:#x} of cuda:{device}, which another "
            "thread is capturing into a CUDA graph; wait until that capture has ended.",
            call=opname)
