"""CUDAGraph: capture work queued on a side stream once, replay it with one launch.

Capture (`capture_begin`/`capture_end`, or the `graph` context manager):
- runs on the calling thread's current stream, which must not be the legacy
  default stream (CUDA forbids it there, and capturing it would serialise with
  every blocking stream); `graph()` provides a per-thread side stream;
- uses thread-local capture mode: work that CUDA forbids during capture is
  refused only on the capturing thread, so other threads keep running eagerly;
- routes every allocation on the capturing stream (and streams joined to its
  capture) to the graph's private memory pool, through the allocator's
  begin/end_allocate_to_pool. Addresses baked into the graph then stay valid,
  because the pool is held until the graph is reset or dies, and replays
  reuse those same addresses rather than allocating;
- registers itself with `cutegrad.cuda.capture_guard`, so that host
  synchronisation during the capture aborts it cleanly (see docs/graphs.md).

An aborted capture (an exception in the `with graph(...)` block, a forbidden
call, a driver refusal) ends the CUDA capture, destroys whatever graph it
produced, stops routing allocations to the pool and releases the pool, so the
stream, the allocator and this CUDAGraph are usable again.

Random numbers: the capture collects one `GraphRngState` per generator used,
and `replay` writes each one's seed and base offset before launching (rng.py).
Those 16-byte buffers come from `_RngSlots`, a per-device slab outside every
memory pool, never from the graph's pool: the writes happen before the launch,
so a buffer must not share memory with anything the graph itself writes, and a
pool block taken mid-capture may be one that earlier captured kernels use as
scratch (the graph would then overwrite its own seed and offset).
"""
import threading

from cutegrad.cuda import capture_guard
from cutegrad.cuda import driver as _drv
from cutegrad.cuda.errors import StreamCaptureError
from cutegrad.cuda.streams import Stream, current_stream
from cutegrad.cuda.device import current_device

from .rng import GraphRngState

_tls = threading.local()


def _allocator(device):
    from cutegrad.allocator import get_allocator
    return get_allocator(device)


def graph_pool_handle(device=None):
    """A fresh memory-pool id; pass it as `pool=` to captures that should share memory.

    Graphs sharing a pool must be replayed in the order they were captured,
    since each may reuse memory the earlier ones freed.
    """
    return _allocator(current_device() if device is None else device).new_pool_id()


class _RngSlots:
    """16-byte (seed, base offset) buffers for captured graphs, carved from slabs
    allocated outside any capture and never freed (a slab is 64 KiB)."""

    SLOT, PER_SLAB, SPARE = 16, 4096, 8

    def __init__(self, device):
        self.device = device
        self.free = []
        self.slabs = []  # allocator Blocks, live for the process

    def ensure_spare(self, stream_handle):
        """Called before a capture begins, when taking memory from the allocator is still legal."""
        if len(self.free) < self.SPARE:
            slab = _allocator(self.device).malloc(self.SLOT * self.PER_SLAB, stream_handle)
            self.slabs.append(slab)
            self.free.extend(slab.ptr + self.SLOT * i for i in range(self.PER_SLAB - 1, -1, -1))

    def take(self):
        if not self.free:
            raise RuntimeError(f"a capture on cuda:{self.device} draws from more random generators than "
                               f"the {self.SPARE} reserved for it; use fewer generators in one graph")
        return self.free.pop()

    def give(self, ptr):
        self.free.append(ptr)


_rng_slots = {}
_rng_slots_lock = threading.Lock()


def _slots(device):
    slots = _rng_slots.get(device)
    if slots is None:
        with _rng_slots_lock:
            slots = _rng_slots.setdefault(device, _RngSlots(device))
    return slots


class _Capture:
    """The state of one capture underway, as capture_guard sees it."""

    __slots__ = ("graph", "device", "stream", "stream_handle", "pool_id", "rng", "rng_blocks",
                 "__weakref__")

    def __init__(self, graph, stream, pool_id):
        self.graph = graph
        self.device = stream.device
        self.stream = stream
        self.stream_handle = stream.handle
        self.pool_id = pool_id
        self.rng = {}  # Generator -> GraphRngState
        self.rng_blocks = []  # their buffers: _RngSlots addresses, kept by the graph

    def rng_state(self, generator):
        st = self.rng.get(generator)
        if st is None:
            ptr = _slots(self.device).take()
            self.rng_blocks.append(ptr)
            st = self.rng[generator] = GraphRngState(generator, ptr)
        return st

    def abort(self, reason):
        self.graph._abandon(self, reason)


