"""The caching allocator on real GPU memory (CudaMemory); skipped without a GPU.

The randomized test checks on the device that memory freed and reused was not
touched by pending work: a stream is held back by a gate kernel spinning on a
host flag, memsets that would clobber blocks are queued behind it, the blocks
are record_stream-ed and freed, the other streams allocate and fill memory,
and only then the host opens the gate. Every live block must still hold its
fill byte afterwards. A control case shows the check catches reuse without
record_stream.

The gate is a kernel with a timeout rather than cuStreamWaitValue32 so the
tests also finish under compute-sanitizer, which serializes streams: there the
gate times out (the host cannot open it while it waits on another stream) and
work runs in submission order, which leaves the data checks valid but makes
the control case (which needs real overlap) inapplicable. Set
CUTEGRAD_UNDER_SANITIZER=1 for such runs: fewer rounds, a short timeout, and a
timed-out gate is accepted. Without it a timed-out gate fails the test, so the
overlap the checks rely on is proven in every normal run.
"""

import ctypes
import os
import random

import pytest

from cutegrad.allocator import CachingAllocator, OutOfMemoryError, parse_config

pytestmark = pytest.mark.gpu

MiB = 1 << 20
UNDER_SANITIZER = os.environ.get("CUTEGRAD_UNDER_SANITIZER") == "1"
GATE_TIMEOUT_NS = 300_000_000 if UNDER_SANITIZER else 20_000_000_000

