"""SimulatedMemory: a fake device for testing the allocator's policy on a CPU.

It implements the memory-backend interface (see ``cutegrad.allocator``'s
docstring) over a fake address space and adds what a test needs to catch the
bugs a caching allocator can have:

- Streams are ints. Every ``event_record`` and ``touch`` is a unit of work
  queued on its stream; work completes only when the test says so
  (``complete``), or when the host waits on it (``event_synchronize``), or when
  a driver free synchronizes the device, as ``cuMemFree`` does.
- ``touch(ptr, size, stream)`` stands for a kernel using memory on a stream;
  ``pending_work(ptr, size, exclude)`` lists such work not yet complete, which
  lets a test prove that memory was not handed out while another stream might
  still use it.
- ``begin_capture`` / ``join_capture`` / ``end_capture`` put streams into a
  simulated CUDA graph capture. While any capture is underway a driver free, an
  event query or synchronize, an event recorded on a capturing stream, or a
  driver malloc that the allocator did not announce as capture-aware is recorded
  in ``violations`` (real CUDA would invalidate the capture or fail).
- ``inject_oom(n)`` makes the next n driver mallocs fail; ``capacity`` bounds the
  bytes that can be allocated at once.
- With ``backing=True`` segments carry real bytes: ``write``/``read`` work on
  them, fresh segments are filled with ``FRESH_BYTE`` and ``fill`` (used by the
  allocator's ``poison_freed_blocks`` option) overwrites bytes.
"""

from __future__ import annotations

from bisect import bisect_right, insort

FRESH_BYTE = 0xCD
ALIGNMENT = 512