class CUDAGraph:
    """A captured sequence of GPU work that can be replayed on any stream of its device."""

    def __init__(self):
        self._capture = None  # _Capture while capturing
        self._graph = None  # CUgraph
        self._exec = None  # CUgraphExec
        self._device = None
        self._pool_id = None  # pool held (use counted) by this graph
        self._rng = ()  # GraphRngState per generator used by the graph
        self._rng_blocks = ()
        self._last_stream = None
        self._discarded = None  # why the last capture was discarded, for error messages

    # ------------------------------------------------------------------ capture
    def capture_begin(self, pool=None):
        """Begin capturing the calling thread's current stream into this graph.

        `pool`: a handle from graph_pool_handle() or another graph's pool() to
        share its memory; None gives this graph a private pool of its own.
        """
        if self._capture is not None:
            raise RuntimeError("capture_begin: this CUDAGraph is already capturing")
        if self._exec is not None:
            raise RuntimeError("capture_begin: this CUDAGraph already holds a captured graph; "
                               "call reset() before capturing again")
        s = current_stream()
        if s.handle == 0:
            raise RuntimeError(
                "capture_begin: the current stream is the legacy default stream, which CUDA "
                "cannot capture; use `with cutegrad.graphs.graph(g):` (it captures on a side "
                "stream) or enter a `cutegrad.cuda.Stream()` first")
        if capture_guard.capture_of_stream(s.device, s.handle) is not None:
            raise RuntimeError(f"capture_begin: {s!r} is already being captured")
        alloc = _allocator(s.device)
        _slots(s.device).ensure_spare(s.handle)
        pool_id = alloc.new_pool_id() if pool is None else pool
        alloc.begin_allocate_to_pool(pool_id, s.handle)
        cap = _Capture(self, s, pool_id)
        try:
            mode = _drv.driver().CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
            _drv.call("cuStreamBeginCapture", s._cu, mode)
        except BaseException:
            alloc.end_allocate_to_pool(pool_id)
            alloc.release_pool(pool_id)
            raise
        capture_guard.register(cap)
        self._capture = cap
        self._device = s.device
        self._pool_id = pool_id
        self._discarded = None

    def capture_end(self):
        """End the capture and instantiate the graph; raises if CUDA invalidated it."""
        cap = self._capture
        if cap is None:
            raise RuntimeError("capture_end: this CUDAGraph is not capturing"
                               + (f" (the capture was discarded: {self._discarded})" if self._discarded else ""))
        d = _drv.driver()
        err, graph = d.cuStreamEndCapture(cap.stream._cu)
        alloc = _allocator(cap.device)
        alloc.end_allocate_to_pool(cap.pool_id)
        capture_guard.unregister(cap)
        self._capture = None
        if err != 0:
            self._release_capture_resources(cap)
            name = _drv._error_name(d, err)
            self._discarded = f"cuStreamEndCapture returned {name}"
            raise StreamCaptureError(
                f"cuStreamEndCapture failed: {name} ({_drv._error_string(d, err)}). CUDA "
                "invalidated the capture, most likely because of an operation it forbids during "
                "capture (see docs/graphs.md); the capture was discarded and its pool released.",
                call="cuStreamEndCapture", code=int(err), error_name=name)
        self._graph = graph
        try:
            self._exec = _drv.call("cuGraphInstantiate", graph, 0)
        except BaseException:
            _drv.call_status("cuGraphDestroy", graph)
            self._graph = None
            self._release_capture_resources(cap)
            raise
        self._rng = tuple(cap.rng.values())
        self._rng_blocks = tuple(cap.rng_blocks)

    def _abandon(self, cap, reason):
        """End and discard a capture that failed; never raises (it runs during error handling)."""
        if self._capture is not cap:
            return
        d = _drv.driver()
        try:
            err, graph = d.cuStreamEndCapture(cap.stream._cu)
            if err == 0 and int(graph) != 0:
                d.cuGraphDestroy(graph)
        except Exception:  # the capture is being thrown away; the first error is what matters
            pass
        try:
            _allocator(cap.device).end_allocate_to_pool(cap.pool_id)
        except ValueError:
            pass
        capture_guard.unregister(cap)
        self._capture = None
        self._release_capture_resources(cap)
        self._discarded = reason

    def _release_capture_resources(self, cap):
        for ptr in cap.rng_blocks:
            _slots(cap.device).give(ptr)
        _allocator(cap.device).release_pool(cap.pool_id)
        self._pool_id = None

    # ------------------------------------------------------------------ replay
    def replay(self, stream=None):
        """Launch the graph on `stream` (default: the current stream of its device)."""
        if self._exec is None:
            raise RuntimeError("replay: this CUDAGraph holds no captured graph"
                               + (f" (its capture was discarded: {self._discarded})" if self._discarded
                                  else "; capture one first"))
        s = current_stream(self._device) if stream is None else stream
        if s.device != self._device:
            raise ValueError(f"replay: the graph was captured on cuda:{self._device}, "
                             f"the stream is on cuda:{s.device}")
        if self._rng:
            if capture_guard.thread_captures():
                raise RuntimeError("replay: a graph that draws random numbers cannot be replayed "
                                   "inside another capture (its offsets would be frozen into it)")
            last = self._last_stream
            if last is not None and last != s:
                # The buffer writes below must not overtake a replay still reading it.
                s.wait_stream(last)
            for st in self._rng:
                st.prepare_replay(s)
            self._last_stream = s
        _drv.call("cuGraphLaunch", self._exec, s._cu)

    # ------------------------------------------------------------------ lifetime
    def reset(self):
        """Destroy the captured graph and release its memory pool."""
        if self._capture is not None:
            raise RuntimeError("reset: this CUDAGraph is capturing; end the capture first")
        if self._exec is not None:
            _drv.call("cuGraphExecDestroy", self._exec)
            self._exec = None
        if self._graph is not None:
            _drv.call("cuGraphDestroy", self._graph)
            self._graph = None
        if self._pool_id is not None:
            for ptr in self._rng_blocks:
                _slots(self._device).give(ptr)
            _allocator(self._device).release_pool(self._pool_id)
            self._pool_id = None
        self._rng = self._rng_blocks = ()
        self._last_stream = None

    def __del__(self):
        try:
            if self._capture is None:
                self.reset()
        except Exception:  # interpreter shutdown may have torn the bindings down
            pass

    def pool(self):
        """The id of this graph's memory pool, to share it with a later capture."""
        return self._pool_id

    @property
    def is_capturing(self):
        return self._capture is not None

    def __repr__(self):
        state = ("capturing" if self._capture is not None else "captured" if self._exec is not None
                 else "empty")
        return f"<cutegrad.graphs.CUDAGraph {state}>"


