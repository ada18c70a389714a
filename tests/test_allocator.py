"""Unit tests of the caching allocator's policy on SimulatedMemory (CPU only)."""

import subprocess
import sys
import threading

import numpy as np
import pytest

from cutegrad.allocator import (CachingAllocator, CaptureError, OutOfMemoryError, SimulatedMemory,
                                parse_config)
from cutegrad.allocator.block import ALLOCATED
from cutegrad.allocator.caching import segment_size_for

pytestmark = pytest.mark.usefixtures("allocator_fast_path")

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def make(conf="", **mem_kwargs):
    mem = SimulatedMemory(**mem_kwargs)
    return mem, CachingAllocator(mem, parse_config(conf))


def segments(alloc):
    return alloc.memory_snapshot()


def stat(alloc, key):
    return alloc.memory_stats()[key]


# ---------------------------------------------------------------- sizes and pools

@pytest.mark.parametrize("nbytes, rounded", [(0, 512), (1, 512), (511, 512), (512, 512), (513, 1024),
                                             (MiB - 1, MiB), (MiB + 1, MiB + 512)])
def test_round_size_512_granularity(nbytes, rounded):
    _, alloc = make()
    assert alloc.round_size(nbytes) == rounded
    block = alloc.malloc(nbytes)
    assert block.size == rounded
    alloc.check_invariants()


def test_roundup_power2_divisions():
    _, alloc = make("roundup_power2_divisions:4")
    assert alloc.round_size(1200) == 1536          # <= 512 * divisions: plain 512 B rounding
    assert alloc.round_size(5000) == 5120          # 4096 + 4096/4
    assert alloc.round_size(1024) == 1024          # powers of two stay
    assert alloc.round_size(3 * MiB + 1) == 3 * MiB + MiB // 2
    _, alloc = make("roundup_power2_divisions:[1:1,4:2,>:8]")
    assert alloc.round_size(3 * MiB + 1) == 3 * MiB + 512       # 2-4 MiB interval: divisions 1
    assert alloc.round_size(5 * MiB) == 6 * MiB                 # 4-8 MiB interval: divisions 2
    assert alloc.round_size(9 * MiB + 1) == 10 * MiB            # >=8 MiB: divisions 8


@pytest.mark.parametrize("request_size, segment", [(1, 2 * MiB), (MiB, 2 * MiB), (MiB + 1, 20 * MiB),
                                                   (10 * MiB - 512, 20 * MiB), (10 * MiB, 10 * MiB),
                                                   (11 * MiB + 1, 12 * MiB), (64 * MiB, 64 * MiB)])
