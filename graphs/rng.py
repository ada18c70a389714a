"""Philox random-number state that stays correct under CUDA graph capture.

Random kernels (dropout, rand) use counter-based Philox: the numbers are a pure
function of (seed, offset), where the offset counts 32-bit values already drawn
from the stream of the seed. Each op reserves a range of offsets from its
device's Generator with `philox_args(n)` and passes the returned `PhiloxArgs`
to its kernel, which computes

    seed   = seed_ptr   ? *seed_ptr   : args.seed
    offset = (offset_ptr ? *offset_ptr : 0) + args.offset

Eager: the pointers are 0; `args.offset` is the generator's host-side offset,
which then advances by n (rounded up to 4: one Philox4x32 call gives 4 values).

Under capture, the values baked into the graph must not be constants, or every
replay would draw the same mask. The capture owns a 16-byte device buffer per
generator it used, [seed: int64, base offset: int64]; captured ops get pointers
into it plus an increasing offset *within the graph*, and the capture records
the graph's total. Before each replay, `GraphRngState.prepare_replay` writes the
generator's current host seed and offset into the buffer (memset nodes on the
replay stream, ordered before the graph launch; only 32-bit words that changed
are written) and advances the host offset by the graph's total. A replay
therefore draws exactly what eager execution of the same ops would have drawn
at that point in the sequence, consecutive replays draw different numbers, and
eager calls and replays can be interleaved freely.

The host offset is the one source of truth; nothing on the device accumulates,
so `manual_seed` between replays takes effect at the next replay.
"""
import os
import threading
from typing import NamedTuple

from cutegrad.cuda import capture_guard

DEFAULT_SEED = 67280421310721  # PyTorch's default; any fixed value would do
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


class PhiloxArgs(NamedTuple):
    """What a random kernel needs; see the module docstring for how it combines them."""
    seed: int
    seed_ptr: int
    offset: int
    offset_ptr: int


def _round_increment(n):
    if n.__class__ is not int or n <= 0:
        raise ValueError(f"philox_args: the number of random values must be a positive int, got {n!r}")
    return (n + 3) & -4


class Generator:
    """Philox state (seed and host-side offset) of one CUDA device."""

    def __init__(self, device=0, seed=None):
        if device.__class__ is not int or device < 0:
            raise ValueError(f"Generator: device must be a CUDA device index (int >= 0), got {device!r}")
        self.device = device
        self._lock = threading.Lock()
        self._seed = _initial_seed if seed is None else _check_seed(seed)
        self._offset = 0

    def manual_seed(self, seed):
        """Restart the stream of random numbers at `seed` (offset 0)."""
        seed = _check_seed(seed)
        with self._lock:
            self._seed = seed
            self._offset = 0
        return self

    def seed(self):
        """Seed from the operating system's entropy; returns the new seed."""
        s = int.from_bytes(os.urandom(8), "little")
        self.manual_seed(s)
        return s

    def initial_seed(self):
        return self._seed

    def get_state(self):
        """(seed, offset): enough to replay the same numbers with set_state."""
        return self._seed, self._offset

    def set_state(self, state):
        seed, offset = state
        seed = _check_seed(seed)
        if offset.__class__ is not int or offset < 0 or offset % 4:
            raise ValueError(f"Generator.set_state: offset must be a non-negative multiple of 4, got {offset!r}")
        with self._lock:
            self._seed, self._offset = seed, offset

    def philox_args(self, n):
        """Reserve `n` random 32-bit values for one kernel launch on this device."""
        inc = _round_increment(n)
        capture = _capture_for(self.device)
        if capture is None:
            with self._lock:
                off = self._offset
                self._offset = off + inc
            return PhiloxArgs(self._seed, 0, off, 0)
        state = capture.rng_state(self)
        return state.reserve(inc)

    def __repr__(self):
        return f"<cutegrad.graphs.Generator cuda:{self.device} seed={self._seed} offset={self._offset}>"


