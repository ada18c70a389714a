"""The allocator's structural invariants, checked by walking all of its state.

Called through ``CachingAllocator.check_invariants()``; tests run it after every
step of a randomized workload. The invariants (docs/allocator.md):

1. Segments do not overlap; blocks tile their segment exactly, in address
   order, with consistent prev/next links, so no two blocks overlap.
2. Every block belongs to its segment's pool and stream.
3. A free block sits in its pool's free list under its (size, ptr) key and
   nowhere else; no other block does; no two free blocks are adjacent. A
   block whose coalescing was deferred (QUICK) sits once in its pool's quick
   list for its stream and exact size, and the quick count matches.
4. A pending block waits for exactly the events queued for it, or for the end
   of capture.
5. Stats balance: allocated/active/requested/reserved counters equal sums over
   the blocks and segments; peaks are at least the current values.
6. Private pools count their segments correctly; a pool no graph uses and that
   owns no segment is gone.
"""

from __future__ import annotations

from .block import ALLOCATED, FREE, KEY_SHIFT, PENDING, QUICK


def _fail(msg):
    raise AssertionError(f"allocator invariant broken: {msg}")


def check_invariants(alloc):
    segments = sorted(alloc._segments.values(), key=lambda s: s.ptr)
    end = None
    n_alloc = bytes_alloc = n_pending = bytes_pending = bytes_req = reserved = 0
    free_seen = set()
    pool_segments = {}
    event_counts = {}
    for q in alloc._events.values():
        for _, block in q:
            event_counts[id(block)] = event_counts.get(id(block), 0) + 1
    deferred = {id(b) for b in alloc._deferred}
    quick_seen = {}

    for seg in segments:
        if alloc._segments.get(seg.ptr) is not seg:
            _fail(f"segment registry key mismatch at {seg.ptr:#x}")
        if end is not None and seg.ptr < end:
            _fail(f"segment at {seg.ptr:#x} overlaps the previous one ending at {end:#x}")
        end = seg.ptr + seg.size
        reserved += seg.size
        if seg.pool.private is not None:
            if alloc._pools.get(seg.pool.private.id) is not seg.pool.private:
                _fail(f"segment {seg.ptr:#x} belongs to a private pool that was deleted")
            pool_segments[id(seg.pool.private)] = pool_segments.get(id(seg.pool.private), 0) + 1
        head = seg.head
        if head is None or head.prev is not None or head.ptr != seg.ptr:
            _fail(f"segment {seg.ptr:#x} has a bad head block {head!r}")
        cursor = seg.ptr
        prev = None
        b = head
        while b is not None:
            if b.prev is not prev:
                _fail(f"{b!r}: prev link broken")
            if b.ptr != cursor:
                _fail(f"{b!r}: expected to start at {cursor:#x} (gap or overlap in segment {seg.ptr:#x})")
            if b.size <= 0 or b.size % 512:
                _fail(f"{b!r}: size is not a positive multiple of 512")
            if b.segment is not seg or b.pool is not seg.pool or b.stream != seg.stream:
                _fail(f"{b!r}: segment, pool or stream differs from its segment's")
            if b.state == FREE:
                if prev is not None and prev.state == FREE:
                    _fail(f"{b!r}: two adjacent free blocks were not coalesced")
                fl = seg.pool.free.get(b.stream)
                key = (b.size << KEY_SHIFT) | b.ptr
                if fl is None or fl.blocks.get(key) is not b:
                    _fail(f"{b!r}: free but not in its pool's free list")
                free_seen.add(id(b))
                if b.stream_uses or b.event_count:
                    _fail(f"{b!r}: free but still has stream uses or events")
            elif b.state == QUICK:
                lst = seg.pool.quick.get(b.stream, {}).get(b.size)
                if not lst or sum(1 for x in lst if x is b) != 1:
                    _fail(f"{b!r}: deferred-coalescing block not filed once in its quick list")
                quick_seen[id(b)] = b
                if b.stream_uses or b.event_count:
                    _fail(f"{b!r}: quick-free but still has stream uses or events")
            elif b.state == ALLOCATED:
                n_alloc += 1
                bytes_alloc += b.size
                bytes_req += b.requested
                if b.event_count:
                    _fail(f"{b!r}: allocated but counted in events")
                if b.requested > b.size:
                    _fail(f"{b!r}: requested {b.requested} exceeds size")
            elif b.state == PENDING:
                n_pending += 1
                bytes_pending += b.size
                bytes_req += b.requested
                if id(b) in deferred:
                    if not b.stream_uses:
                        _fail(f"{b!r}: deferred free without stream uses")
                elif b.event_count == 0 or event_counts.get(id(b), 0) != b.event_count:
                    _fail(f"{b!r}: pending with event_count {b.event_count} but "
                          f"{event_counts.get(id(b), 0)} queued events")
            else:
                _fail(f"{b!r}: dead block still linked into segment {seg.ptr:#x}")
            cursor += b.size
            prev = b
            b = b.next
        if cursor != seg.ptr + seg.size:
            _fail(f"segment {seg.ptr:#x}: blocks cover {cursor - seg.ptr} of {seg.size} bytes")

    pools = [alloc._small, alloc._large]
    for p in alloc._pools.values():
        pools += [p.small, p.large]
    for pool in pools:
        for stream, fl in pool.free.items():
            if fl.keys != sorted(fl.keys) or len(fl.keys) != len(fl.blocks):
                _fail(f"free list of stream {stream} is unsorted or out of sync")
            for key, b in fl.blocks.items():
                if id(b) not in free_seen:
                    _fail(f"{b!r}: in a free list but not a free block of a live segment")
                if b.pool is not pool or b.stream != stream or key != (b.size << KEY_SHIFT) | b.ptr:
                    _fail(f"{b!r}: filed under the wrong pool, stream or key")
    if sum(len(fl.blocks) for pool in pools for fl in pool.free.values()) != len(free_seen):
        _fail("free lists hold a different number of blocks than the segments")
    n_quick = 0
    for pool in pools:
        for stream, sizes in pool.quick.items():
            for size, lst in sizes.items():
                for b in lst:
                    n_quick += 1
                    if quick_seen.get(id(b)) is not b or b.pool is not pool or b.stream != stream or b.size != size:
                        _fail(f"{b!r}: in a quick list but not a matching deferred-coalescing block")
    if n_quick != len(quick_seen) or alloc._n_quick != n_quick:
        _fail(f"quick lists hold {n_quick} blocks, segments {len(quick_seen)}, counter {alloc._n_quick}")

    expected = {
        "allocations": (alloc._n_alloc, n_alloc),
        "allocated bytes": (alloc._bytes_alloc, bytes_alloc),
        "pending blocks": (alloc._n_pending, n_pending),
        "pending bytes": (alloc._bytes_pending, bytes_pending),
        "requested bytes": (alloc._bytes_req, bytes_req),
        "reserved bytes": (alloc._bytes_reserved, reserved),
        "segments": (alloc._n_seg, len(segments)),
    }
    for name, (counted, actual) in expected.items():
        if counted != actual:
            _fail(f"stat '{name}' is {counted} but the blocks say {actual}")
    peaks = [(alloc._n_alloc_peak, n_alloc), (alloc._bytes_alloc_peak, bytes_alloc),
             (max(alloc._n_active_peak, alloc._n_alloc_peak), n_alloc + n_pending),
             (max(alloc._bytes_active_peak, alloc._bytes_alloc_peak), bytes_alloc + bytes_pending),
             (alloc._bytes_req_peak, bytes_req), (alloc._n_seg_peak, len(segments)),
             (alloc._bytes_reserved_peak, reserved)]
    for peak, current in peaks:
        if peak < current:
            _fail(f"a peak ({peak}) is below its current value ({current})")

    for pid, p in alloc._pools.items():
        if p.id != pid:
            _fail(f"pool registered under {pid!r} has id {p.id!r}")
        if p.segments != pool_segments.get(id(p), 0):
            _fail(f"pool {pid!r} counts {p.segments} segments, owns {pool_segments.get(id(p), 0)}")
        if p.use_count == 0 and p.segments == 0:
            _fail(f"pool {pid!r} has no graph and no segment but still exists")
    for cap in alloc._captures:
        if alloc._pools.get(cap.pool.id) is not cap.pool or cap.pool.use_count <= 0:
            _fail(f"capture into pool {cap.pool.id!r} holds a dead pool")
    if alloc._slow is False and (alloc._captures or alloc._events or alloc._deferred):
        _fail("fast path enabled while captures, events or deferred frees exist")