def test_segment_sizes(request_size, segment):
    assert segment_size_for(((request_size + 511) // 512) * 512) == segment
    _, alloc = make()
    alloc.malloc(request_size)
    (seg,) = segments(alloc)
    assert seg["total_size"] == segment
    assert seg["segment_type"] == ("small" if request_size <= MiB else "large")


def test_small_requests_pack_into_one_segment():
    mem, alloc = make()
    blocks = [alloc.malloc(512) for _ in range(100)]
    assert mem.num_mallocs == 1
    ptrs = sorted(b.ptr for b in blocks)
    assert all(b - a == 512 for a, b in zip(ptrs, ptrs[1:]))
    alloc.check_invariants()


def test_small_and_large_pools_are_separate():
    _, alloc = make()
    alloc.malloc(MiB)          # small pool: 2 MiB segment, 1 MiB free remains
    alloc.malloc(MiB + 512)    # large: must not use the small segment's free MiB
    snap = segments(alloc)
    assert sorted(s["segment_type"] for s in snap) == ["large", "small"]


# ---------------------------------------------------------------- splitting and coalescing

def test_large_pool_splits_only_with_more_than_1mib_left():
    _, alloc = make()
    b = alloc.malloc(11 * MiB)                 # 12 MiB segment, 1 MiB left: not split
    assert b.size == 12 * MiB
    assert stat(alloc, "allocated_bytes.all.current") == 12 * MiB
    b2 = alloc.malloc(2 * MiB)                 # 20 MiB segment, 18 MiB left: split
    assert b2.size == 2 * MiB
    assert len(segments(alloc)[1]["blocks"]) == 2 or len(segments(alloc)[0]["blocks"]) == 2
    alloc.check_invariants()


def test_small_pool_splits_down_to_512():
    _, alloc = make()
    alloc.malloc(MiB)
    b = alloc.malloc(MiB - 512)
    assert b.size == MiB - 512
    (seg,) = segments(alloc)
    assert [blk["size"] for blk in seg["blocks"]] == [MiB, MiB - 512, 512]


def test_free_coalesces_neighbours():
    _, alloc = make()
    a, b, c = alloc.malloc(4 * KiB), alloc.malloc(8 * KiB), alloc.malloc(16 * KiB)
    alloc.free(b)
    assert len(segments(alloc)[0]["blocks"]) == 4
    alloc.free(a)             # a merges with the free b on its right
    blocks = segments(alloc)[0]["blocks"]
    assert blocks[0] == {"address": a.ptr, "size": 12 * KiB, "requested_size": 0, "state": "inactive"}
    alloc.free(c)             # c merges with both neighbours: one block spans the segment
    (seg,) = segments(alloc)
    assert [blk["size"] for blk in seg["blocks"]] == [2 * MiB]
    alloc.check_invariants()


def test_best_fit_picks_smallest_sufficient_block():
    _, alloc = make()
    keep = []
    holes = {}
    for size in (16 * KiB, 4 * KiB, 8 * KiB):
        holes[size] = alloc.malloc(size)
        keep.append(alloc.malloc(512))          # separators stop coalescing
    ptrs = {size: b.ptr for size, b in holes.items()}
    for b in holes.values():
        alloc.free(b)
    got = alloc.malloc(3 * KiB)
    assert got.ptr == ptrs[4 * KiB]
    got2 = alloc.malloc(5 * KiB)
    assert got2.ptr == ptrs[8 * KiB]
    alloc.check_invariants()


def test_free_blocks_are_keyed_by_stream():
    mem, alloc = make()
    b = alloc.malloc(4 * KiB, stream=1)
    ptr = b.ptr
    alloc.free(b)
    other = alloc.malloc(4 * KiB, stream=2)
    assert other.ptr != ptr
    assert mem.num_mallocs == 2                 # stream 2 needed its own segment
    same = alloc.malloc(4 * KiB, stream=1)
    assert same.ptr == ptr                      # reused at once on its own stream
    alloc.check_invariants()


# ---------------------------------------------------------------- oversize blocks

def test_oversize_blocks_are_not_split_and_not_used_for_small_requests():
    mem, alloc = make("max_split_size_mb:8")
    big = alloc.malloc(12 * MiB)
    assert big.size == 12 * MiB
    alloc.free(big)
    small = alloc.malloc(2 * MiB)               # < max_split: may not take the 12 MiB block
    assert small.ptr != big.ptr
    assert mem.num_mallocs == 2
    # A 20 MiB segment for a 2 MiB request is not split above max_split either? It is
    # split: the request is below max_split, only blocks >= max_split stay whole.
    assert small.size == 2 * MiB
    alloc.check_invariants()


def test_oversize_block_serves_requests_within_rounding_limit():
    mem, alloc = make("max_split_size_mb:8,max_non_split_rounding_mb:4")
    big = alloc.malloc(12 * MiB)
    alloc.free(big)
    b = alloc.malloc(9 * MiB)                   # 12 < 9 + 4: reused whole
    assert b.ptr == big.ptr and b.size == 12 * MiB
    alloc.free(b)
    c = alloc.malloc(8 * MiB)                   # 12 >= 8 + 4: too wasteful, new segment
    assert c.ptr != big.ptr
    assert mem.num_mallocs == 2
    assert stat(alloc, "oversize_allocations.current") == 1      # c (8 MiB); the 12 MiB block is cached
    assert stat(alloc, "oversize_segments.current") == 2         # the 12 MiB and 8 MiB segments
    alloc.check_invariants()


def test_oom_ladder_releases_oversize_blocks_first():
    mem, alloc = make("max_split_size_mb:8,max_non_split_rounding_mb:2", capacity=80 * MiB)
    keep = alloc.malloc(2 * MiB)               # a split 20 MiB segment that stays
    big = alloc.malloc(44 * MiB)
    alloc.free(big)
    b = alloc.malloc(40 * MiB)                 # 44 >= 40 + 2: not reused, but released for it
    assert b.size == 40 * MiB
    assert stat(alloc, "num_device_free") == 1
    assert stat(alloc, "num_alloc_retries") == 0   # the first, targeted step sufficed
    assert keep.size == 2 * MiB
    alloc.check_invariants()


# ---------------------------------------------------------------- streams and events

def test_record_stream_holds_block_until_event_completes():
    mem, alloc = make()
    b = alloc.malloc(4 * KiB, stream=1)
    ptr = b.ptr
    mem.touch(ptr, 4 * KiB, stream=2)
    alloc.record_stream(b, 2)
    alloc.free(b)
    assert stat(alloc, "allocated_bytes.all.current") == 0
    assert stat(alloc, "active_bytes.all.current") == 4 * KiB
    snap_state = [blk["state"] for blk in segments(alloc)[0]["blocks"]]
    assert snap_state[0] == "active_pending_free"
    again = alloc.malloc(4 * KiB, stream=1)
    assert again.ptr != ptr                     # stream 2 may still be using it
    assert mem.pending_work(again.ptr, again.size, exclude=1) == []
    mem.complete(2)
    alloc.free(again)
    third = alloc.malloc(4 * KiB, stream=1)
    assert third.ptr == ptr                     # event done: block back in the pool
    assert stat(alloc, "active_bytes.all.current") == 4 * KiB
    alloc.check_invariants()


def test_record_stream_waits_for_every_stream():
    mem, alloc = make()
    b = alloc.malloc(4 * KiB, stream=1)
    ptr = b.ptr
    for s in (2, 3):
        alloc.record_stream(b, s)
    alloc.free(b)
    mem.complete(2)
    x = alloc.malloc(4 * KiB, stream=1)
    assert x.ptr != ptr
    mem.complete(3)
    alloc.free(x)
    assert alloc.malloc(4 * KiB, stream=1).ptr == ptr
    alloc.check_invariants()


def test_record_stream_on_own_stream_needs_no_event():
    _, alloc = make()
    b = alloc.malloc(4 * KiB, stream=1)
    ptr = b.ptr
    alloc.record_stream(b, 1)
    alloc.free(b)
    assert alloc.malloc(4 * KiB, stream=1).ptr == ptr


def test_events_are_per_stream_in_order():
    mem, alloc = make()
    a = alloc.malloc(4 * KiB, stream=1)
    b = alloc.malloc(4 * KiB, stream=1)
    alloc.record_stream(a, 2)
    alloc.free(a)
    first_event_pos = mem.submitted(2)
    alloc.record_stream(b, 2)
    alloc.free(b)
    mem.complete(2, upto=first_event_pos)       # only a's event is done
    alloc.malloc(512, stream=0)                 # any malloc processes events
    snap = {blk["address"]: blk["state"] for blk in segments(alloc)[0]["blocks"]}
    assert snap[a.ptr] == "inactive"
    assert snap[b.ptr] == "active_pending_free"
    alloc.check_invariants()


# ---------------------------------------------------------------- bad input

def test_bad_input_raises_clear_errors():
    _, alloc = make()
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        alloc.malloc(-1)
    with pytest.raises(TypeError, match="must be an int"):
        alloc.malloc(1.5)
    with pytest.raises(TypeError, match="must be an int"):
        alloc.malloc(True)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        alloc.malloc(np.int64(-3))
    assert alloc.malloc(np.int64(1000)).size == 1024     # integer types other than int are fine
    with pytest.raises(TypeError, match="expected a Block"):
        alloc.free(object())
    b = alloc.malloc(10)
    alloc.free(b)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(b)
    with pytest.raises(ValueError, match="not an allocated block"):
        alloc.record_stream(b, 3)
    _, other = make()
    foreign = other.malloc(10)
    with pytest.raises(ValueError, match="does not belong to this allocator"):
        alloc.free(foreign)
    alloc.check_invariants()
    other.check_invariants()


# ---------------------------------------------------------------- graph capture

def start_capture(mem, alloc, stream, pool_id=None):
    pool_id = alloc.new_pool_id() if pool_id is None else pool_id
    mem.begin_capture(stream)
    alloc.begin_allocate_to_pool(pool_id, stream)
    return pool_id


def stop_capture(mem, alloc, stream, pool_id):
    mem.end_capture(stream)
    alloc.end_allocate_to_pool(pool_id)


def test_capture_allocates_from_private_pool():
    mem, alloc = make()
    pre = alloc.malloc(4 * KiB, stream=5)
    alloc.free(pre)                               # cached in the default pool on stream 5
    pool = start_capture(mem, alloc, 5)
    inside = alloc.malloc(4 * KiB, stream=5)
    assert inside.ptr != pre.ptr                  # the default pool's cache is not used
    outside = alloc.malloc(4 * KiB, stream=6)     # another stream: default pool
    stop_capture(mem, alloc, 5, pool)
    by_ptr = {s["address"]: s for s in segments(alloc)}
    pool_of = {ptr: s["segment_pool_id"] for ptr, s in by_ptr.items()}
    assert pool_of[inside.segment.ptr] == pool
    assert pool_of[outside.segment.ptr] is None
    assert mem.violations == []
    assert stat(alloc, "graph_pools.current") == 1
    alloc.check_invariants()


def test_joined_stream_allocates_from_capture_pool():
    mem, alloc = make()
    pool = alloc.new_pool_id()
    cid = mem.begin_capture(1)
    alloc.begin_allocate_to_pool(pool, 1)
    mem.join_capture(2, cid)
    b = alloc.malloc(4 * KiB, stream=2)
    assert b.segment.pool.private.id == pool
    mem.end_capture(1)
    alloc.end_allocate_to_pool(pool)
    assert mem.violations == []


def test_pool_registered_before_capture_begins_still_routes_joined_streams():
    mem, alloc = make()
    pool = alloc.new_pool_id()
    alloc.begin_allocate_to_pool(pool, 1)          # graphs/ calls this before cuStreamBeginCapture
    cid = mem.begin_capture(1)
    mem.join_capture(2, cid)
    assert alloc.malloc(4 * KiB, stream=2).segment.pool.private.id == pool
    assert alloc.malloc(4 * KiB, stream=3).segment.pool.private is None
    mem.end_capture(1)
    alloc.end_allocate_to_pool(pool)
    assert mem.violations == []


def test_blocks_freed_in_capture_are_reused_in_stream_order():
    mem, alloc = make()
    pool = start_capture(mem, alloc, 1)
    a = alloc.malloc(64 * KiB, stream=1)
    ptr = a.ptr
    alloc.free(a)
    b = alloc.malloc(64 * KiB, stream=1)
    assert b.ptr == ptr
    stop_capture(mem, alloc, 1, pool)
    assert mem.num_frees == 0 and mem.violations == []


def test_nothing_reaches_the_driver_during_capture():
    mem, alloc = make(capacity=64 * MiB)
    cached = alloc.malloc(40 * MiB, stream=0)
    alloc.free(cached)                             # 40 MiB cached in the default pool
    pool = start_capture(mem, alloc, 1)
    with pytest.raises(OutOfMemoryError):
        alloc.malloc(40 * MiB, stream=1)           # would need the cache released: not now
    with pytest.raises(CaptureError, match="capture is underway"):
        alloc.empty_cache()
    assert mem.num_frees == 0
    stop_capture(mem, alloc, 1, pool)
    assert mem.violations == []
    alloc.malloc(40 * MiB, stream=0)               # usable again after capture
    alloc.check_invariants()


def test_cross_stream_free_during_capture_is_deferred():
    mem, alloc = make()
    before = alloc.malloc(4 * KiB, stream=1)
    alloc.record_stream(before, 2)                 # a use from before the capture
    during = alloc.malloc(4 * KiB, stream=1)
    pool = alloc.new_pool_id()
    cid = mem.begin_capture(3)
    alloc.begin_allocate_to_pool(pool, 3)
    mem.join_capture(2, cid)
    alloc.record_stream(during, 2)                 # a captured use only: stream 2 joined the capture
    alloc.free(before)
    alloc.free(during)
    alloc.malloc(512, stream=3)
    assert mem.violations == []                    # no event recorded or queried in capture
    stop_capture(mem, alloc, 3, pool)              # ends stream 2's part of the capture too
    alloc.malloc(512, stream=0)                    # processes the deferred frees
    states = {blk["address"]: blk["state"] for s in segments(alloc) for blk in s["blocks"]}
    assert states[before.ptr] == "active_pending_free"   # waits for stream 2
    assert states[during.ptr] == "inactive"              # captured use needs no event
    mem.complete(2)
    alloc.malloc(512, stream=0)
    states = {blk["address"]: blk["state"] for s in segments(alloc) for blk in s["blocks"]}
    assert states[before.ptr] == "inactive"
    assert mem.violations == []
    alloc.check_invariants()


def test_eager_use_on_another_stream_during_capture_still_needs_an_event():
    mem, alloc = make()
    b = alloc.malloc(4 * KiB, stream=1)
    pool = start_capture(mem, alloc, 3)
    mem.touch(b.ptr, b.size, stream=2)             # stream 2 is not capturing: real work
    alloc.record_stream(b, 2)
    alloc.free(b)
    stop_capture(mem, alloc, 3, pool)
    again = alloc.malloc(4 * KiB, stream=1)
    assert again.ptr != b.ptr
    assert mem.pending_work(again.ptr, again.size, exclude=1) == []
    mem.complete(2)
    alloc.free(again)
    assert alloc.malloc(4 * KiB, stream=1).ptr == b.ptr
    assert mem.violations == []


@pytest.mark.parametrize("eager_first", [False, True])
def test_stream_used_both_in_capture_and_eagerly_still_needs_an_event(eager_first):
    mem, alloc = make()
    b = alloc.malloc(4 * KiB, stream=1)

    def captured_use():
        pool = alloc.new_pool_id()
        cid = mem.begin_capture(3)
        alloc.begin_allocate_to_pool(pool, 3)
        mem.join_capture(2, cid)
        alloc.record_stream(b, 2)                  # captured: no event needed for this one
        stop_capture(mem, alloc, 3, pool)

    def eager_use():
        mem.touch(b.ptr, b.size, stream=2)
        alloc.record_stream(b, 2)

    if eager_first:
        eager_use()
        captured_use()
    else:
        captured_use()
        eager_use()
    pool = start_capture(mem, alloc, 3)
    alloc.free(b)                                  # deferred: freed during another capture
    stop_capture(mem, alloc, 3, pool)
    again = alloc.malloc(4 * KiB, stream=1)
    assert again.ptr != b.ptr                      # stream 2's eager work may still be running
    assert mem.pending_work(again.ptr, again.size, exclude=1) == []
    assert mem.violations == []
    alloc.check_invariants()


def test_pool_lives_while_graph_or_block_lives():
    mem, alloc = make()
    pool = start_capture(mem, alloc, 1)
    out = alloc.malloc(4 * KiB, stream=1)
    tmp = alloc.malloc(4 * MiB, stream=1)
    alloc.free(tmp)
    stop_capture(mem, alloc, 1, pool)
    alloc.empty_cache()
    assert len(segments(alloc)) == 2               # the graph holds its pool
    alloc.release_pool(pool)
    assert stat(alloc, "graph_pools.freeable") == 1
    alloc.empty_cache()                            # the large segment goes, the small one holds `out`
    assert [s["segment_pool_id"] for s in segments(alloc)] == [pool]
    alloc.free(out)
    alloc.empty_cache()
    assert segments(alloc) == []
    assert stat(alloc, "graph_pools.freeable") == 0 and stat(alloc, "graph_pools.current") == 0
    with pytest.raises(ValueError, match="not held by any graph"):
        alloc.release_pool(pool)
    alloc.check_invariants()


def test_shared_pool_between_graphs():
    mem, alloc = make()
    pool = alloc.new_pool_id()
    start_capture(mem, alloc, 1, pool)
    a = alloc.malloc(4 * KiB, stream=1)
    ptr = a.ptr
    alloc.free(a)
    stop_capture(mem, alloc, 1, pool)
    start_capture(mem, alloc, 1, pool)             # second graph, same pool, replayed after the first
    b = alloc.malloc(4 * KiB, stream=1)
    assert b.ptr == ptr
    stop_capture(mem, alloc, 1, pool)
    alloc.release_pool(pool)
    alloc.empty_cache()
    assert len(segments(alloc)) == 1               # the second graph still holds the pool
    alloc.release_pool(pool)
    alloc.empty_cache()
    assert len(segments(alloc)) == 1               # and b still lives in it
    with pytest.raises(ValueError, match="was released"):
        alloc.begin_allocate_to_pool(pool, 1)
    alloc.free(b)
    alloc.empty_cache()
    assert segments(alloc) == []


def test_capture_api_errors():
    mem, alloc = make()
    with pytest.raises(ValueError, match="no capture is allocating"):
        alloc.end_allocate_to_pool("nope")
    pool = start_capture(mem, alloc, 1)
    with pytest.raises(ValueError, match="already allocating to pool"):
        alloc.begin_allocate_to_pool(pool, 2)
    with pytest.raises(ValueError, match="already capturing"):
        alloc.begin_allocate_to_pool(alloc.new_pool_id(), 1)
    with pytest.raises(ValueError, match="being captured into"):
        alloc.release_pool(pool)
    stop_capture(mem, alloc, 1, pool)


def test_unannounced_capture_is_detected_by_simulated_memory():
    """The simulated device flags a driver call the allocator makes during a capture it was not told of."""
    mem, alloc = make()
    mem.begin_capture(1)
    alloc.malloc(4 * KiB, stream=1)
    assert mem.violations and "during capture" in mem.violations[0]


# ---------------------------------------------------------------- stats and snapshot

def test_memory_stats_track_current_peak_and_totals():
    mem, alloc = make()
    a = alloc.malloc(1000)
    b = alloc.malloc(3 * MiB)
    s = alloc.memory_stats()
    assert s["allocation.all.current"] == 2
    assert s["allocated_bytes.all.current"] == 1024 + 3 * MiB
    assert s["requested_bytes.all.current"] == 1000 + 3 * MiB
    assert s["reserved_bytes.all.current"] == 2 * MiB + 20 * MiB
    assert s["segment.all.current"] == 2
    assert s["allocated_bytes.small_pool.current"] == 1024
    assert s["allocated_bytes.large_pool.current"] == 3 * MiB
    alloc.free(b)
    s = alloc.memory_stats()
    assert s["allocated_bytes.all.current"] == 1024
    assert s["allocated_bytes.all.peak"] == 1024 + 3 * MiB
    assert s["allocated_bytes.all.allocated"] == 1024 + 3 * MiB
    assert s["allocated_bytes.all.freed"] == 3 * MiB
    assert s["active_bytes.all.peak"] == 1024 + 3 * MiB
    alloc.reset_peak_memory_stats()
    assert stat(alloc, "allocated_bytes.all.peak") == 1024
    assert stat(alloc, "active_bytes.all.peak") == 1024
    alloc.reset_accumulated_memory_stats()
    alloc.free(a)
    s = alloc.memory_stats()
    assert s["allocation.all.allocated"] == 0 and s["allocation.all.freed"] == 1
    for key in ("num_alloc_retries", "num_ooms", "graph_pools.current", "inactive_split.all.current",
                "reserved_bytes.all.peak", "active.all.current"):
        assert key in s
    alloc.check_invariants()


def test_snapshot_reports_segments_and_blocks():
    _, alloc = make()
    a = alloc.malloc(1000, stream=7)
    snap = alloc.memory_snapshot()
    assert len(snap) == 1
    seg = snap[0]
    assert seg["stream"] == 7 and seg["segment_pool_id"] is None and seg["total_size"] == 2 * MiB
    assert seg["allocated_size"] == 1024 and seg["requested_size"] == 1000
    assert seg["blocks"][0] == {"address": a.ptr, "size": 1024, "requested_size": 1000,
                                "state": "active_allocated"}
    assert seg["blocks"][1]["state"] == "inactive"


def test_empty_cache_releases_only_unused_segments():
    mem, alloc = make()
    keep = alloc.malloc(4 * KiB)
    drop = alloc.malloc(30 * MiB)
    alloc.free(drop)
    alloc.empty_cache()
    assert [s["address"] for s in segments(alloc)] == [keep.segment.ptr]
    assert mem.live_allocations() == {keep.segment.ptr: 2 * MiB}
    alloc.check_invariants()


# ---------------------------------------------------------------- memory fraction, OOM, GC

def test_fraction_caps_reserved_memory_and_oom_recovers():
    mem, alloc = make(capacity=1 * GiB)
    alloc.set_per_process_memory_fraction(0.1)          # ~102 MiB
    a = alloc.malloc(60 * MiB)
    with pytest.raises(OutOfMemoryError) as info:
        alloc.malloc(60 * MiB)
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.requested == 60 * MiB and err.allowed == int(0.1 * GiB)
    assert err.reserved == 60 * MiB and err.reserved_unallocated == 0
    assert "out of memory" in str(err) and "allowed" in str(err)
    assert stat(alloc, "num_ooms") == 1
    alloc.free(a)
    b = alloc.malloc(60 * MiB)                         # recovered: the cached block is reused
    assert b.ptr == a.ptr
    alloc.free(b)
    retries = stat(alloc, "num_alloc_retries")
    c = alloc.malloc(62 * MiB)                         # needs the cache released and a retry
    assert c.size == 62 * MiB
    assert stat(alloc, "num_alloc_retries") == retries + 1
    with pytest.raises(ValueError, match="fraction must lie in"):
        alloc.set_per_process_memory_fraction(1.5)
    alloc.check_invariants()


def test_oom_error_reports_fragmentation():
    mem, alloc = make(capacity=48 * MiB)
    a = alloc.malloc(4 * MiB)
    b = alloc.malloc(4 * MiB)                          # same 20 MiB segment
    alloc.free(a)                                      # 4 MiB hole + 12 MiB tail, both cached
    with pytest.raises(OutOfMemoryError) as info:
        alloc.malloc(30 * MiB)
    err = info.value
    assert err.reserved == 20 * MiB
    assert err.reserved_unallocated == 16 * MiB
    assert err.largest_free_block == 12 * MiB
    assert err.device_free == 28 * MiB and err.device_total == 48 * MiB
    msg = str(err)
    for text in ("tried to allocate 30.00 MiB", "16.00 MiB is reserved but unallocated",
                 "largest free cached block is 12.00 MiB", "28.00 MiB is free"):
        assert text in msg
    assert b.size == 4 * MiB


def test_oom_report_survives_a_failing_memory_query():
    class NoInfo(SimulatedMemory):
        def mem_get_info(self):
            raise RuntimeError("cuMemGetInfo refused")

    alloc = CachingAllocator(NoInfo(capacity=8 * MiB), parse_config(""))
    with pytest.raises(OutOfMemoryError, match="an unknown amount is free") as info:
        alloc.malloc(16 * MiB)
    assert info.value.device_free is None and info.value.device_total == 8 * MiB


def test_injected_oom_is_retried_after_releasing_cache():
    mem, alloc = make()
    alloc.free(alloc.malloc(30 * MiB))
    mem.inject_oom(1)
    b = alloc.malloc(50 * MiB)                         # first try fails, cache released, retry works
    assert stat(alloc, "num_alloc_retries") == 1 and stat(alloc, "num_device_free") == 1
    mem.inject_oom(2)
    with pytest.raises(OutOfMemoryError):
        alloc.malloc(50 * MiB)
    assert stat(alloc, "num_ooms") == 1
    assert b.size == 50 * MiB
    alloc.check_invariants()


def test_garbage_collection_releases_oldest_cached_blocks_first():
    mem, alloc = make("garbage_collection_threshold:0.5", capacity=1000 * MiB)
    alloc.set_per_process_memory_fraction(0.2)          # 200 MiB cap, collect above 100 MiB
    old = alloc.malloc(40 * MiB)
    alloc.free(old)
    young = alloc.malloc(44 * MiB)
    alloc.free(young)
    for _ in range(5):                                  # age the blocks differently
        alloc.free(alloc.malloc(44 * MiB))              # reuses `young`, keeping it fresh
    assert sorted(s["total_size"] for s in segments(alloc)) == [40 * MiB, 44 * MiB]
    held = alloc.malloc(46 * MiB)                       # 84 MiB reserved is below 100: no collection
    assert sorted(s["total_size"] for s in segments(alloc)) == [40 * MiB, 44 * MiB, 46 * MiB]
    alloc.malloc(48 * MiB)                              # 130 MiB > 100: collect before the driver call
    live = sorted(s["total_size"] for s in segments(alloc))
    assert live == [44 * MiB, 46 * MiB, 48 * MiB]       # the oldest went first, and only it
    assert held.size == 46 * MiB
    alloc.check_invariants()


# ---------------------------------------------------------------- poisoning

def test_freed_blocks_are_poisoned():
    mem = SimulatedMemory(capacity=64 * MiB, backing=True)
    alloc = CachingAllocator(mem, parse_config(""), poison_freed_blocks=True)
    b = alloc.malloc(1024)
    assert mem.read(b.ptr, 4) == b"\xcd" * 4            # fresh driver memory
    mem.write(b.ptr, b"secret data")
    ptr = b.ptr
    alloc.free(b)
    assert mem.read(ptr, 11) == b"\xdd" * 11
    again = alloc.malloc(1024)
    assert again.ptr == ptr and mem.read(ptr, 11) == b"\xdd" * 11


# ---------------------------------------------------------------- configuration

def test_config_parsing():
    cfg = parse_config("max_split_size_mb:128, garbage_collection_threshold:0.8,"
                       "max_non_split_rounding_mb:64,expandable_segments:False,backend:native")
    assert cfg.max_split_size == 128 * MiB
    assert cfg.garbage_collection_threshold == 0.8
    assert cfg.max_non_split_rounding == 64 * MiB


@pytest.mark.parametrize("text, key", [
    ("max_split_size_mb:abc", "max_split_size_mb"),
    ("max_split_size_mb:1", "max_split_size_mb"),
    ("garbage_collection_threshold:1.5", "garbage_collection_threshold"),
    ("roundup_power2_divisions:3", "roundup_power2_divisions"),
    ("roundup_power2_divisions:[3:2]", "roundup_power2_divisions"),
    ("roundup_power2_divisions:[4:2,2:4]", "roundup_power2_divisions"),
    ("expandable_segments:True", "expandable_segments"),
    ("backend:cudaMallocAsync", "backend"),
    ("max_non_split_rounding_mb:-1", "max_non_split_rounding_mb"),
    ("no_such_key:1", "no_such_key"),
])
def test_config_errors_name_the_key(text, key):
    with pytest.raises(ValueError, match=key):
        parse_config(text)


def test_config_without_colon_is_rejected():
    with pytest.raises(ValueError, match="key:value"):
        parse_config("max_split_size_mb")


def test_config_read_from_environment(monkeypatch):
    monkeypatch.setenv("CUTEGRAD_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    alloc = CachingAllocator(SimulatedMemory())
    assert alloc.memory_stats()["max_split_size"] == 64 * MiB
    monkeypatch.setenv("CUTEGRAD_CUDA_ALLOC_CONF", "max_split_size_mb:x")
    with pytest.raises(ValueError, match="max_split_size_mb"):
        CachingAllocator(SimulatedMemory())


# ---------------------------------------------------------------- concurrency and reentrancy

class FinalizerMemory(SimulatedMemory):
    """Runs a callback inside the driver malloc, like a finalizer firing during malloc."""

    def __init__(self):
        super().__init__()
        self.on_malloc = None

    def malloc(self, nbytes, capture_underway=False):
        if self.on_malloc is not None:
            cb, self.on_malloc = self.on_malloc, None
            cb()
        return super().malloc(nbytes, capture_underway)


def test_free_from_a_finalizer_inside_malloc_is_deferred():
    mem = FinalizerMemory()
    alloc = CachingAllocator(mem, parse_config(""))
    victim = alloc.malloc(4 * KiB)
    mem.on_malloc = lambda: alloc.free(victim)
    big = alloc.malloc(30 * MiB)                     # the free runs while malloc holds the lock
    assert victim.state != ALLOCATED
    assert stat(alloc, "allocation.all.current") == 1
    assert big.size == 30 * MiB
    alloc.check_invariants()


def test_threads_share_the_allocator():
    _, alloc = make()
    errors = []

    def work(stream):
        try:
            held = []
            for i in range(2000):
                held.append(alloc.malloc(512 * (1 + (i * 7919) % 300), stream))
                if len(held) > 20:
                    alloc.free(held.pop(i % len(held)))
            for b in held:
                alloc.free(b)
        except Exception as e:  # surfaced below; a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert stat(alloc, "allocation.all.current") == 0
    alloc.check_invariants()


# ---------------------------------------------------------------- the checker itself

def test_invariant_checker_detects_corruption():
    _, alloc = make()
    a = alloc.malloc(4 * KiB)
    alloc.malloc(4 * KiB)
    alloc.check_invariants()
    a.size += 512                                   # blocks now overlap
    with pytest.raises(AssertionError, match="invariant"):
        alloc.check_invariants()
    a.size -= 512
    alloc._bytes_alloc += 1                         # stats out of balance
    with pytest.raises(AssertionError, match="allocated bytes"):
        alloc.check_invariants()


def test_import_does_not_load_cuda_bindings():
    code = ("import sys, cutegrad.allocator as a; a.CachingAllocator(a.SimulatedMemory()); "
            "assert 'cuda.bindings.driver' not in sys.modules, 'cuda-bindings was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_get_allocator_without_gpu_raises_clear_error():
    from cutegrad.allocator import get_allocator
    from cutegrad.allocator.cuda_memory import NoCudaDeviceError
    try:
        alloc = get_allocator(0)
    except NoCudaDeviceError as e:
        assert "no CUDA device" in str(e)
    else:
        assert get_allocator(0) is alloc           # a GPU is present: one allocator per device