class SimulatedMemory:
    def __init__(self, capacity=80 << 30, *, device=0, backing=False, base=0x7F0000000000):
        self.device = device
        self.capacity = capacity
        self.backing = backing
        self.used = 0
        self.num_mallocs = 0
        self.num_frees = 0
        self.violations = []
        self._oom_pending = 0
        self._base = base
        # Address space: allocated ranges start -> size, free extents sorted by start.
        self._allocated = {}
        self._free_extents = [(base, 1 << 46)]
        self._data = {}
        # Work model: per stream, how many units were submitted and completed.
        self._submitted = {}
        self._completed = {}
        self._events = {}
        self._next_event = 1
        self._touches = []          # (stream, position, ptr, size) not known complete
        self._capture_of = {}       # stream -> capture id
        self._next_capture = 1

    # ----- memory ---------------------------------------------------------------
    def total_memory(self):
        return self.capacity

    def mem_get_info(self):
        return self.capacity - self.used, self.capacity

    def inject_oom(self, n=1):
        """Make the next ``n`` driver mallocs fail as if the device were full."""
        self._oom_pending += n

    def malloc(self, nbytes, capture_underway=False):
        if self._capture_of and not capture_underway:
            self.violations.append(f"driver malloc of {nbytes} B during capture without capture-safe mode")
        if self._oom_pending:
            self._oom_pending -= 1
            return None
        if nbytes <= 0 or self.used + nbytes > self.capacity:
            return None
        size = -(-nbytes // ALIGNMENT) * ALIGNMENT
        # First fit from low addresses, so freed address ranges are reused as a
        # real driver does: reuse is what makes overlap bugs visible.
        for i, (start, extent) in enumerate(self._free_extents):
            if extent >= size:
                if extent == size:
                    del self._free_extents[i]
                else:
                    self._free_extents[i] = (start + size, extent - size)
                break
        else:
            return None
        self._allocated[start] = nbytes
        self.used += nbytes
        self.num_mallocs += 1
        if self.backing:
            self._data[start] = bytearray([FRESH_BYTE]) * nbytes
        return start

    def free(self, ptr):
        if self._capture_of:
            self.violations.append(f"driver free of {ptr:#x} during capture")
        nbytes = self._allocated.pop(ptr, None)
        if nbytes is None:
            raise ValueError(f"SimulatedMemory.free: {ptr:#x} is not a live driver allocation")
        self.used -= nbytes
        self.num_frees += 1
        self._data.pop(ptr, None)
        size = -(-nbytes // ALIGNMENT) * ALIGNMENT
        self._release_extent(ptr, size)
        # cuMemFree synchronizes the device before it returns.
        self._complete_all()

    def _release_extent(self, start, size):
        extents = self._free_extents
        insort(extents, (start, size))
        i = bisect_right(extents, (start, size)) - 1
        if i + 1 < len(extents) and start + size == extents[i + 1][0]:
            size += extents[i + 1][1]
            extents[i] = (start, size)
            del extents[i + 1]
        if i > 0 and extents[i - 1][0] + extents[i - 1][1] == start:
            extents[i - 1] = (extents[i - 1][0], extents[i - 1][1] + size)
            del extents[i]

    def live_allocations(self):
        """Driver allocations currently live: {ptr: nbytes}."""
        return dict(self._allocated)

    def _locate(self, ptr, n):
        for start, nbytes in self._allocated.items():
            if start <= ptr and ptr + n <= start + nbytes:
                return start
        raise ValueError(f"SimulatedMemory: [{ptr:#x}, +{n}) is not inside one live allocation")

    def write(self, ptr, data):
        if not self.backing:
            raise RuntimeError("SimulatedMemory.write needs backing=True")
        start = self._locate(ptr, len(data))
        self._data[start][ptr - start:ptr - start + len(data)] = data

    def read(self, ptr, n):
        if not self.backing:
            raise RuntimeError("SimulatedMemory.read needs backing=True")
        start = self._locate(ptr, n)
        return bytes(self._data[start][ptr - start:ptr - start + n])

    def fill(self, ptr, nbytes, value, stream):
        """Stream-ordered memset; immediate here since data is not timed."""
        if self.backing:
            self.write(ptr, bytes([value]) * nbytes)

    # ----- streams, work and events ----------------------------------------------
    def _submit(self, stream):
        n = self._submitted.get(stream, 0) + 1
        self._submitted[stream] = n
        self._completed.setdefault(stream, 0)
        return n

    def touch(self, ptr, size, stream):
        """Queue a unit of work on ``stream`` that uses [ptr, ptr+size)."""
        if stream in self._capture_of:
            return  # captured work runs at replay, inside memory the graph owns
        self._touches.append((stream, self._submit(stream), ptr, size))

    def complete(self, stream, upto=None):
        """Complete queued work on ``stream``: all of it, or through position ``upto``."""
        done = self._submitted.get(stream, 0)
        if upto is not None:
            done = min(done, upto)
        if done > self._completed.get(stream, 0):
            self._completed[stream] = done
        self._prune()

    def submitted(self, stream):
        return self._submitted.get(stream, 0)

    def _complete_all(self):
        self._completed.update(self._submitted)
        self._touches.clear()

    def _prune(self):
        completed = self._completed
        self._touches = [t for t in self._touches if t[1] > completed[t[0]]]

    def pending_work(self, ptr, size, exclude=None):
        """Queued, incomplete work overlapping [ptr, ptr+size) on streams other than ``exclude``."""
        end = ptr + size
        completed = self._completed
        return [t for t in self._touches
                if t[0] != exclude and t[1] > completed[t[0]] and t[2] < end and ptr < t[2] + t[3]]

    def event_create(self):
        ev = self._next_event
        self._next_event += 1
        self._events[ev] = None
        return ev

    def event_record(self, event, stream):
        if stream in self._capture_of:
            self.violations.append(f"event recorded on capturing stream {stream}")
        self._events[event] = (stream, self._submit(stream))

    def event_query(self, event):
        if self._capture_of:
            self.violations.append("event query during capture")
        rec = self._events[event]
        return rec is None or self._completed[rec[0]] >= rec[1]

    def event_synchronize(self, event):
        if self._capture_of:
            self.violations.append("event synchronize during capture")
        rec = self._events[event]
        if rec is not None:
            self.complete(rec[0], rec[1])

    # ----- capture ---------------------------------------------------------------
    def begin_capture(self, stream):
        if stream in self._capture_of:
            raise RuntimeError(f"stream {stream} is already capturing")
        cid = self._next_capture
        self._next_capture += 1
        self._capture_of[stream] = cid
        return cid

    def join_capture(self, stream, capture_id):
        """A stream that waits on a capturing stream joins its capture (fork)."""
        self._capture_of[stream] = capture_id

    def end_capture(self, stream):
        cid = self._capture_of.get(stream)
        if cid is None:
            raise RuntimeError(f"stream {stream} is not capturing")
        for s in [s for s, c in self._capture_of.items() if c == cid]:
            del self._capture_of[s]

    def capture_id(self, stream):
        return self._capture_of.get(stream)
