"""CachingAllocator: the stream-ordered caching policy, independent of real memory.

Design (after PyTorch's CUDACachingAllocator; see docs/allocator.md):

- Requests are rounded to 512 B (optionally to power-of-two divisions). Requests
  of at most 1 MiB come from the small pool, packed into 2 MiB segments; larger
  ones from the large pool, in 20 MiB segments for 1-10 MiB requests and in
  segments rounded up to 2 MiB above that.
- A free block is found by best fit on (stream, size): blocks are only reused on
  the stream they were allocated on, where stream order makes reuse safe
  without any synchronization.
- A found block is split when the rest is worth keeping (>= 512 B in the small
  pool, > 1 MiB in the large pool and only below ``max_split_size``); a freed
  block coalesces with free neighbours at once.
- A block used on other streams (``record_stream``) is not reusable when freed:
  an event is recorded on each of those streams and the block returns to its
  pool when all of them completed.
- While a CUDA graph capture is underway allocations on the capturing stream
  come from the capture's private pool, no event is queried or recorded (frees
  of blocks with cross-stream uses are deferred until no capture is underway),
  and nothing goes back to the driver.
- A driver malloc that fails runs the OOM ladder: release cached oversize blocks
  big enough for the request, then synchronize outstanding events and release
  every unsplit cached block, then raise OutOfMemoryError.

Hot path: with no capture underway and no outstanding events, ``free`` files a
block under its exact size without coalescing it (state QUICK) and ``malloc``
first looks there: an alloc+free pair of a size in use is then a few dict and
list operations. That exact hit runs in C (fast_path.NativeFastPath, the base
class of CachingAllocator; _quick_take and _file_quick are the same hit in
Python) and calls this policy, through _malloc_slow and _free_slow, for
everything else. A request that misses takes best fit over the coalesced free
lists and the deferred blocks together (a deferred block that fits better is
coalesced alone and best fit runs again); only when nothing fits are the
deferred blocks of the smallest run of free neighbours spanning the request
coalesced (_coalesce_run_for) and best fit retried, before a new segment is
taken from the driver. So best fit sees every free block, the allocator never
grows while coalescing could have served the request, and releasing always
sees the fully coalesced state. (Coalescing on every miss was measured on an
H200: a training step misses often, the flush then emptied the fast lists, and
about 70% of allocations took the slow path; coalescing every deferred block
when nothing fits still sent a third of a minigpt step there on the dry-run
device, and one run sends none once the step repeats.)
"""

from __future__ import annotations

import operator
import time
from bisect import bisect_left, insort
from collections import deque

from .block import (ALLOCATED, DEAD, FREE, KEY_SHIFT, PENDING, QUICK, Block, BlockPool, FreeList,
                    PrivatePool, Segment)
from .config import UNLIMITED, AllocatorConfig, config_from_env
from .errors import CaptureError, OutOfMemoryError
from .fast_path import NativeFastPath, PythonFastPath

MIN_BLOCK_SIZE = 512
SMALL_SIZE = 1 << 20            # largest request served by the small pool
SMALL_BUFFER = 2 << 20          # small-pool segment size
LARGE_BUFFER = 20 << 20         # segment size for 1-10 MiB requests
MIN_LARGE_ALLOC = 10 << 20      # from here segments are the request rounded to 2 MiB
ROUND_LARGE = 2 << 20

LOCK_TIMEOUT_S = 30.0


