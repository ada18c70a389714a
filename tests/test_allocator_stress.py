"""Seeded randomized stress test of the caching allocator on SimulatedMemory.

Two seeds x 50,000 operations over 4 streams: allocations of 1 B..64 MiB, frees,
record_stream with simulated kernels on other streams, simulated event
completion, graph captures into new and shared private pools (with joined
streams), pool releases, memory-fraction caps, injected driver OOMs and
empty_cache. After every operation it checks, independently of the
allocator's own bookkeeping where possible:

- the allocator's invariants (check_invariants: tiling, free lists, stats);
- no two live blocks the test holds overlap, and each is inside a live driver
  allocation (the test keeps its own interval map);
- the driver's live allocations are exactly the allocator's segments;
- nothing reached the driver during capture (no driver free, no unannounced
  malloc, no event recorded or queried: SimulatedMemory's violation log);
- no block was handed out while work on another stream that used its memory
  was still pending (SimulatedMemory.pending_work).
"""

import random
from bisect import bisect_left, insort

import pytest

from cutegrad.allocator import CachingAllocator, CaptureError, OutOfMemoryError, SimulatedMemory, parse_config

pytestmark = pytest.mark.usefixtures("allocator_fast_path")

MiB = 1 << 20
STREAMS = (0, 1, 2, 3)


class LiveMap:
    """The test's own record of live blocks: sorted, non-overlapping intervals."""

    def __init__(self):
        self.starts = []
        self.ends = {}

    def add(self, ptr, size):
        i = bisect_left(self.starts, ptr)
        if i < len(self.starts) and self.starts[i] < ptr + size:
            raise AssertionError(f"new block [{ptr:#x}, +{size}) overlaps live block at {self.starts[i]:#x}")
        if i > 0 and self.ends[self.starts[i - 1]] > ptr:
            raise AssertionError(f"new block at {ptr:#x} overlaps live block at {self.starts[i - 1]:#x}")
        insort(self.starts, ptr)
        self.ends[ptr] = ptr + size

    def remove(self, ptr):
        del self.starts[bisect_left(self.starts, ptr)]
        del self.ends[ptr]


def random_size(rng, hot):
    if rng.random() < 0.5:
        return rng.choice(hot)                         # sizes a model would repeat every step
    r = rng.random()
    if r < 0.55:
        return rng.randint(1, 1 << 20)                 # small pool
    if r < 0.9:
        return rng.randint((1 << 20) + 1, 10 << 20)    # 20 MiB segments
    return rng.randint(10 << 20, 64 << 20)             # rounded segments