def _default_capture_stream(device):
    streams = getattr(_tls, "capture_streams", None)
    if streams is None:
        streams = _tls.capture_streams = {}
    s = streams.get(device)
    if s is None:
        s = streams[device] = Stream(device)
    return s


class graph:
    """Context manager: capture the block into `cuda_graph`.

    The block runs on `stream` (default: a side stream of this thread), which
    first waits for the work already queued on the current stream. On normal
    exit the capture ends and the graph is instantiated; on an exception the
    capture is discarded, its pool released and the exception re-raised.
    """

    def __init__(self, cuda_graph, pool=None, stream=None):
        self.cuda_graph = cuda_graph
        self.pool = pool
        self.capture_stream = stream
        self._entered = None

    def __enter__(self):
        dev = current_device() if self.capture_stream is None else self.capture_stream.device
        s = self.capture_stream if self.capture_stream is not None else _default_capture_stream(dev)
        s.wait_stream(current_stream(dev))
        s.__enter__()
        try:
            self.cuda_graph.capture_begin(pool=self.pool)
        except BaseException:
            s.__exit__(None, None, None)
            raise
        self._entered = s
        return self.cuda_graph

    def __exit__(self, exc_type, exc, tb):
        s, self._entered = self._entered, None
        try:
            if exc_type is None:
                self.cuda_graph.capture_end()
            elif self.cuda_graph._capture is not None:
                self.cuda_graph._abandon(self.cuda_graph._capture,
                                         f"{exc_type.__name__} raised inside the `with graph(...)` block")
        finally:
            s.__exit__(None, None, None)
        return False
