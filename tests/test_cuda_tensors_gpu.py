"""CUDA tensors on a real GPU: creation by memset, host<->device and
device<->device copies, DLPack with PyTorch and CuPy without copies (same
pointer, both directions, stream-ordered), record_stream, OOM through the allocator, and
tensor copies captured into a graph and replayed 1,000 times."""
import numpy as np
import pytest

import cutegrad
import cutegrad.cuda as cuda
import cutegrad.graphs as graphs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU and driver")]

DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]


def values(rng, shape, dtype):
    if getattr(cutegrad, dtype).is_floating_point:
        return rng.standard_normal(shape) * 50
    return rng.integers(0 if dtype in ("uint8", "bool") else -100, 100, shape)


def assert_same(dev, cpu):
    got = dev.cpu()
    assert got.dtype is cpu.dtype and tuple(got.shape) == tuple(cpu.shape)
    np.testing.assert_array_equal(got.numpy().astype(np.float64), cpu.numpy().astype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_zeros_ones_by_memset(dtype):
    dt = getattr(cutegrad, dtype)
    for value in (0, 1, -3.5, 123):
        if dtype in ("uint8", "bool") and value < 0:
            continue
        poison = cutegrad.full((7, 13), 7, dtype=dt, device="cuda")
        del poison  # the next tensor likely reuses this block: stale bytes would show
        assert_same(cutegrad.full((7, 13), value, dtype=dt, device="cuda"), cutegrad.full((7, 13), value, dtype=dt))
    assert_same(cutegrad.zeros(1001, dtype=dt, device="cuda"), cutegrad.zeros(1001, dtype=dt))
    assert_same(cutegrad.ones(3, 333, dtype=dt, device="cuda"), cutegrad.ones(3, 333, dtype=dt))


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrips_and_strided_views(dtype):
    rng = np.random.default_rng(len(dtype))
    dt = getattr(cutegrad, dtype)
    for shape in [(), (1,), (1_000_003,), (17, 31), (3, 5, 7)]:
        cpu = cutegrad.tensor(values(rng, shape, dtype), dtype=dt)
        dev = cpu.cuda()
        assert dev.device == cutegrad.device("cuda:0")
        assert_same(dev, cpu)
        assert_same(cutegrad.tensor(cpu.numpy(), device="cuda"), cpu)
        if len(shape) >= 2:
            assert_same(dev.transpose(0, -1), cpu.transpose(0, -1))
            assert_same(dev[1::2, ::3], cpu[1::2, ::3])


def test_item_tolist_repr():
    t = cutegrad.tensor([[1.5, -2.0], [3.25, 4.0]], device="cuda")
    assert t[1, 0].item() == 3.25 and t.tolist() == [[1.5, -2.0], [3.25, 4.0]]
    assert "3.25" in repr(t)


@pytest.mark.parametrize("src_dev", ["cpu", "cuda"])
@pytest.mark.parametrize("src_dtype, dst_dtype", [("float32", "float32"), ("float64", "bfloat16"),
                                                  ("int64", "float32"), ("float32", "int32")])
def test_copy_casts_and_broadcasts(src_dev, src_dtype, dst_dtype):
    rng = np.random.default_rng(0)
    for src_shape in [(40, 50), (1, 50), (50,), ()]:
        src_cpu = cutegrad.tensor(values(rng, src_shape, src_dtype), dtype=getattr(cutegrad, src_dtype))
        dst_cpu = cutegrad.zeros(40, 50, dtype=getattr(cutegrad, dst_dtype))
        dst = dst_cpu.cuda()
        dst_cpu.copy_(src_cpu)
        dst.copy_(src_cpu.to(src_dev))
        assert_same(dst, dst_cpu)
        if len(src_shape) == 2:  # into a strided destination
            dst_cpu.t()[3:9].copy_(src_cpu.t()[:6])
            dst.t()[3:9].copy_(src_cpu.t()[:6].to(src_dev))
            assert_same(dst, dst_cpu)


def test_copies_on_side_streams_are_ordered():
    rng = np.random.default_rng(1)
    cpu = cutegrad.tensor(rng.standard_normal((1 << 20,)), dtype=cutegrad.float32)
    s = cuda.Stream()
    with s:
        dev = cpu.cuda()  # async upload on s
        copy = cutegrad.empty(1 << 20, device="cuda")
        copy.copy_(dev)  # device-to-device on s
    cuda.default_stream().wait_stream(s)
    cuda.record_stream(copy, cuda.default_stream())
    assert_same(copy, cpu)


def test_dlpack_with_torch_shares_memory_both_ways():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    t = cutegrad.tensor(np.arange(12, dtype=np.float32).reshape(3, 4), device="cuda")
    tt = torch.from_dlpack(t)
    assert tt.data_ptr() == t.data_ptr() and tt.is_cuda and tuple(tt.shape) == (3, 4)
    tt.mul_(2)  # torch's current stream; cutegrad reads on the legacy default stream
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.cpu().numpy(), np.arange(12, dtype=np.float32).reshape(3, 4) * 2)

    src = torch.arange(20, device="cuda", dtype=torch.float64).reshape(4, 5)[:, 1:]
    back = cutegrad.from_dlpack(src)
    assert back.data_ptr() == src.data_ptr() and tuple(back.shape) == (4, 4)
    np.testing.assert_array_equal(back.cpu().numpy(), src.cpu().numpy())
    bf = torch.ones(5, device="cuda", dtype=torch.bfloat16)
    assert cutegrad.from_dlpack(bf).data_ptr() == bf.data_ptr()
    # Export on a side stream: the consumer's stream waits for cutegrad's work.
    s = cuda.Stream()
    with s:
        u = cutegrad.full((1 << 22,), 3.0, device="cuda")
        tu = torch.from_dlpack(u)
    assert float(tu.sum()) == 3.0 * (1 << 22)