# gate_wait(flag, value, timeout_ns, timed_out): spin until *flag >= value (a
# volatile load of host-mapped memory sees the host's store) or the timeout,
# which it records in *timed_out. Hand-written PTX, JIT-compiled by the driver,
# so the test needs no compiler.
GATE_PTX = b"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry gate_wait(.param .u64 flag_ptr, .param .u32 value, .param .u64 timeout_ns,
                          .param .u64 timed_out_ptr)
{
    .reg .u64 %flag, %timeout, %out, %t0, %t1, %dt;
    .reg .u32 %want, %got, %one;
    .reg .pred %ready, %waiting;
    ld.param.u64 %flag, [flag_ptr];
    ld.param.u32 %want, [value];
    ld.param.u64 %timeout, [timeout_ns];
    ld.param.u64 %out, [timed_out_ptr];
    mov.u64 %t0, %globaltimer;
SPIN:
    ld.volatile.u32 %got, [%flag];
    setp.ge.u32 %ready, %got, %want;
    @%ready bra DONE;
    mov.u64 %t1, %globaltimer;
    sub.u64 %dt, %t1, %t0;
    setp.lt.u64 %waiting, %dt, %timeout;
    @%waiting bra SPIN;
    mov.u32 %one, 1;
    st.volatile.u32 [%out], %one;
DONE:
    ret;
}
\0"""


def _cuda_memory():
    try:
        from cutegrad.allocator.cuda_memory import CudaMemory, NoCudaDeviceError
    except ImportError as e:
        pytest.skip(f"cuda-bindings unavailable: {e}")
    try:
        return CudaMemory(0)
    except NoCudaDeviceError as e:
        pytest.skip(str(e))


@pytest.fixture
def gpu():
    mem = _cuda_memory()
    from cuda.bindings import driver as cu
    cu.cuCtxPushCurrent(mem._ctx)
    streams = []
    yield mem, cu, streams
    for s in streams:
        cu.cuStreamSynchronize(s)
        cu.cuStreamDestroy(s)
    cu.cuCtxPopCurrent()


def ok(result):
    err = result[0]
    assert int(err) == 0, f"CUDA call failed: {err!r}"
    return result[1] if len(result) == 2 else result[1:]


def new_stream(cu, streams):
    # Non-blocking: the held-back stream must not stall synchronous copies on the NULL stream.
    s = ok(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING.value))
    streams.append(s)
    return s


def handle(s):
    return int(s)


def read_bytes(cu, ptr, n):
    buf = (ctypes.c_ubyte * n)()
    ok(cu.cuMemcpyDtoH(ctypes.addressof(buf), ptr, n))
    return bytes(buf)


class HostGate:
    """A host flag a stream can be made to wait on (a gate_wait kernel with a timeout)."""

    def __init__(self, cu):
        self.cu = cu
        self.host = ok(cu.cuMemHostAlloc(4, cu.CU_MEMHOSTALLOC_DEVICEMAP))
        self.value = ctypes.c_uint32.from_address(int(self.host))
        self.value.value = 0
        self.dev = ok(cu.cuMemHostGetDevicePointer(self.host, 0))
        self.module = ok(cu.cuModuleLoadData(GATE_PTX))
        self.kernel = ok(cu.cuModuleGetFunction(self.module, b"gate_wait"))
        self.timed_out = ok(cu.cuMemAlloc(4))
        ok(cu.cuMemsetD8(self.timed_out, 0, 4))

    def hold(self, stream, round_no):
        args = ((int(self.dev), round_no, GATE_TIMEOUT_NS, int(self.timed_out)),
                (ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint64))
        ok(self.cu.cuLaunchKernel(self.kernel, 1, 1, 1, 1, 1, 1, 0, stream, args, 0))

    def open(self, round_no):
        self.value.value = round_no

    def expired(self):
        """Whether any hold timed out (read after the held stream synchronized)."""
        got = read_bytes(self.cu, self.timed_out, 4)
        return got != b"\x00" * 4

    def check(self):
        """Outside a sanitizer every hold must have been opened by the host, not by its timeout."""
        if not UNDER_SANITIZER:
            assert not self.expired(), "a gate timed out: the held stream was not held while the host queued work"

    def close(self):
        self.cu.cuMemFreeHost(self.host)
        self.cu.cuMemFree(self.timed_out)
        self.cu.cuModuleUnload(self.module)


def test_delayed_work_on_other_stream_protects_freed_memory(gpu):
    mem, cu, streams = gpu
    alloc = CachingAllocator(mem, parse_config(""))
    a, held = new_stream(cu, streams), new_stream(cu, streams)
    gate = HostGate(cu)
    try:
        # Control: without record_stream the block is reused at once and the
        # delayed memset clobbers the new owner's data. This proves the check can fail.
        gate.hold(held, 1)
        victim = alloc.malloc(64 * 1024, handle(a))
        ok(cu.cuMemsetD8Async(victim.ptr, 0, victim.size, held))
        alloc.free(victim)
        reuse = alloc.malloc(64 * 1024, handle(a))
        assert reuse.ptr == victim.ptr
        ok(cu.cuMemsetD8Async(reuse.ptr, 0x5A, reuse.size, a))
        ok(cu.cuStreamSynchronize(a))
        gate.open(1)
        ok(cu.cuStreamSynchronize(held))
        if not gate.expired():
            assert read_bytes(cu, reuse.ptr, 16) == b"\x00" * 16
        gate.check()
        alloc.free(reuse)

        # With record_stream the block waits for the held stream.
        gate.hold(held, 2)
        victim = alloc.malloc(64 * 1024, handle(a))
        ok(cu.cuMemsetD8Async(victim.ptr, 0, victim.size, held))
        alloc.record_stream(victim, handle(held))
        alloc.free(victim)
        fresh = alloc.malloc(64 * 1024, handle(a))
        assert fresh.ptr != victim.ptr
        ok(cu.cuMemsetD8Async(fresh.ptr, 0x5A, fresh.size, a))
        ok(cu.cuStreamSynchronize(a))
        gate.open(2)
        ok(cu.cuStreamSynchronize(held))
        assert read_bytes(cu, fresh.ptr, 16) == b"\x5a" * 16
        gate.check()
        alloc.free(fresh)
        alloc.check_invariants()
        alloc.empty_cache()
    finally:
        gate.open(1 << 30)
        ok(cu.cuCtxSynchronize())
        gate.close()


def random_nbytes(rng):
    r = rng.random()
    return (rng.randint(1, 1 << 20) if r < 0.6 else
            rng.randint(1 << 20, 10 << 20) if r < 0.9 else rng.randint(10 << 20, 64 << 20))


def captured_phase(alloc, cu, s, other, rng, live):
    """Capture random allocations, fills and frees on ``s`` into a private pool, replay it.

    Also frees, during the capture, an eager block that another stream is still
    using, which must be deferred (no event may be recorded during capture).
    Returns the blocks allocated in the capture that stay live, with their fills.
    """
    pool = alloc.new_pool_id()
    alloc.begin_allocate_to_pool(pool, handle(s))
    ok(cu.cuStreamBeginCapture(s, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
    inside = {}
    for _ in range(40):
        if rng.random() < 0.6 or not inside:
            block = alloc.malloc(random_nbytes(rng), handle(s))
            assert block.segment.pool.private is not None
            fill = rng.randint(1, 255)
            ok(cu.cuMemsetD8Async(block.ptr, fill, block.size, s))
            inside[block] = fill
        else:
            block = rng.choice(list(inside))
            inside.pop(block)
            alloc.free(block)
    eager = [b for b, (bs, _) in live.items() if bs is not s]
    if eager:
        block = rng.choice(eager)
        live.pop(block)
        ok(cu.cuMemsetD8Async(block.ptr, 0, block.size, other))   # eager work, not captured
        alloc.record_stream(block, handle(other))
        alloc.free(block)
    graph = ok(cu.cuStreamEndCapture(s))
    alloc.end_allocate_to_pool(pool)
    exe = ok(cu.cuGraphInstantiate(graph, 0))
    for _ in range(2):
        ok(cu.cuGraphLaunch(exe, s))
    ok(cu.cuStreamSynchronize(s))
    ok(cu.cuGraphExecDestroy(exe))
    ok(cu.cuGraphDestroy(graph))
    alloc.release_pool(pool)             # the graph is gone; its live blocks keep the pool
    return {b: (s, fill) for b, fill in inside.items()}


def test_randomized_stress_on_device(gpu):
    mem, cu, streams = gpu
    rng = random.Random(7)
    alloc = CachingAllocator(mem, parse_config("max_split_size_mb:64"))
    work = [new_stream(cu, streams) for _ in range(3)]
    held = new_stream(cu, streams)
    gate = HostGate(cu)
    live = {}                      # Block -> (stream, fill byte)
    clobbers = captured = 0
    try:
        rounds, steps = (4, 120) if UNDER_SANITIZER else (16, 400)
        for round_no in range(1, rounds + 1):
            gate.hold(held, round_no)
            for step in range(steps):
                if step == steps // 2 and round_no % 2 == 0:
                    got = captured_phase(alloc, cu, work[0], work[1], rng, live)
                    captured += len(got)
                    live.update(got)
                op = rng.random()
                if op < 0.5 or not live:
                    s = rng.choice(work)
                    block = alloc.malloc(random_nbytes(rng), handle(s))
                    fill = rng.randint(1, 255)
                    ok(cu.cuMemsetD8Async(block.ptr, fill, block.size, s))
                    live[block] = (s, fill)
                elif op < 0.75:
                    block = rng.choice(list(live))
                    s, _ = live.pop(block)
                    if rng.random() < 0.3:
                        other = rng.choice([w for w in work if w is not s])
                        ok(cu.cuMemsetD8Async(block.ptr, 0, block.size, other))
                        alloc.record_stream(block, handle(other))
                    alloc.free(block)
                else:
                    # Queue a clobbering memset on the held stream, then free the block.
                    block = rng.choice(list(live))
                    live.pop(block)
                    ok(cu.cuMemsetD8Async(block.ptr, 0, block.size, held))
                    alloc.record_stream(block, handle(held))
                    alloc.free(block)
                    clobbers += 1
                alloc.check_invariants()
                while len(live) > 40:
                    block = next(iter(live))
                    live.pop(block)
                    alloc.free(block)
            for s in work:
                ok(cu.cuStreamSynchronize(s))
            gate.open(round_no)
            ok(cu.cuStreamSynchronize(held))
            for block, (_, fill) in live.items():
                n = min(block.size, 256)
                assert read_bytes(cu, block.ptr, n) == bytes([fill]) * n, f"{block!r} was clobbered"
                assert read_bytes(cu, block.ptr + block.size - n, n) == bytes([fill]) * n
            if round_no % 4 == 0:
                alloc.empty_cache()
        gate.check()
        assert clobbers > rounds * steps // 10 and captured > rounds

        for block in list(live):
            alloc.free(block)
        alloc.empty_cache()
        alloc.check_invariants()
        stats = alloc.memory_stats()
        assert stats["reserved_bytes.all.current"] == 0
        assert stats["graph_pools.current"] == 0 and stats["graph_pools.freeable"] == 0
    finally:
        gate.open(1 << 30)
        ok(cu.cuCtxSynchronize())
        gate.close()


def test_oom_past_fraction_cap_and_recovery(gpu):
    mem, cu, streams = gpu
    alloc = CachingAllocator(mem, parse_config(""))
    fraction = (4.5 * (1 << 30)) / mem.total_memory()  # a 4.5 GiB cap: four 1 GiB segments fit
    alloc.set_per_process_memory_fraction(fraction)
    blocks = []
    with pytest.raises(OutOfMemoryError) as info:
        for _ in range(8):
            blocks.append(alloc.malloc(1 << 30))
    assert len(blocks) == 4
    err = info.value
    assert err.requested == 1 << 30 and err.allowed == int(fraction * mem.total_memory())
    assert "out of memory" in str(err)
    assert alloc.memory_stats()["reserved_bytes.all.current"] <= err.allowed
    assert alloc.memory_stats()["num_ooms"] == 1
    alloc.free(blocks.pop())
    again = alloc.malloc(1 << 30)                        # recovered
    ok(cu.cuMemsetD8(again.ptr, 1, again.size))
    for b in blocks + [again]:
        alloc.free(b)
    free_before, _ = mem.mem_get_info()
    alloc.empty_cache()
    free_after, _ = mem.mem_get_info()
    assert free_after - free_before >= 3 << 30           # the cache went back to the driver
    alloc.check_invariants()


def test_allocation_during_real_capture_uses_private_pool(gpu):
    mem, cu, streams = gpu
    alloc = CachingAllocator(mem, parse_config(""))
    s = new_stream(cu, streams)
    pool = alloc.new_pool_id()
    alloc.begin_allocate_to_pool(pool, handle(s))
    ok(cu.cuStreamBeginCapture(s, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
    assert mem.capture_id(handle(s)) is not None
    a = alloc.malloc(3 * MiB, handle(s))                # a new segment: cuMemAlloc during capture
    ok(cu.cuMemsetD8Async(a.ptr, 7, a.size, s))
    alloc.free(a)
    b = alloc.malloc(3 * MiB, handle(s))                # reused in stream order within the pool
    assert b.ptr == a.ptr
    ok(cu.cuMemsetD8Async(b.ptr, 9, 1024, s))
    graph = ok(cu.cuStreamEndCapture(s))
    alloc.end_allocate_to_pool(pool)
    exe = ok(cu.cuGraphInstantiate(graph, 0))
    for _ in range(3):
        ok(cu.cuGraphLaunch(exe, s))
    ok(cu.cuStreamSynchronize(s))
    assert read_bytes(cu, b.ptr, 4) == b"\x09" * 4
    assert read_bytes(cu, b.ptr + 2048, 4) == b"\x07" * 4
    assert alloc.memory_snapshot()[0]["segment_pool_id"] == pool
    ok(cu.cuGraphExecDestroy(exe))
    ok(cu.cuGraphDestroy(graph))
    alloc.free(b)
    alloc.release_pool(pool)
    alloc.empty_cache()
    assert alloc.memory_snapshot() == []
    alloc.check_invariants()


def test_native_exact_hits_on_device_memory(gpu):
    """The native exact-size hit (cutegrad._C.AllocatorFastPath) over CudaMemory: a block
    freed on a stream comes back on that stream without a call into the Python policy,
    holds what the stream writes next, and the statistics match the Python twin's for
    the same calls."""
    from cutegrad.allocator.caching import NATIVE_FAST_PATH, PythonCachingAllocator
    if not NATIVE_FAST_PATH:
        pytest.skip("cutegrad._C (with AllocatorFastPath) is not built")
    mem, cu, streams = gpu
    s = new_stream(cu, streams)
    native, python = CachingAllocator(mem, parse_config("")), PythonCachingAllocator(mem, parse_config(""))
    sizes = (100, 70_000, 3 * MiB)
    for alloc in (native, python):
        for nbytes in sizes:
            alloc.free(alloc.malloc(nbytes, handle(s)))
    slow = []
    native._malloc_slow = lambda *a: slow.append(a) or CachingAllocator._malloc_slow(native, *a)
    for fill in range(1, 6):
        for alloc in (native, python):
            blocks = [alloc.malloc(nbytes, handle(s)) for nbytes in sizes]
            for b in blocks:
                ok(cu.cuMemsetD8Async(b.ptr, fill, b.size, s))
            ok(cu.cuStreamSynchronize(s))
            for b in blocks:
                assert read_bytes(cu, b.ptr + b.size - 4, 4) == bytes([fill]) * 4
                alloc.free(b)
    assert slow == []
    assert native.memory_stats() == python.memory_stats()
    for alloc in (native, python):
        alloc.check_invariants()
        alloc.empty_cache()