class GraphRngState:
    """One generator's random-number bookkeeping inside one captured graph.

    `buffer_ptr` is a 16-byte, 8-aligned device buffer owned by the graph:
    bytes 0..7 hold the seed and 8..15 the base offset of the current replay.
    """

    __slots__ = ("generator", "buffer_ptr", "total", "_written")

    def __init__(self, generator, buffer_ptr):
        self.generator = generator
        self.buffer_ptr = buffer_ptr
        self.total = 0
        self._written = (None, None, None, None)

    def reserve(self, inc):
        off = self.total
        self.total = off + inc
        return PhiloxArgs(0, self.buffer_ptr, off, self.buffer_ptr + 8)

    def next_replay_words(self):
        """Advance the generator by this graph's draw and return the buffer writes.

        Returns [(byte offset, uint32 value)] for the 32-bit words whose value
        differs from what the previous replay wrote.
        """
        gen = self.generator
        with gen._lock:
            seed, base = gen._seed, gen._offset
            gen._offset = base + self.total
        new = (seed & _U32, seed >> 32, base & _U32, (base >> 32) & _U32)
        writes = [(4 * i, v) for i, (v, old) in enumerate(zip(new, self._written)) if v != old]
        self._written = new
        return writes

    def prepare_replay(self, stream):
        """Queue the writes of next_replay_words on `stream` (before the graph launch)."""
        from cutegrad.cuda import copies
        for byte, value in self.next_replay_words():
            copies.memset32(self.buffer_ptr + byte, value, 1, stream)


def _capture_for(device):
    """This thread's capture that a random op on `device` is being recorded into, or None.

    An op is captured when it runs on a capture's origin stream, or on a stream
    the driver reports as capturing (joined to a capture through an event wait).
    """
    if not capture_guard.any_capture_underway():
        return None
    caps = [c for c in capture_guard.thread_captures() if c.device == device]
    if not caps:
        return None
    handle, capturing = _current_stream_capture_status(device)
    for c in caps:
        if c.stream_handle == handle:
            return c
    if not capturing:
        return None
    if len(caps) == 1:
        return caps[0]
    raise RuntimeError(f"a random op on cuda:{device} runs on stream {handle:#x}, which is joined to "
                       "one of several captures of this thread; run it on a capture's own stream")


def _current_stream_capture_status(device):
    """(handle of the current stream on `device`, whether the driver says it is capturing)."""
    from cutegrad.cuda import current_stream, driver
    s = current_stream(device)
    return s.handle, int(driver.call("cuStreamIsCapturing", s._cu)) != 0


def _check_seed(seed):
    if seed.__class__ is not int or not 0 <= seed <= _U64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return seed


_initial_seed = DEFAULT_SEED
_default_generators = {}
_gen_lock = threading.Lock()


def default_generator(device=None):
    """The default Generator of a CUDA device (default: the current device)."""
    if device is None:
        from cutegrad.cuda import current_device
        device = current_device()
    elif not isinstance(device, int):
        from cutegrad.cuda.device import device_index
        device = device_index(device)
    g = _default_generators.get(device)
    if g is None:
        with _gen_lock:
            g = _default_generators.setdefault(device, Generator(device))
    return g


def manual_seed(seed):
    """Seed every CUDA device's default generator, including ones made later.

    Needs no GPU; `cutegrad.manual_seed` reaches it through the reseed hook
    registered below.
    """
    global _initial_seed
    seed = _check_seed(seed)
    with _gen_lock:
        _initial_seed = seed
        for g in _default_generators.values():
            g.manual_seed(seed)


def _reseed_hook(seed):
    manual_seed(int(seed) & _U64)


def _register_reseed_hook():
    try:
        from cutegrad import random as _random
    except ImportError:  # the core's random module is not there: nothing to hook into
        return
    add = getattr(_random, "add_reseed_hook", None)
    if add is not None:
        add(_reseed_hook)


_register_reseed_hook()
