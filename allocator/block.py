"""Blocks, segments and the pools that index free blocks.

A *segment* is one driver allocation. It is carved into *blocks* that form a
doubly linked list in address order. The first block of a segment is its
``head`` for the segment's whole life: splitting keeps the left part in the
existing object and creating a new object for the right part, and coalescing
always lets the left block absorb the right one. That keeps a walk over a
segment cheap (start at ``segment.head``) without a set of active blocks on the
hot path.

Free blocks live in a ``BlockPool``, one ``FreeList`` per stream. A FreeList
keeps blocks sorted by (size, address) as plain ints ``size << 64 | ptr`` in a
Python list searched with ``bisect``: a sorted list of ints is the cheapest
ordered container CPython offers, and pools hold few blocks per stream.
"""

from __future__ import annotations

from bisect import bisect_left, insort

# Block.state values. Ints, not an Enum: compared on the hot path.
FREE = 0         # in its pool's free list, may be handed out or merged
ALLOCATED = 1    # owned by a caller
PENDING = 2      # freed by the caller, waiting for events on other streams
DEAD = 3         # absorbed by a neighbour or released with its segment; any use is a bug
QUICK = 4        # freed, coalescing deferred: filed by exact size in its pool's quick lists

KEY_SHIFT = 64


class Block:
    __slots__ = ("ptr", "size", "requested", "stream", "pool", "segment",
                 "prev", "next", "state", "stream_uses", "event_count", "gc_base")

    def __init__(self, ptr, size, stream, pool, segment, prev, next):
        self.ptr = ptr
        self.size = size
        self.requested = 0
        self.stream = stream
        self.pool = pool
        self.segment = segment
        self.prev = prev
        self.next = next
        self.state = FREE
        # Streams other than `stream` that used this block (record_stream);
        # None while empty so the free path tests one attribute.
        self.stream_uses = None
        self.event_count = 0
        self.gc_base = 0

    @property
    def nbytes(self):
        """Bytes the caller asked for (a CUDA tensor's storage size; `size` is the rounded block)."""
        return self.requested

    def is_split(self):
        return self.prev is not None or self.next is not None

    def __repr__(self):
        state = ("free", "allocated", "pending", "dead", "free (uncoalesced)")[self.state]
        return f"Block(ptr={self.ptr:#x}, size={self.size}, stream={self.stream}, {state})"


class Segment:
    """One driver allocation and the pool it belongs to."""

    __slots__ = ("ptr", "size", "stream", "pool", "head")

    def __init__(self, ptr, size, stream, pool):
        self.ptr = ptr
        self.size = size
        self.stream = stream
        self.pool = pool
        self.head = None

    def blocks(self):
        b = self.head
        while b is not None:
            yield b
            b = b.next


class FreeList:
    """Free blocks of one (pool, stream), ordered by (size, ptr)."""

    __slots__ = ("keys", "blocks")

    def __init__(self):
        self.keys = []
        self.blocks = {}

    def add(self, block):
        key = (block.size << KEY_SHIFT) | block.ptr
        insort(self.keys, key)
        self.blocks[key] = block

    def remove(self, block):
        key = (block.size << KEY_SHIFT) | block.ptr
        keys = self.keys
        del keys[bisect_left(keys, key)]
        del self.blocks[key]

    def __len__(self):
        return len(self.keys)


class BlockPool:
    """Free blocks of one size class (small or large), default or graph-private."""

    __slots__ = ("is_small", "private", "free", "quick", "get_free_calls")

    def __init__(self, is_small, private=None):
        self.is_small = is_small
        self.private = private      # the owning PrivatePool, None for the default pools
        self.free = {}              # stream -> FreeList
        self.quick = {}             # stream -> {size: [QUICK blocks]}
        # Counts best-fit searches; a block's age for garbage collection is the
        # number of searches since it was cached (PyTorch's gc_count).
        self.get_free_calls = 0

    def add(self, block):
        block.gc_base = self.get_free_calls
        fl = self.free.get(block.stream)
        if fl is None:
            fl = self.free[block.stream] = FreeList()
        fl.add(block)

    def remove(self, block):
        self.free[block.stream].remove(block)

    def all_free(self):
        for fl in self.free.values():
            yield from fl.blocks.values()


class PrivatePool:
    """A CUDA graph's private memory pool (PyTorch's PrivatePool).

    ``use_count`` counts graphs (captures) that use the pool; ``segments`` counts
    driver allocations still owned by it. The pool is deleted once no graph uses
    it and all its segments went back to the driver.
    """

    __slots__ = ("id", "use_count", "segments", "small", "large")

    def __init__(self, pool_id):
        self.id = pool_id
        self.use_count = 1
        self.segments = 0
        self.small = BlockPool(True, self)
        self.large = BlockPool(False, self)
