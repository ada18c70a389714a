"""The base class that gives CachingAllocator its hot ``malloc`` and ``free``.

Every CUDA op's output is one alloc+free pair, so these two calls are on the
per-op host path. ``NativeFastPath`` is ``cutegrad._C.AllocatorFastPath``
(kernels/cuda/allocator_bindings.cpp): it serves the exact-size hit of the
deferred-coalescing fast path in C and calls the Python policy
(``_malloc_slow``, ``_free_slow``) for everything else. It holds the state the
hit touches: the counters it moves, the two flags that open the fast path, and
references to the pools, the segment table and the lock token, all read and
written by the policy as plain attributes.

``PythonFastPath`` declares the same state as ``__slots__`` and sends every call
to the policy, whose ``_quick_take`` and ``_file_quick`` are the same hit in
Python: the reference the native type follows, and what runs where ``_C`` is
not built (NativeFastPath is then None). tests/test_allocator*.py run against
both.
"""

from .block import ALLOCATED, QUICK, Block, BlockPool, Segment

# The attributes the native type holds (its members); PythonFastPath's slots.
STATE = ("_small", "_large", "_segments", "_token", "_pending_frees",
         "_n_alloc", "_n_alloc_peak", "_n_alloc_total", "_bytes_alloc", "_bytes_alloc_peak",
         "_bytes_alloc_total", "_bytes_req", "_bytes_req_peak", "_bytes_req_total", "_n_quick",
         "_slow", "_quick_free")


class PythonFastPath:
    """The fast path's state in Python; malloc and free go straight to the policy."""

    __slots__ = STATE

    def malloc(self, nbytes, stream=0):
        """Allocate ``nbytes`` for use on ``stream``; returns a Block."""
        return self._malloc_slow(nbytes, stream)

    def free(self, block):
        """Return a block; it is reusable on its stream at once, elsewhere after its events."""
        self._free_slow(block)


def _native_fast_path():
    try:
        from cutegrad._C import AllocatorFastPath
    except ImportError:  # no built extension (or one built before it had the type)
        return None
    AllocatorFastPath.bind_layout(Block, Segment, BlockPool, ALLOCATED, QUICK)
    return AllocatorFastPath


NativeFastPath = _native_fast_path()