def run_stress(seed, steps, conf):
    rng = random.Random(seed)
    mem = SimulatedMemory(capacity=3 << 30)
    alloc = CachingAllocator(mem, parse_config(conf))
    live = []                    # (block, stream, requested)
    livemap = LiveMap()
    capture = None               # (stream, pool_id, driver frees at start)
    graphs = []                  # pool ids held by captured "graphs"
    hot = [random_size(rng, [1]) for _ in range(24)]
    program = [(rng.choice(STREAMS[:2]), rng.choice(hot)) for _ in range(10)]
    program_pos = 0
    counts = dict.fromkeys(["malloc", "quick_hit", "oom", "free", "record", "complete", "capture", "end",
                            "release", "fraction", "inject", "empty"], 0)

    def check():
        alloc.check_invariants()
        assert mem.violations == [], mem.violations
        segs = {s["address"]: s["total_size"] for s in alloc.memory_snapshot()} if step % 97 == 0 else None
        if segs is not None:
            assert mem.live_allocations() == segs
        if capture is not None:
            assert mem.num_frees == capture[2], "a driver free happened during capture"

    for step in range(steps):
        op = rng.random()
        eager_phase = (step // 1000) % 3 == 0
        program_entry = None
        if eager_phase:
            # Training-like eager traffic: the same allocations every "step",
            # freed oldest first, a few stray sizes, streams completing. This
            # is where the deferred-coalescing fast path runs.
            if capture is not None:
                op = 0.93
            elif rng.random() < 0.05:
                op = 0.85
            elif rng.random() < 0.1:
                op *= 0.72
            elif len(live) >= len(program):
                op = 0.5
            else:
                op = 0.0
                program_entry = program[program_pos % len(program)]
                program_pos += 1
        if op < 0.40 or not live:
            if program_entry is not None:
                stream, nbytes = program_entry
            else:
                stream = rng.choice(STREAMS)
                nbytes = random_size(rng, hot)
            # Blocks freed on this stream with this exact size and not yet coalesced.
            pool = alloc._small if alloc.round_size(nbytes) <= MiB else alloc._large
            quick = list(pool.quick.get(stream, {}).get(alloc.round_size(nbytes), ()))
            try:
                block = alloc.malloc(nbytes, stream)
            except OutOfMemoryError as e:
                assert e.requested == nbytes and e.reserved_unallocated >= 0
                counts["oom"] += 1
            else:
                counts["malloc"] += 1
                counts["quick_hit"] += any(b is block for b in quick)
                assert block.size >= nbytes and block.stream == stream
                pending = mem.pending_work(block.ptr, block.size, exclude=stream)
                assert pending == [], f"block {block!r} reused while other streams may use it: {pending}"
                livemap.add(block.ptr, block.size)
                live.append((block, stream, nbytes))
                mem.touch(block.ptr, block.size, stream)
        elif op < 0.72:
            block, stream, _ = live.pop(0 if eager_phase else rng.randrange(len(live)))
            livemap.remove(block.ptr)
            if rng.random() < 0.3:
                mem.touch(block.ptr, block.size, stream)
            alloc.free(block)
            counts["free"] += 1
        elif op < 0.80:
            block, stream, _ = live[rng.randrange(len(live))]
            other = rng.choice(STREAMS)
            mem.touch(block.ptr, block.size, other)
            alloc.record_stream(block, other)
            counts["record"] += 1
        elif op < 0.90:
            s = rng.choice(STREAMS)
            upto = None if rng.random() < 0.5 else mem.submitted(s) - rng.randint(0, 5)
            mem.complete(s, upto)
            counts["complete"] += 1
        elif op < 0.935:
            if capture is None and not eager_phase:
                stream = rng.choice(STREAMS)
                if graphs and rng.random() < 0.3:
                    pool_id = rng.choice(graphs)        # share a live graph's pool
                else:
                    pool_id = alloc.new_pool_id()
                if rng.random() < 0.5:
                    alloc.begin_allocate_to_pool(pool_id, stream)
                    cid = mem.begin_capture(stream)
                else:
                    cid = mem.begin_capture(stream)
                    alloc.begin_allocate_to_pool(pool_id, stream)
                if rng.random() < 0.3:
                    mem.join_capture(rng.choice([s for s in STREAMS if s != stream]), cid)
                capture = (stream, pool_id, mem.num_frees)
                counts["capture"] += 1
            elif capture is not None:
                stream, pool_id, _ = capture
                mem.end_capture(stream)
                alloc.end_allocate_to_pool(pool_id)
                graphs.append(pool_id)
                capture = None
                counts["end"] += 1
        elif op < 0.95:
            if graphs and (capture is None or rng.choice(graphs) != capture[1]):
                pool_id = graphs.pop(rng.randrange(len(graphs)))
                if capture is not None and pool_id == capture[1]:
                    graphs.append(pool_id)
                else:
                    alloc.release_pool(pool_id)
                    counts["release"] += 1
        elif op < 0.965:
            alloc.set_per_process_memory_fraction(rng.choice([0.15, 0.3, 0.5, 1.0]))
            counts["fraction"] += 1
        elif op < 0.98:
            mem.inject_oom(rng.randint(1, 3))
            counts["inject"] += 1
        else:
            if capture is not None:
                with pytest.raises(CaptureError):
                    alloc.empty_cache()
            else:
                alloc.empty_cache()
            counts["empty"] += 1
        check()
        # Keep the working set bounded so the run measures policy, not an ever-growing heap.
        while len(live) > 48:
            block, _, _ = live.pop(0)
            livemap.remove(block.ptr)
            alloc.free(block)
            check()

    # Drain: end capture, free everything, release graphs, empty the cache.
    if capture is not None:
        mem.end_capture(capture[0])
        alloc.end_allocate_to_pool(capture[1])
        graphs.append(capture[1])
        capture = None
    for block, _, _ in live:
        alloc.free(block)
    for pool_id in graphs:
        alloc.release_pool(pool_id)
    for s in STREAMS:
        mem.complete(s)
    alloc.empty_cache()
    alloc.check_invariants()
    stats = alloc.memory_stats()
    assert stats["allocated_bytes.all.current"] == 0 and stats["active_bytes.all.current"] == 0
    assert stats["reserved_bytes.all.current"] == 0 and mem.live_allocations() == {}
    assert stats["graph_pools.current"] == 0 and stats["graph_pools.freeable"] == 0
    assert mem.violations == []
    return counts, stats


@pytest.mark.parametrize("seed, conf", [
    (1, ""),
    (2, "max_split_size_mb:32,max_non_split_rounding_mb:8,garbage_collection_threshold:0.6"),
])
def test_randomized_stress(seed, conf):
    counts, stats = run_stress(seed, 50_000, conf)
    # The run exercised every kind of operation, including the failure paths.
    for kind, n in counts.items():
        assert n > 0, f"the stress run never did '{kind}'"
    if "garbage_collection" not in conf:        # collection needs the general path
        assert counts["quick_hit"] > 1000
    assert stats["num_ooms"] > 0 and stats["num_alloc_retries"] > 0
    assert stats["graph_pools.created"] > 10
