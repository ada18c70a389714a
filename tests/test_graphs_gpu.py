"""cutegrad.graphs on a real GPU: capture and replay of copies and memsets,
captured allocations from the private pool replayed 1,000 times with changing
inputs, pool sharing, every illegal-capture case (and that the stream, the
allocator and the process stay usable afterwards), and Philox offsets on replay.
"""
import numpy as np
import pytest

import cutegrad.cuda as cuda
import cutegrad.graphs as graphs
from cutegrad.cuda import capture_guard, copies, driver

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU and driver")]

N = 4096  # bytes per test buffer


def allocator():
    from cutegrad.allocator import get_allocator
    return get_allocator(cuda.current_device())


def alloc(nbytes, stream=None):
    s = cuda.current_stream() if stream is None else stream
    return allocator().malloc(nbytes, s.handle)


def read(ptr, nbytes, dtype=np.uint8, stream=None):
    s = cuda.current_stream() if stream is None else stream
    buf = copies.PinnedBuffer(nbytes)
    copies.device_to_host(buf.ptr, ptr, nbytes, s)
    s.synchronize()
    return buf.array(dtype, (nbytes // np.dtype(dtype).itemsize,)).copy()


def pool_of(ptr):
    for seg in allocator().memory_snapshot():
        if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return seg["segment_pool_id"]
    raise AssertionError(f"{ptr:#x} is in no segment")


def graph_pools():
    return allocator().memory_stats()["graph_pools.current"]


def assert_usable(stream):
    """No capture left anywhere, and eager work plus a new capture still run correctly."""
    assert not capture_guard.any_capture_underway()
    assert allocator().captures_underway() == 0
    assert not cuda.is_current_stream_capturing()
    assert driver.call("cuStreamIsCapturing", stream._cu) == 0
    buf = alloc(N, stream)
    copies.memset8(buf.ptr, 0x5A, N, stream)
    assert (read(buf.ptr, N, stream=stream) == 0x5A).all()
    g = graphs.CUDAGraph()
    with graphs.graph(g, stream=stream):
        copies.memset8(buf.ptr, 0xA5, N)
    g.replay(stream)
    assert (read(buf.ptr, N, stream=stream) == 0xA5).all()
    g.reset()
    allocator().free(buf)
    cuda.synchronize()


def test_capture_on_the_legacy_default_stream_is_refused():
    g = graphs.CUDAGraph()
    before = graph_pools()
    with cuda.stream(cuda.default_stream()):
        with pytest.raises(RuntimeError, match="legacy default stream"):
            g.capture_begin()
    assert graph_pools() == before and allocator().captures_underway() == 0


def test_capture_and_replay_memcpy_and_memset():
    s = cuda.Stream()
    x, y = alloc(N, s), alloc(2 * N, s)
    g = graphs.CUDAGraph()
    with graphs.graph(g, stream=s):
        assert cuda.is_current_stream_capturing() and cuda.current_stream() is s
        copies.memset32(y.ptr, 0xABCD1234, N // 4)
        copies.device_to_device(y.ptr + N, x.ptr, N)
    assert not cuda.is_current_stream_capturing()
    rng = np.random.default_rng(0)
    for _ in range(3):
        data = rng.integers(0, 256, N, dtype=np.uint8)
        copies.host_to_device(x.ptr, data.ctypes.data, N, s)
        copies.memset8(y.ptr, 0, 2 * N, s)
        g.replay(s)
        out = read(y.ptr, 2 * N, stream=s)
        assert (out[:N].view(np.uint32) == 0xABCD1234).all()
        np.testing.assert_array_equal(out[N:], data)
    g.reset()
    for b in (x, y):
        allocator().free(b)


def test_captured_allocations_replayed_1000_times_with_changing_inputs():
    s = cuda.Stream()
    n = 12_345  # odd size: no alignment luck
    x, y = alloc(n, s), alloc(n, s)
    side = cuda.Stream()
    g = graphs.CUDAGraph()
    pools_before = graph_pools()
    with graphs.graph(g, stream=s):
        tmp = alloc(n)  # from the graph's private pool
        other = alloc(3 * n, side)  # a stream outside the capture: the ordinary pools
        copies.device_to_device(tmp.ptr, x.ptr, n)
        copies.memset8(tmp.ptr, 0xEE, 7)  # the first 7 bytes are overwritten every replay
        copies.device_to_device(y.ptr, tmp.ptr, n)
        allocator().free(tmp)
    assert pool_of(tmp.ptr) == g.pool() is not None
    assert pool_of(other.ptr) is None
    assert graph_pools() == pools_before + 1
    allocator().free(other)
    staging = copies.PinnedBuffer(n)
    back = copies.PinnedBuffer(n)
    src, dst = staging.array(np.uint8, (n,)), back.array(np.uint8, (n,))
    rng = np.random.default_rng(1)
    for i in range(1000):
        src[...] = rng.integers(0, 256, n, dtype=np.uint8)
        copies.host_to_device(x.ptr, staging.ptr, n, s)
        g.replay(s)
        copies.device_to_host(back.ptr, y.ptr, n, s)
        s.synchronize()
        assert (dst[:7] == 0xEE).all(), i
        np.testing.assert_array_equal(dst[7:], src[7:], err_msg=f"replay {i}")
    g.reset()
    assert graph_pools() == pools_before
    for b in (x, y):
        allocator().free(b)
    assert_usable(s)


def test_graphs_sharing_a_pool_replay_in_order():
    s = cuda.Stream()
    x, y = alloc(N, s), alloc(N, s)
    g1, g2 = graphs.CUDAGraph(), graphs.CUDAGraph()
    pool = graphs.graph_pool_handle()
    with graphs.graph(g1, pool=pool, stream=s):
        t1 = alloc(N)
        copies.device_to_device(t1.ptr, x.ptr, N)
        copies.memset8(t1.ptr, 1, 16)
    with graphs.graph(g2, pool=g1.pool(), stream=s):
        copies.device_to_device(y.ptr, t1.ptr, N)
    assert g1.pool() == g2.pool() == pool == pool_of(t1.ptr)
    data = np.arange(N, dtype=np.uint32).astype(np.uint8)
    copies.host_to_device(x.ptr, data.ctypes.data, N, s)
    g1.replay(s)
    g2.replay(s)
    out = read(y.ptr, N, stream=s)
    assert (out[:16] == 1).all()
    np.testing.assert_array_equal(out[16:], data[16:])
    allocator().free(t1)
    g1.reset()
    g2.replay(s)  # the pool lives while g2 does
    s.synchronize()
    g2.reset()
    for b in (x, y):
        allocator().free(b)


def _synchronize(s, ev):
    cuda.synchronize()


def _stream_synchronize(s, ev):
    s.synchronize()


def _event_synchronize(s, ev):
    ev.synchronize()


def _stream_query(s, ev):
    s.query()


def _empty_cache(s, ev):
    cuda.empty_cache()


def _raw_alloc(s, ev):
    driver.call("cuMemAlloc", 1 << 20)


def _pinned_alloc(s, ev):
    copies.PinnedBuffer(4096)


def _tensor_item(s, ev):
    cuda._check_not_capturing("Tensor.item()")


@pytest.mark.parametrize("op, name", [
    (_synchronize, r"cutegrad\.cuda\.synchronize\(\)"),
    (_stream_synchronize, r"Stream\.synchronize\(\)"),
    (_event_synchronize, r"Event\.synchronize\(\)"),
    (_stream_query, r"cuStreamQuery"),
    (_empty_cache, r"empty_cache"),
    (_raw_alloc, r"cuMemAlloc"),
    (_pinned_alloc, r"pinned host staging buffer"),
    (_tensor_item, r"Tensor\.item\(\)"),
])
def test_illegal_work_during_capture_discards_it_cleanly(op, name):
    s = cuda.Stream()
    x = alloc(N, s)
    ev = s.record_event()
    g = graphs.CUDAGraph()
    pools_before = graph_pools()
    with pytest.raises(cuda.StreamCaptureError, match=name):
        with graphs.graph(g, stream=s):
            copies.memset8(x.ptr, 1, N)
            inside = alloc(N)
            assert graph_pools() == pools_before + 1
            op(s, ev)
    assert not g.is_capturing and g.pool() is None
    with pytest.raises(RuntimeError, match="discarded"):
        g.replay(s)
    allocator().free(inside)
    assert graph_pools() == pools_before
    assert cuda.current_stream() == cuda.default_stream()
    assert_usable(s)
    # The same CUDAGraph object can capture again.
    with graphs.graph(g, stream=s):
        copies.memset8(x.ptr, 3, N)
    g.replay(s)
    assert (read(x.ptr, N, stream=s) == 3).all()
    g.reset()
    allocator().free(x)


def test_exception_inside_capture_block_discards_and_reraises():
    s = cuda.Stream()
    g = graphs.CUDAGraph()
    pools_before = graph_pools()
    with pytest.raises(KeyError, match="boom"):
        with graphs.graph(g, stream=s):
            alloc(N)
            raise KeyError("boom")
    assert not g.is_capturing and graph_pools() == pools_before
    assert_usable(s)


def test_capture_invalidated_behind_cutegrads_back_is_reported_at_end():
    s = cuda.Stream()
    g = graphs.CUDAGraph()
    pools_before = graph_pools()
    with pytest.raises(cuda.StreamCaptureError, match="cuStreamEndCapture failed"):
        with graphs.graph(g, stream=s):
            inside = alloc(N)
            copies.memset8(inside.ptr, 0, N)
            # Bypasses cutegrad's checks: CUDA invalidates the capture by itself.
            assert driver.call_status("cuStreamQuery", s._cu) != 0
    allocator().free(inside)
    assert graph_pools() == pools_before
    assert_usable(s)


def test_replay_on_another_stream_and_default_capture_stream():
    x = alloc(N)
    g = graphs.CUDAGraph()
    with graphs.graph(g):
        assert cuda.current_stream().handle != 0
        copies.memset8(x.ptr, 0x42, N)
    other = cuda.Stream()
    g.replay(other)
    assert (read(x.ptr, N, stream=other) == 0x42).all()
    g.reset()
    allocator().free(x)


def test_philox_offsets_advance_on_every_replay():
    s = cuda.Stream()
    gen = graphs.Generator(cuda.current_device(), seed=(3 << 32) | 17)
    out = alloc(32, s)
    gen.philox_args(10)  # eager: offsets 0..11
    g = graphs.CUDAGraph()
    with graphs.graph(g, stream=s):
        a = gen.philox_args(100)
        b = gen.philox_args(6)
        # Stand-in for a random kernel: copy the (seed, base offset) it would read.
        copies.device_to_device(out.ptr, a.seed_ptr, 16)
        copies.device_to_device(out.ptr + 16, b.offset_ptr, 8)
    assert (a.offset, b.offset) == (0, 100) and gen.get_state() == ((3 << 32) | 17, 12)
    total = 100 + 8  # each reservation rounds up to a multiple of 4
    seen = []
    for _ in range(3):
        g.replay(s)
        seed, base, base_b, _pad = read(out.ptr, 32, np.uint64, s)
        assert seed == (3 << 32) | 17 and base == base_b
        seen.append(int(base))
    assert seen == [12, 12 + total, 12 + 2 * total]
    assert gen.philox_args(4).offset == 12 + 3 * total  # eager continues after the replays
    gen.manual_seed(5)
    g.replay(cuda.Stream())  # another stream: ordered after the last replay
    cuda.synchronize()
    seed, base = read(out.ptr, 16, np.uint64, s)
    assert (seed, base) == (5, 0)
    g.reset()
    allocator().free(out)


def test_graphed_step_replays_with_new_inputs():
    import cutegrad
    state = cutegrad.zeros(8, device="cuda")  # stands for parameters the step updates
    calls = []

    def step(x):
        calls.append(cuda.is_current_stream_capturing())
        out = cutegrad.empty(8, device="cuda")
        out.copy_(x)
        state.copy_(out)
        return out

    g = graphs.graphed(step, cutegrad.zeros(8, device="cuda"), warmup=2)
    assert calls == [False, False, True]  # two warm-up runs, then the capture
    for i in range(50):
        y = g(cutegrad.full((8,), float(i), device="cuda"))
        assert y.cpu().tolist() == [float(i)] * 8
        assert state.cpu().tolist() == [float(i)] * 8
    assert len(calls) == 3  # replays do not call the Python step
    with pytest.raises(ValueError, match="captured with"):
        g(cutegrad.zeros(9, device="cuda"))
    g.reset()