def test_dlpack_with_cupy_shares_memory_both_ways():
    cp = pytest.importorskip("cupy")
    t = cutegrad.tensor(np.arange(15, dtype=np.float32).reshape(3, 5), device="cuda")
    c = cp.from_dlpack(t)
    assert c.data.ptr == t.data_ptr() and c.shape == (3, 5) and c.dtype == np.float32
    c *= 3  # on CuPy's current stream (the legacy default stream), which cutegrad's reads follow
    cp.cuda.Device().synchronize()
    np.testing.assert_array_equal(t.cpu().numpy(), np.arange(15, dtype=np.float32).reshape(3, 5) * 3)

    src = cp.arange(24, dtype=cp.int64).reshape(4, 6)[:, ::2]   # strided: element strides (6, 2)
    back = cutegrad.from_dlpack(src)
    assert back.data_ptr() == src.data.ptr and tuple(back.shape) == (4, 3) and back.stride() == (6, 2)
    np.testing.assert_array_equal(back.cpu().numpy(), cp.asnumpy(src))
    back.add_(100)  # cutegrad writes, CuPy sees it
    cutegrad.cuda.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(src), np.arange(24).reshape(4, 6)[:, ::2] + 100)
    # Export on a side stream: CuPy's stream waits for cutegrad's work before reading.
    s = cuda.Stream()
    with s:
        u = cutegrad.full((1 << 22,), 2.0, device="cuda")
        cu = cp.from_dlpack(u)
    assert float(cu.sum()) == 2.0 * (1 << 22)


def test_record_stream_holds_the_block_until_the_other_stream_is_done():
    from test_cuda_gpu import gate
    user = cuda.Stream()
    t = cutegrad.zeros(1 << 20, device="cuda")
    ptr = t.data_ptr()
    # A cached block of the same size, so nothing below needs the driver while gated.
    spare = cutegrad.empty(1 << 20, device="cuda")
    del spare
    with gate(user):
        user.wait_stream(cuda.current_stream())
        cuda.record_stream(t, user)
        del t  # refcount frees it at once: no gc pass that might run other finalizers
        again = cutegrad.empty(1 << 20, device="cuda")
        assert again.data_ptr() != ptr  # the block waits for `user`
        del again
    cuda.synchronize()


def test_oom_through_tensors_and_recovery():
    from cutegrad.allocator import OutOfMemoryError, get_allocator
    a = get_allocator(0)
    cuda.empty_cache()  # blocks cached by earlier tests would serve the request without reserving
    total = cuda.get_device_properties(0).total_memory
    reserved = a.memory_stats()["reserved_bytes.all.current"]
    a.set_per_process_memory_fraction(min(1.0, (reserved + (256 << 20)) / total))
    try:
        with pytest.raises(OutOfMemoryError):
            cutegrad.empty(1 << 28, device="cuda")  # 1 GiB of float32
        small = cutegrad.ones(1 << 20, device="cuda")
        assert small[-1].item() == 1.0
        del small
    finally:
        a.set_per_process_memory_fraction(1.0)
    big = cutegrad.zeros(1 << 28, device="cuda")
    assert big[-1].item() == 0.0


def test_tensor_copies_in_a_graph_replayed_1000_times():
    rng = np.random.default_rng(2)
    x = cutegrad.zeros(4097, device="cuda")
    g = graphs.CUDAGraph()
    with graphs.graph(g):
        y = cutegrad.empty(4097, device="cuda")  # from the graph's pool
        y.copy_(x)
        z = cutegrad.full((7,), -1.0, device="cuda")
    for i in range(1000):
        data = rng.standard_normal(4097).astype(np.float32)
        x.copy_(cutegrad.from_numpy(data))
        g.replay()
        np.testing.assert_array_equal(y.cpu().numpy(), data, err_msg=f"replay {i}")
    assert z.cpu().tolist() == [-1.0] * 7
    with pytest.raises(cuda.StreamCaptureError, match=r"\.item\(\)"):
        with graphs.graph(graphs.CUDAGraph()):
            cutegrad.ones(3, device="cuda")[0].item()
    g.reset()
