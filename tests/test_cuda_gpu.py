"""cutegrad.cuda on a real GPU: devices, streams and events ordering, timing,
async copies through pinned memory, driver errors, and allocator OOM recovery.

Ordering is tested deterministically with a *gate*: cuStreamWaitValue32 holds a
stream until the host releases a flag, so "not done yet" states are certain
rather than a race against a fast GPU. While a gate is closed nothing may
synchronise the whole device (cuMemFreeHost, cuMemFree, cuCtxSynchronize), or
the test would wait for itself.
"""
import contextlib
import threading
import time

import numpy as np
import pytest

import cutegrad.cuda as cuda
from cutegrad.cuda import copies, driver

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU and driver")]


def alloc(nbytes, stream=None):
    from cutegrad.allocator import get_allocator
    s = cuda.current_stream() if stream is None else stream
    return get_allocator(s.device).malloc(nbytes, s.handle)


def free(block):
    from cutegrad.allocator import get_allocator
    get_allocator(cuda.current_device()).free(block)


def read(ptr, nbytes, dtype=np.uint8, stream=None):
    s = cuda.current_stream() if stream is None else stream
    buf = copies.PinnedBuffer(nbytes)
    copies.device_to_host(buf.ptr, ptr, nbytes, s)
    s.synchronize()
    return buf.array(dtype, (nbytes // np.dtype(dtype).itemsize,)).copy()


def write(ptr, array, stream=None):
    s = cuda.current_stream() if stream is None else stream
    array = np.ascontiguousarray(array)
    buf = copies.PinnedBuffer(array.nbytes)
    buf.array(array.dtype, array.shape)[...] = array
    copies.host_to_device(ptr, buf.ptr, array.nbytes, s)
    buf.record(s)
    return buf


@contextlib.contextmanager
def gate(stream):
    """Hold `stream` (work queued after entering waits) until the block exits."""
    flag = alloc(4)
    releaser = cuda.Stream()
    copies.memset32(flag.ptr, 0, 1, releaser)
    releaser.synchronize()
    d = driver.driver()
    try:
        driver.call("cuStreamWaitValue32", stream._cu, flag.ptr, 1,
                    d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
    except cuda.CudaError as e:
        free(flag)
        pytest.skip(f"stream memory operations unsupported: {e}")
    try:
        yield
    finally:
        copies.memset32(flag.ptr, 1, 1, releaser)
        releaser.synchronize()
        stream.synchronize()
        free(flag)


def test_device_properties():
    p = cuda.get_device_properties(0)
    assert p.name and p.multi_processor_count > 0 and p.total_memory > 1 << 30
    assert p.major >= 3 and p.minor >= 0 and p.l2_cache_size > 0
    assert cuda.get_device_name() == p.name
    assert cuda.device_count() >= 1
    free_b, total = cuda.mem_get_info()
    assert 0 < free_b <= total == p.total_memory
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        t = torch.cuda.get_device_properties(0)
        assert (t.name, t.multi_processor_count, t.major, t.minor, t.total_memory) == \
            (p.name, p.multi_processor_count, p.major, p.minor, p.total_memory)


def test_primary_context_shared_with_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    torch.ones(1, device="cuda")  # torch makes its context current on this thread
    ours = int(driver.primary_context(0))
    assert int(driver.call("cuCtxGetCurrent")) == ours


def test_set_device_and_device_context():
    cuda.set_device(0)
    assert cuda.current_device() == 0
    with cuda.device("cuda:0") as d:
        assert d.index == 0 and cuda.current_device() == 0
    with cuda.device(None):
        assert cuda.current_device() == 0
    n = cuda.device_count()
    with pytest.raises(ValueError, match="out of range"):
        cuda.set_device(n)
    with pytest.raises(ValueError, match="expected a CUDA device"):
        cuda.set_device("cpu")
    from cutegrad.cuda.device import device_index
    from cutegrad.device import device as cg_device
    assert device_index(cg_device("cuda:0")) == 0


def test_stream_objects_and_current_stream():
    least, greatest = driver.call("cuCtxGetStreamPriorityRange")
    hi = cuda.Stream(priority=greatest)
    assert hi.priority == greatest and hi.handle != 0
    with pytest.raises(ValueError, match="priority"):
        cuda.Stream(priority=least + 1)
    assert cuda.default_stream().handle == 0
    assert cuda.current_stream() == cuda.default_stream()
    a, b = cuda.Stream(), cuda.Stream()
    with a:
        assert cuda.current_stream() is a
        with cuda.stream(b):
            assert cuda.current_stream() is b
        with cuda.stream(None):
            assert cuda.current_stream() is a
        seen = []
        t = threading.Thread(target=lambda: seen.append(cuda.current_stream()))
        t.start()
        t.join()
        assert seen == [cuda.default_stream()]  # current stream is per thread
    assert cuda.current_stream() == cuda.default_stream()
    ext = cuda.ExternalStream(a.handle)
    assert ext == a and hash(ext) == hash(a)


def test_query_and_wait_event_follow_the_gate():
    g, s = cuda.Stream(), cuda.Stream()
    out = alloc(4, s)
    copies.memset32(out.ptr, 0, 1, s)
    # Also warms the pinned cache: a fresh cuMemHostAlloc must not happen while gated.
    assert read(out.ptr, 4, np.uint32, s)[0] == 0
    with gate(g):
        ev = g.record_event()
        s.wait_event(ev)
        copies.memset32(out.ptr, 7, 1, s)
        time.sleep(0.01)
        assert not g.query() and not ev.query() and not s.query()
        assert read(out.ptr, 4, np.uint32, cuda.Stream())[0] == 0
    s.synchronize()
    assert ev.query() and g.query() and s.query()
    assert read(out.ptr, 4, np.uint32, s)[0] == 7
    free(out)


def test_wait_stream_orders_work_across_streams():
    g, s = cuda.Stream(), cuda.Stream()
    src, dst = alloc(1 << 20, g), alloc(1 << 20, s)
    copies.memset8(dst.ptr, 0, 1 << 20, s)
    s.synchronize()
    with gate(g):
        copies.memset8(src.ptr, 5, 1 << 20, g)
        s.wait_stream(g)
        copies.device_to_device(dst.ptr, src.ptr, 1 << 20, s)
        assert not s.query()
    s.synchronize()
    assert (read(dst.ptr, 1 << 20, stream=s) == 5).all()
    free(src)
    free(dst)


def test_elapsed_time_measures_a_held_stream():
    s = cuda.Stream()
    start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
    start.record(s)
    with gate(s):
        end.record(s)  # runs only once the gate opens, at least 50 ms after start
        time.sleep(0.05)
    ms = start.elapsed_time(end)
    assert 40.0 <= ms < 10_000.0
    plain = cuda.Event()
    plain.record(s)
    with pytest.raises(ValueError, match="enable_timing"):
        start.elapsed_time(plain)


def test_unrecorded_event_is_complete_and_waiting_on_it_is_a_no_op():
    ev = cuda.Event()
    assert ev.query() and ev.handle == 0
    ev.synchronize()
    ev.wait(cuda.Stream())


@pytest.mark.parametrize("nbytes", [1, 511, 4097, 1_000_003])
def test_async_copies_through_pinned_memory(nbytes):
    rng = np.random.default_rng(nbytes)
    data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    s1, s2 = cuda.Stream(), cuda.Stream()
    a, b = alloc(nbytes, s1), alloc(nbytes, s2)
    keep = write(a.ptr, data, s1)
    s2.wait_stream(s1)
    copies.device_to_device(b.ptr, a.ptr, nbytes, s2)
    back = copies.PinnedBuffer(nbytes)
    copies.device_to_host(back.ptr, b.ptr, nbytes, s2)
    s2.synchronize()
    np.testing.assert_array_equal(back.array(np.uint8, (nbytes,)), data)
    del keep
    free(a)
    free(b)


def test_pinned_buffers_are_reused_after_their_copies():
    s = cuda.Stream()
    dev = alloc(1000, s)
    a = copies.PinnedBuffer(1000)
    ptr = a.ptr
    copies.device_to_host(a.ptr, dev.ptr, 1000, s)
    a.record(s)
    del a
    s.synchronize()
    b = copies.PinnedBuffer(700)  # same 1 KiB size class, its copy is done: reused
    assert b.ptr == ptr
    del b
    copies.empty_pinned_cache()
    free(dev)


def test_memsets():
    s = cuda.Stream()
    blk = alloc(4096, s)
    copies.memset8(blk.ptr, 0x1FF, 4096, s)  # only the low byte counts
    assert (read(blk.ptr, 4096, stream=s) == 0xFF).all()
    copies.memset16(blk.ptr, 0xBEEF, 2048, s)
    assert (read(blk.ptr, 4096, np.uint16, s) == 0xBEEF).all()
    copies.memset32(blk.ptr + 4, 0xDEADBEEF, 3, s)
    got = read(blk.ptr, 16, np.uint32, s)
    assert list(got) == [0xBEEFBEEF, 0xDEADBEEF, 0xDEADBEEF, 0xDEADBEEF]
    free(blk)


def test_synchronize_and_stream_synchronize():
    s = cuda.Stream()
    blk = alloc(1 << 22, s)
    copies.memset8(blk.ptr, 3, 1 << 22, s)
    cuda.synchronize()
    assert s.query()
    s.synchronize()
    free(blk)


def test_driver_error_names_the_call_and_error():
    with pytest.raises(cuda.CudaError) as ei:
        driver.call("cuDeviceGet", 10_000)
    assert ei.value.call == "cuDeviceGet"
    assert ei.value.error_name == "CUDA_ERROR_INVALID_DEVICE"
    assert "cuDeviceGet failed: CUDA_ERROR_INVALID_DEVICE" in str(ei.value)


def test_allocator_oom_is_raised_and_recovered_from():
    from cutegrad.allocator import OutOfMemoryError, get_allocator
    a = get_allocator(0)
    s = cuda.Stream()
    total = cuda.get_device_properties(0).total_memory
    a.empty_cache()  # cached blocks left by earlier tests could serve the request without the driver
    reserved = a.memory_stats()["reserved_bytes.all.current"]
    a.set_per_process_memory_fraction(min(1.0, (reserved + (512 << 20)) / total))
    try:
        with pytest.raises(OutOfMemoryError) as ei:
            a.malloc(1 << 30, s.handle)
        assert "out of memory" in str(ei.value)
        blk = a.malloc(64 << 20, s.handle)
        copies.memset8(blk.ptr, 9, 64 << 20, s)
        assert (read(blk.ptr + (64 << 20) - 4096, 4096, stream=s) == 9).all()
        a.free(blk)
    finally:
        a.set_per_process_memory_fraction(1.0)
    big = a.malloc(1 << 30, s.handle)  # the cap is gone: the same request now succeeds
    copies.memset8(big.ptr, 1, 1 << 30, s)
    s.synchronize()
    a.free(big)