def segment_size_for(size):
    """Bytes to request from the driver for a rounded request of ``size``."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


def _roundup_power2_division(size, divisions):
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor // divisions
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


class _Capture:
    __slots__ = ("pool", "stream", "capture_id")

    def __init__(self, pool, stream, capture_id):
        self.pool = pool
        self.stream = stream
        self.capture_id = capture_id


class CachingPolicy:
    """Everything of the caching allocator but its ``malloc``/``free`` entries,
    which come from the fast-path base class (fast_path.py) and call
    ``_malloc_slow``/``_free_slow`` here whenever they do not serve an exact hit.
    """

    def __init__(self, memory, config: AllocatorConfig | None = None, *, poison_freed_blocks=False,
                 poison_byte=0xDD):
        self.memory = memory
        self.device = getattr(memory, "device", 0)
        self.config = config if config is not None else config_from_env()
        self._max_split = self.config.max_split_size
        self._non_split_rounding = self.config.max_non_split_rounding
        self._gc_threshold = self.config.garbage_collection_threshold
        self._divisions = any(d > 1 for d in self.config.roundup_power2_divisions)
        self._poison = poison_freed_blocks
        self._poison_byte = poison_byte
        self._small = BlockPool(True)
        self._large = BlockPool(False)
        self._segments = {}            # ptr -> Segment
        self._pools = {}               # pool id -> PrivatePool (live or freeable)
        self._captures = []            # _Capture, one per capture underway
        self._events = {}              # stream -> deque[(event, block)]
        self._spare_events = []
        self._deferred = []            # blocks freed during capture with cross-stream uses
        self._capture_uses = {}        # block -> streams it was recorded on during capture
        self._limit = None             # reserved-bytes cap from the memory fraction
        self._token = [True]           # see "locking" below
        self._n_quick = 0              # blocks whose coalescing is deferred (state QUICK)
        self._pending_frees = []
        self._next_pool_id = 1
        self._update_slow()             # sets _slow: True whenever malloc cannot take the fast path
        self._reset_stats()

    # ------------------------------------------------------------------ stats state
    def _reset_stats(self):
        self._n_alloc = self._n_alloc_peak = self._n_alloc_total = 0
        self._bytes_alloc = self._bytes_alloc_peak = self._bytes_alloc_total = 0
        self._n_pending = self._bytes_pending = 0
        self._n_active_peak = self._bytes_active_peak = 0
        self._bytes_req = self._bytes_req_peak = self._bytes_req_total = 0
        self._n_seg = self._n_seg_peak = self._n_seg_total = 0
        self._bytes_reserved = self._bytes_reserved_peak = self._bytes_reserved_total = 0
        self._num_alloc_retries = self._num_ooms = self._num_sync_all_streams = 0
        self._num_device_alloc = self._num_device_free = 0
        self._num_pools_created = 0
        # Values of the current counters at the last accumulated-stats reset;
        # "freed" totals are derived from them instead of counted on every free.
        self._base = (0, 0, 0, 0, 0, (0, 0))

    def _update_slow(self):
        self._slow = bool(self._captures or self._events or self._deferred or self._divisions
                          or (self._limit is not None and self._gc_threshold > 0.0))
        # Frees may defer coalescing only when malloc can take them back on
        # its fast path, and when freed bytes need no poisoning.
        self._quick_free = not self._slow and not self._poison

    # ------------------------------------------------------------------ locking
    # Mutual exclusion is a token in a list: list.pop() and list.append() are
    # atomic in CPython (under the GIL, and under per-object locks in
    # free-threaded builds) and cost far less than a lock's acquire/release
    # pair. Frees never wait: a free that finds the token taken (by another
    # thread, or by this thread when a finalizer runs inside malloc) leaves its
    # block in _pending_frees, and whoever holds the token frees it before
    # returning. Every holder re-checks _pending_frees after releasing, so no
    # free is left behind.
    def _acquire_contended(self):
        token = self._token
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            time.sleep(0)           # let the holder run
            try:
                token.pop()
                return
            except IndexError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cutegrad allocator: busy for more than {LOCK_TIMEOUT_S} s; malloc was "
                        "probably called from a finalizer running inside another allocator call") from None

    def _drain_pending_frees(self):
        pending = self._pending_frees
        token = self._token
        while pending:
            try:
                token.pop()
            except IndexError:
                return              # the holder drains them
            try:
                while pending:
                    self._free(pending.pop())
            finally:
                token.append(True)

    def __enter__(self):
        try:
            self._token.pop()
        except IndexError:
            self._acquire_contended()

    def __exit__(self, *exc):
        self._token.append(True)
        if self._pending_frees:
            self._drain_pending_frees()

    # ------------------------------------------------------------------ malloc and free
    def _malloc_slow(self, nbytes, stream=0):
        """malloc, whenever the fast-path base did not serve an exact hit."""
        if nbytes.__class__ is not int or nbytes < 0:
            nbytes = self._checked_size(nbytes)
        try:
            self._token.pop()
        except IndexError:
            self._acquire_contended()
        try:
            if not self._slow:
                block = self._quick_take(nbytes, stream)
                if block is not None:
                    return block
            return self._malloc_general(nbytes, stream)
        finally:
            self._token.append(True)
            if self._pending_frees:
                self._drain_pending_frees()

    def _quick_take(self, nbytes, stream):
        """The exact-size hit (the fast path; NativeFastPath.malloc does the same in C):
        a block of the rounded size freed on ``stream`` and not yet coalesced, or None."""
        size = 512 if nbytes < 512 else (nbytes + 511) & -512
        pool = self._small if size <= SMALL_SIZE else self._large
        blocks = pool.quick.get(stream, {}).get(size)
        if not blocks:
            return None
        block = blocks.pop()
        self._n_quick -= 1
        block.state = ALLOCATED
        block.requested = nbytes
        # No block is pending on this path, so active == allocated and the active
        # peaks follow from the allocated ones (memory_stats takes the max).
        self._n_alloc += 1
        self._n_alloc_peak = max(self._n_alloc_peak, self._n_alloc)
        self._bytes_alloc += size
        self._bytes_alloc_peak = max(self._bytes_alloc_peak, self._bytes_alloc)
        self._bytes_req += nbytes
        self._bytes_req_peak = max(self._bytes_req_peak, self._bytes_req)
        self._n_alloc_total += 1
        self._bytes_alloc_total += size
        self._bytes_req_total += nbytes
        return block

    def _free_slow(self, block):
        """free, whenever the fast-path base did not file the block itself."""
        if block.__class__ is not Block or block.state != ALLOCATED:
            raise self._bad_free(block)
        token = self._token
        try:
            token.pop()
        except IndexError:
            # Busy: queue it; the holder (or this retry, if it just finished) frees it.
            self._pending_frees.append(block)
            self._drain_pending_frees()
            return
        try:
            self._free(block)
        finally:
            token.append(True)
            if self._pending_frees:
                self._drain_pending_frees()

    def record_stream(self, block, stream):
        """Mark ``block`` as used on ``stream``; its memory is then held until that use completes."""
        with self:
            if block.__class__ is not Block or block.state != ALLOCATED:
                raise ValueError(f"record_stream: {block!r} is not an allocated block")
            if stream == block.stream:
                return
            uses = block.stream_uses
            if uses is None:
                uses = block.stream_uses = set()
            if self._captures and self.memory.capture_id(stream) is not None:
                # A use by captured work: it runs at replay, not now, so it needs
                # no event unless the stream also used the block eagerly.
                if stream not in uses:
                    self._capture_uses.setdefault(block, set()).add(stream)
            elif self._capture_uses:
                during = self._capture_uses.get(block)
                if during is not None:
                    during.discard(stream)
            uses.add(stream)

    # ------------------------------------------------------------------ free path
    def _free(self, block):
        if block.state != ALLOCATED:
            raise self._bad_free(block)
        seg = block.segment
        if self._segments.get(seg.ptr) is not seg:
            raise ValueError(f"free: {block!r} does not belong to this allocator")
        size = block.size
        self._n_alloc -= 1
        self._bytes_alloc -= size
        if block.stream_uses is None:
            self._bytes_req -= block.requested
            if not self._quick_free:
                if self._poison:
                    self.memory.fill(block.ptr, size, self._poison_byte, block.stream)
                self._insert_free(block)
                return
            self._file_quick(block)
            return
        block.state = PENDING
        self._n_pending += 1
        self._bytes_pending += size
        if self._captures:
            # Events recorded during capture become graph nodes and must not be
            # queried; decide after the capture which uses still need events.
            self._deferred.append(block)
            self._update_slow()
        else:
            self._capture_uses.pop(block, None)
            self._insert_events(block)

    def _file_quick(self, block):
        """Defer coalescing: file a freed block under its exact size (NativeFastPath.free
        does the same in C, with the counting of _free).

        The next request of that size on that stream takes it back without a
        split and a merge; a request that misses coalesces only the deferred
        blocks it needs (_malloc_general).
        """
        block.state = QUICK
        sizes = block.pool.quick.get(block.stream)
        if sizes is None:
            sizes = block.pool.quick[block.stream] = {}
        blocks = sizes.get(block.size)
        if blocks is None:
            sizes[block.size] = [block]
        else:
            blocks.append(block)
        self._n_quick += 1

    def _flush_quick(self):
        """Coalesce every block whose coalescing was deferred by the fast free path."""
        pools = [self._small, self._large]
        for p in self._pools.values():
            pools += (p.small, p.large)
        for pool in pools:
            if pool.quick:
                quick, pool.quick = pool.quick, {}
                for sizes in quick.values():
                    for blocks in sizes.values():
                        for block in blocks:
                            self._insert_free(block)
        self._n_quick = 0

    def _coalesce_run_for(self, pool, stream, size):
        """Coalesce the deferred (QUICK) blocks of the smallest run of adjacent free and
        deferred blocks of `stream` in `pool` that spans `size` bytes; False if no run does.

        What a miss needs before taking a new segment: only blocks of this pool and
        stream can serve it, and a run is the largest block coalescing can make, so
        when no run spans the request a full _flush_quick could not serve it either.
        Every other deferred block stays on its fast list, so the next request of
        its size still hits. (Flushing every list on such a miss emptied them once
        per training step: about a third of a minigpt step's allocations then took
        the slow path, measured on the dry-run device.)
        """
        sizes = pool.quick.get(stream)
        if not sizes:
            return False
        best, best_total, seen = None, 0, set()
        for blocks in sizes.values():
            for block in blocks:
                head = block
                while head.prev is not None and (head.prev.state == FREE or head.prev.state == QUICK):
                    head = head.prev
                if head in seen:
                    continue
                seen.add(head)
                total, b = 0, head
                while b is not None and (b.state == FREE or b.state == QUICK):
                    total += b.size
                    b = b.next
                if total >= size and (best is None or total < best_total):
                    best, best_total = head, total
        if best is None:
            return False
        b = best
        while b is not None and (b.state == FREE or b.state == QUICK):
            nxt = b.next
            if b.state == QUICK:
                sizes[b.size].remove(b)
                self._n_quick -= 1
                self._insert_free(b)
            b = nxt
        return True

    def _free_block(self, block):
        """Free a pending block whose events completed (or that needs none any more)."""
        self._n_pending -= 1
        self._bytes_pending -= block.size
        block.stream_uses = None
        self._bytes_req -= block.requested
        if self._poison:
            self.memory.fill(block.ptr, block.size, self._poison_byte, block.stream)
        self._insert_free(block)

    def _insert_free(self, block):
        """Coalesce a block with its free neighbours and file the result in its pool's free list."""
        pool = block.pool
        fl = pool.free.get(block.stream)
        if fl is None:
            fl = pool.free[block.stream] = FreeList()
        keys = fl.keys
        blocks = fl.blocks
        nxt = block.next
        if nxt is not None and nxt.state == FREE:
            k = (nxt.size << KEY_SHIFT) | nxt.ptr
            del keys[bisect_left(keys, k)]
            del blocks[k]
            block.size += nxt.size
            nxt2 = nxt.next
            block.next = nxt2
            if nxt2 is not None:
                nxt2.prev = block
            nxt.state = DEAD
        prev = block.prev
        if prev is not None and prev.state == FREE:
            k = (prev.size << KEY_SHIFT) | prev.ptr
            del keys[bisect_left(keys, k)]
            del blocks[k]
            prev.size += block.size
            nxt2 = block.next
            prev.next = nxt2
            if nxt2 is not None:
                nxt2.prev = prev
            block.state = DEAD
            block = prev
        block.state = FREE
        block.gc_base = pool.get_free_calls
        k = (block.size << KEY_SHIFT) | block.ptr
        insort(keys, k)
        blocks[k] = block

    def _insert_events(self, block):
        memory = self.memory
        for stream in block.stream_uses:
            ev = self._spare_events.pop() if self._spare_events else memory.event_create()
            memory.event_record(ev, stream)
            block.event_count += 1
            q = self._events.get(stream)
            if q is None:
                q = self._events[stream] = deque()
            q.append((ev, block))
        block.stream_uses = None
        if block.event_count == 0:
            self._free_block(block)
        self._update_slow()

    def _process_deferred(self):
        deferred, self._deferred = self._deferred, []
        for block in deferred:
            # Uses recorded during capture belong to captured work, which runs
            # at replay inside memory the graph owns; only earlier uses need events.
            during = self._capture_uses.pop(block, None)
            if during:
                block.stream_uses -= during
            if not block.stream_uses:
                block.stream_uses = None
                self._free_block(block)
            else:
                self._insert_events(block)

    def _process_events(self):
        if self._deferred:
            self._process_deferred()
        memory = self.memory
        for stream in list(self._events):
            q = self._events[stream]
            while q:
                ev, block = q[0]
                if not memory.event_query(ev):
                    break
                q.popleft()
                self._spare_events.append(ev)
                block.event_count -= 1
                if block.event_count == 0:
                    self._free_block(block)
            if not q:
                del self._events[stream]
        self._update_slow()

    def _synchronize_and_free_events(self):
        self._num_sync_all_streams += 1
        if self._deferred:
            self._process_deferred()
        memory = self.memory
        for q in self._events.values():
            for ev, block in q:
                memory.event_synchronize(ev)
                self._spare_events.append(ev)
                block.event_count -= 1
                if block.event_count == 0:
                    self._free_block(block)
        self._events.clear()
        self._update_slow()

    # ------------------------------------------------------------------ malloc, general path
    def round_size(self, nbytes):
        """The size a request of ``nbytes`` is rounded to."""
        if nbytes < MIN_BLOCK_SIZE:
            return MIN_BLOCK_SIZE
        if self._divisions:
            d = self.config.divisions_for(nbytes)
            if d > 1 and nbytes > MIN_BLOCK_SIZE * d:
                return _roundup_power2_division(nbytes, d)
        return (nbytes + MIN_BLOCK_SIZE - 1) & -MIN_BLOCK_SIZE

    def _pool_for(self, size, stream):
        for cap in self._captures:
            if cap.stream != stream:
                cid = cap.capture_id
                if cid is None:
                    # begin_allocate_to_pool may run before the stream starts
                    # capturing; learn the capture's id once it exists.
                    cid = cap.capture_id = self.memory.capture_id(cap.stream)
                    if cid is None:
                        continue
                if self.memory.capture_id(stream) != cid:
                    continue
            return cap.pool.small if size <= SMALL_SIZE else cap.pool.large
        return self._small if size <= SMALL_SIZE else self._large

    def _get_free_block(self, pool, stream, size):
        if self._limit is not None and self._gc_threshold > 0.0:
            pool.get_free_calls += 1
        fl = pool.free.get(stream)
        if fl is None:
            return None
        keys = fl.keys
        i = bisect_left(keys, size << KEY_SHIFT)
        if i == len(keys):
            return None
        key = keys[i]
        block = fl.blocks[key]
        ms = self._max_split
        # An oversize block never serves a request below max_split_size, and
        # serves larger requests only when it is not much larger than them.
        if size < ms <= block.size:
            return None
        if size >= ms and block.size >= size + self._non_split_rounding:
            return None
        del keys[i]
        del fl.blocks[key]
        return block

    def _quick_better_fit(self, pool, stream, size, candidate):
        """The smallest deferred (QUICK) block of `stream` in `pool` that fits `size` and is
        smaller than best fit's `candidate`, taken off its fast list; None if there is none."""
        sizes = pool.quick.get(stream)
        if not sizes:
            return None
        limit = candidate.size if candidate is not None else None
        best = None
        for s, blocks in sizes.items():
            if blocks and s >= size and (limit is None or s < limit) and (best is None or s < best):
                best = s
        if best is None:
            return None
        self._n_quick -= 1
        return sizes[best].pop()

    def _malloc_general(self, nbytes, stream):
        if not self._captures and (self._events or self._deferred):
            self._process_events()
        size = self.round_size(nbytes)
        pool = self._pool_for(size, stream)
        block = self._get_free_block(pool, stream, size)
        if self._n_quick:
            quick = self._quick_better_fit(pool, stream, size, block)
            if quick is not None:
                # Coalesce just that block and let best fit choose again.
                if block is not None:
                    pool.free[stream].add(block)
                self._insert_free(quick)
                block = self._get_free_block(pool, stream, size)
            if block is None and self._coalesce_run_for(pool, stream, size):
                block = self._get_free_block(pool, stream, size)
        if block is None:
            block = self._alloc_new_segment(pool, stream, size, nbytes)
        return self._take(block, pool, stream, size, nbytes)

    def _take(self, block, pool, stream, size, nbytes):
        rest = block.size - size
        if (rest >= MIN_BLOCK_SIZE) if pool.is_small else (size < self._max_split and rest > SMALL_SIZE):
            nxt = block.next
            r = Block(block.ptr + size, rest, stream, pool, block.segment, block, nxt)
            if nxt is not None:
                nxt.prev = r
            block.next = r
            block.size = size
            pool.add(r)
        else:
            size = block.size
        block.state = ALLOCATED
        block.requested = nbytes
        self._n_alloc += 1
        self._n_alloc_total += 1
        self._n_alloc_peak = max(self._n_alloc_peak, self._n_alloc)
        self._bytes_alloc += size
        self._bytes_alloc_total += size
        self._bytes_alloc_peak = max(self._bytes_alloc_peak, self._bytes_alloc)
        self._n_active_peak = max(self._n_active_peak, self._n_alloc + self._n_pending)
        self._bytes_active_peak = max(self._bytes_active_peak, self._bytes_alloc + self._bytes_pending)
        self._bytes_req += nbytes
        self._bytes_req_total += nbytes
        self._bytes_req_peak = max(self._bytes_req_peak, self._bytes_req)
        return block

    def _alloc_new_segment(self, pool, stream, size, nbytes):
        alloc_size = segment_size_for(size)
        capturing = bool(self._captures)
        if self._limit is not None and self._gc_threshold > 0.0 and not capturing:
            self._garbage_collect()
        seg = self._driver_malloc(pool, stream, alloc_size, retry=False)
        if seg is None and not capturing:
            # Nothing goes back to the driver during capture: a freed address
            # may already be baked into the graph being captured.
            if self._release_available_cached_blocks(pool, stream, size):
                seg = self._driver_malloc(pool, stream, alloc_size, retry=False)
            if seg is None:
                self._release_cached_blocks()
                seg = self._driver_malloc(pool, stream, alloc_size, retry=True)
        if seg is None:
            self._num_ooms += 1
            raise self._oom_error(nbytes, alloc_size)
        return seg.head

    def _driver_malloc(self, pool, stream, alloc_size, retry):
        if retry:
            self._num_alloc_retries += 1
        if self._limit is not None and self._bytes_reserved + alloc_size > self._limit:
            return None
        ptr = self.memory.malloc(alloc_size, bool(self._captures))
        if ptr is None:
            return None
        seg = Segment(ptr, alloc_size, stream, pool)
        seg.head = Block(ptr, alloc_size, stream, pool, seg, None, None)
        self._segments[ptr] = seg
        if pool.private is not None:
            pool.private.segments += 1
        self._n_seg += 1
        self._n_seg_total += 1
        self._n_seg_peak = max(self._n_seg_peak, self._n_seg)
        self._bytes_reserved += alloc_size
        self._bytes_reserved_total += alloc_size
        self._bytes_reserved_peak = max(self._bytes_reserved_peak, self._bytes_reserved)
        self._num_device_alloc += 1
        return seg

    # ------------------------------------------------------------------ releasing memory
    def _release_segment(self, seg):
        if self._captures:
            raise CaptureError("internal error: a segment release was attempted during capture")
        head = seg.head
        pool = seg.pool
        pool.remove(head)
        fl = pool.free[head.stream]
        if not fl.keys:
            del pool.free[head.stream]
        head.state = DEAD
        self.memory.free(seg.ptr)
        del self._segments[seg.ptr]
        self._n_seg -= 1
        self._bytes_reserved -= seg.size
        self._num_device_free += 1
        private = pool.private
        if private is not None:
            private.segments -= 1
            if private.use_count == 0 and private.segments == 0:
                del self._pools[private.id]

    @staticmethod
    def _releasable(block):
        return block.prev is None and block.next is None

    def _release_pool_blocks(self, pool):
        for block in [b for b in pool.all_free() if self._releasable(b)]:
            self._release_segment(block.segment)

    def _release_cached_blocks(self):
        """Synchronize outstanding events, then give every unsplit cached segment back."""
        if self._n_quick:
            self._flush_quick()
        self._synchronize_and_free_events()
        self._release_pool_blocks(self._large)
        self._release_pool_blocks(self._small)
        for private in [p for p in self._pools.values() if p.use_count == 0]:
            self._release_pool_blocks(private.small)
            self._release_pool_blocks(private.large)

    def _release_available_cached_blocks(self, pool, stream, size):
        """Release oversize cached blocks on ``stream`` until ``size`` bytes are freed."""
        ms = self._max_split
        if ms == UNLIMITED:
            return False
        fl = pool.free.get(stream)
        if fl is None:
            return False
        target = max(size, ms)
        candidates = [b for b in fl.blocks.values() if b.size >= ms and self._releasable(b)]
        candidates.sort(key=lambda b: b.size)
        for b in candidates:
            if b.size >= target:
                self._release_segment(b.segment)
                return True
        released = 0
        for b in reversed(candidates):
            if released >= target:
                break
            released += b.size
            self._release_segment(b.segment)
        return released >= target

    def _garbage_collect(self):
        """Release cached unsplit large segments, oldest first, down to the threshold."""
        threshold = int(self._gc_threshold * self._limit)
        if self._bytes_reserved <= threshold:
            return
        target = self._bytes_reserved - threshold
        pool = self._large
        now = pool.get_free_calls
        candidates = [b for b in pool.all_free() if self._releasable(b)]
        candidates.sort(key=lambda b: now - b.gc_base, reverse=True)
        reclaimed = 0
        for b in candidates:
            if reclaimed >= target:
                break
            reclaimed += b.size
            self._release_segment(b.segment)

    def empty_cache(self):
        """Give every unused cached segment back to the driver."""
        with self:
            if self._captures:
                raise CaptureError(
                    "empty_cache() was called while a CUDA graph capture is underway; freeing "
                    "device memory during capture would invalidate the graph. Call it after "
                    "the capture ends.")
            self._release_cached_blocks()

    def set_per_process_memory_fraction(self, fraction):
        """Cap this allocator's reserved bytes at ``fraction`` of the device's memory."""
        if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"set_per_process_memory_fraction: fraction must lie in [0, 1], got {fraction!r}")
        with self:
            self._limit = int(fraction * self.memory.total_memory())
            self._update_slow()

    # ------------------------------------------------------------------ graph pools
    def new_pool_id(self):
        """A fresh id for a private pool (a graph pool handle)."""
        with self:
            pid = ("pool", self._next_pool_id)
            self._next_pool_id += 1
            return pid

    def begin_allocate_to_pool(self, pool_id, stream):
        """Route allocations on ``stream`` (and streams in its capture) to private pool ``pool_id``."""
        with self:
            for cap in self._captures:
                if cap.pool.id == pool_id:
                    raise ValueError(f"begin_allocate_to_pool: a capture is already allocating to pool {pool_id!r}")
                if cap.stream == stream:
                    raise ValueError(f"begin_allocate_to_pool: stream {stream} is already capturing to pool {cap.pool.id!r}")
            pool = self._pools.get(pool_id)
            if pool is None:
                pool = self._pools[pool_id] = PrivatePool(pool_id)
                self._num_pools_created += 1
            elif pool.use_count == 0:
                raise ValueError(f"begin_allocate_to_pool: pool {pool_id!r} was released by every graph "
                                 "that used it; share a pool only while a graph holding it is alive")
            else:
                pool.use_count += 1
            self._captures.append(_Capture(pool, stream, self.memory.capture_id(stream)))
            self._update_slow()

    def end_allocate_to_pool(self, pool_id):
        """Stop routing allocations to ``pool_id`` (the capture ended)."""
        with self:
            for i, cap in enumerate(self._captures):
                if cap.pool.id == pool_id:
                    del self._captures[i]
                    self._update_slow()
                    return
            raise ValueError(f"end_allocate_to_pool: no capture is allocating to pool {pool_id!r}")

    def release_pool(self, pool_id):
        """A graph using ``pool_id`` was destroyed; the pool dies with its last graph and block."""
        with self:
            pool = self._pools.get(pool_id)
            if pool is None or pool.use_count == 0:
                raise ValueError(f"release_pool: pool {pool_id!r} is not held by any graph")
            if any(cap.pool is pool for cap in self._captures):
                raise ValueError(f"release_pool: pool {pool_id!r} is being captured into")
            pool.use_count -= 1
            if pool.use_count == 0 and pool.segments == 0:
                del self._pools[pool_id]

    def captures_underway(self):
        return len(self._captures)

    # ------------------------------------------------------------------ errors
    @staticmethod
    def _bad_free(block):
        if block.__class__ is not Block:
            return TypeError(f"free: expected a Block, got {type(block).__name__}")
        return ValueError(f"free: {block!r} is not allocated (double free, or freed after "
                          "its segment was released)")

    @staticmethod
    def _checked_size(nbytes):
        """``nbytes`` as a non-negative int (integer types such as numpy's are accepted)."""
        if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__"):
            raise TypeError(f"malloc: nbytes must be an int, got {type(nbytes).__name__}")
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"malloc: nbytes must be >= 0, got {nbytes}")
        return nbytes

    def _oom_error(self, nbytes, alloc_size):
        try:
            device_free, device_total = self.memory.mem_get_info()
        except Exception:  # a driver that refuses the query (e.g. during capture) must not mask the OOM
            device_free, device_total = None, self.memory.total_memory()
        largest = 0
        in_private = 0
        for seg in self._segments.values():
            for b in seg.blocks():
                if b.state == FREE or b.state == QUICK:
                    largest = max(largest, b.size)
                    if seg.pool.private is not None:
                        in_private += b.size
        return OutOfMemoryError(device=self.device, requested=nbytes, rounded=alloc_size,
                                device_free=device_free, device_total=device_total,
                                reserved=self._bytes_reserved, allocated=self._bytes_alloc,
                                largest_free_block=largest, allowed=self._limit,
                                in_private_pools=in_private)

    # ------------------------------------------------------------------ observability
    def memory_stats(self):
        """Counters in PyTorch's ``torch.cuda.memory_stats`` layout (see docs/allocator.md)."""
        with self:
            if self._n_quick:
                self._flush_quick()
            base = self._base
            n_active = self._n_alloc + self._n_pending
            b_active = self._bytes_alloc + self._bytes_pending
            stats = {}

            def put(name, current, peak, total, base_current):
                stats[f"{name}.all.current"] = current
                stats[f"{name}.all.peak"] = peak
                stats[f"{name}.all.allocated"] = total
                stats[f"{name}.all.freed"] = total - (current - base_current)

            put("allocation", self._n_alloc, self._n_alloc_peak, self._n_alloc_total, base[0])
            put("allocated_bytes", self._bytes_alloc, self._bytes_alloc_peak, self._bytes_alloc_total, base[1])
            # The fast path only raises the allocated peaks; active == allocated there.
            put("active", n_active, max(self._n_active_peak, self._n_alloc_peak), self._n_alloc_total, base[2])
            put("active_bytes", b_active, max(self._bytes_active_peak, self._bytes_alloc_peak),
                self._bytes_alloc_total, base[3])
            put("requested_bytes", self._bytes_req, self._bytes_req_peak, self._bytes_req_total, base[4])
            put("segment", self._n_seg, self._n_seg_peak, self._n_seg_total, base[5][0])
            put("reserved_bytes", self._bytes_reserved, self._bytes_reserved_peak,
                self._bytes_reserved_total, base[5][1])
            pools = {"small_pool": [0, 0, 0, 0], "large_pool": [0, 0, 0, 0]}
            inactive_split = inactive_split_bytes = oversize_allocations = oversize_segments = 0
            ms = self._max_split
            for seg in self._segments.values():
                p = pools["small_pool" if seg.pool.is_small else "large_pool"]
                p[2] += 1
                p[3] += seg.size
                oversize_segments += seg.size >= ms
                split = seg.head.next is not None
                for b in seg.blocks():
                    if b.state == ALLOCATED:
                        p[0] += 1
                        p[1] += b.size
                        oversize_allocations += b.size >= ms
                    elif b.state == FREE and split:
                        inactive_split += 1
                        inactive_split_bytes += b.size
            for name, (n, nb, ns, rb) in pools.items():
                stats[f"allocation.{name}.current"] = n
                stats[f"allocated_bytes.{name}.current"] = nb
                stats[f"segment.{name}.current"] = ns
                stats[f"reserved_bytes.{name}.current"] = rb
            stats["inactive_split.all.current"] = inactive_split
            stats["inactive_split_bytes.all.current"] = inactive_split_bytes
            stats["num_alloc_retries"] = self._num_alloc_retries
            stats["num_ooms"] = self._num_ooms
            stats["num_sync_all_streams"] = self._num_sync_all_streams
            stats["num_device_alloc"] = self._num_device_alloc
            stats["num_device_free"] = self._num_device_free
            stats["max_split_size"] = -1 if self._max_split == UNLIMITED else self._max_split
            stats["oversize_allocations.current"] = oversize_allocations
            stats["oversize_segments.current"] = oversize_segments
            stats["graph_pools.current"] = sum(1 for p in self._pools.values() if p.use_count > 0)
            stats["graph_pools.freeable"] = sum(1 for p in self._pools.values() if p.use_count == 0)
            stats["graph_pools.created"] = self._num_pools_created
            stats["captures_underway"] = len(self._captures)
            stats["memory_fraction_limit"] = -1 if self._limit is None else self._limit
            return stats

    def reset_peak_memory_stats(self):
        with self:
            self._n_alloc_peak = self._n_alloc
            self._bytes_alloc_peak = self._bytes_alloc
            self._n_active_peak = self._n_alloc + self._n_pending
            self._bytes_active_peak = self._bytes_alloc + self._bytes_pending
            self._bytes_req_peak = self._bytes_req
            self._n_seg_peak = self._n_seg
            self._bytes_reserved_peak = self._bytes_reserved

    def reset_accumulated_memory_stats(self):
        with self:
            self._n_alloc_total = self._bytes_alloc_total = self._bytes_req_total = 0
            self._n_seg_total = self._bytes_reserved_total = 0
            self._num_alloc_retries = self._num_ooms = self._num_sync_all_streams = 0
            self._num_device_alloc = self._num_device_free = 0
            self._base = (self._n_alloc, self._bytes_alloc, self._n_alloc + self._n_pending,
                          self._bytes_alloc + self._bytes_pending, self._bytes_req,
                          (self._n_seg, self._bytes_reserved))

    def memory_snapshot(self):
        """Every segment with its blocks, sorted by address (PyTorch's snapshot layout)."""
        state_names = {ALLOCATED: "active_allocated", PENDING: "active_pending_free", FREE: "inactive"}
        with self:
            if self._n_quick:
                self._flush_quick()
            result = []
            for ptr in sorted(self._segments):
                seg = self._segments[ptr]
                blocks = [{"address": b.ptr, "size": b.size,
                           "requested_size": b.requested if b.state != FREE else 0,
                           "state": state_names[b.state]} for b in seg.blocks()]
                result.append({
                    "device": self.device,
                    "address": seg.ptr,
                    "total_size": seg.size,
                    "allocated_size": sum(b["size"] for b in blocks if b["state"] == "active_allocated"),
                    "active_size": sum(b["size"] for b in blocks if b["state"] != "inactive"),
                    "requested_size": sum(b["requested_size"] for b in blocks),
                    "stream": seg.stream,
                    "segment_type": "small" if seg.pool.is_small else "large",
                    "segment_pool_id": seg.pool.private.id if seg.pool.private is not None else None,
                    "blocks": blocks,
                })
            return result

    def check_invariants(self):
        """Raise AssertionError if any invariant of docs/allocator.md is broken."""
        from .invariants import check_invariants
        with self:
            check_invariants(self)


class CachingAllocator(CachingPolicy, NativeFastPath or PythonFastPath):
    """Caching allocator for one device over a memory backend.

    ``malloc(nbytes, stream) -> Block`` (``.ptr``, ``.size``, ``.stream``),
    ``free(block)``, ``record_stream(block, stream)``. A Block must not be used
    after it was freed: its object may be recycled for another allocation.
    ``malloc`` and ``free`` serve exact-size hits natively where ``cutegrad._C``
    is built (``NATIVE_FAST_PATH``); ``PythonCachingAllocator`` is the same
    allocator with the hit in Python.
    """


class PythonCachingAllocator(CachingPolicy, PythonFastPath):
    """CachingAllocator with its exact-size hit in Python (what runs without ``_C``)."""


NATIVE_FAST_PATH = NativeFastPath is not None
