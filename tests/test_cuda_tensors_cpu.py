"""CUDA tensor logic (cutegrad.cuda.tensors) on a CPU, over a fake device.

The fake keeps "device memory" in host buffers and implements the copy layer
(memcpy, memset, pinned buffers), the allocator and streams with host
operations, so everything above the driver calls runs: views and strides,
dtype bit patterns of `full`, casts and broadcasts of `copy_`, strided
destinations, overlap, cross-device ordering, freeing, the capture guard.
Every result is compared with the same operation on CPU tensors. The driver
calls themselves are tested on a GPU in test_cuda_gpu.py.
"""
import ctypes
import gc
import types

import numpy as np
import pytest

import cutegrad
import cutegrad.cuda as cuda
from cutegrad.cuda import capture_guard, tensors

DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"]


class FakeStream:
    def __init__(self, device, log):
        self.device = device
        self.handle = 0x100 + device
        self.log = log

    def wait_stream(self, other):
        self.log.append(("wait", self.device, other.device))

    def synchronize(self):
        self.log.append(("sync", self.device))


class FakeBlock:
    def __init__(self, n, stream):
        self.buf = ctypes.create_string_buffer(max(n, 1))
        self.ptr = ctypes.addressof(self.buf)
        self.size = n
        self.stream = stream
        self.uses = []


class FakeAllocator:
    def __init__(self):
        self.live = {}
        self.freed = 0

    def malloc(self, n, stream):
        b = FakeBlock(n, stream)
        # Fresh memory is garbage, as on a GPU: NaN-like bytes catch unwritten output.
        ctypes.memset(b.ptr, 0xFF, max(n, 1))
        self.live[b.ptr] = b
        return b

    def free(self, block):
        del self.live[block.ptr]
        self.freed += 1

    def record_stream(self, block, stream):
        block.uses.append(stream)


def _words(ptr, dtype, count, owner=None):
    raw = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    raw.owner = owner  # the returned view keeps the memory's owner alive
    return np.frombuffer(raw, dtype=dtype, count=count)


class FakePinned:
    def __init__(self, nbytes):
        self.buf = ctypes.create_string_buffer(max(nbytes, 1))
        self.ptr = ctypes.addressof(self.buf)
        self.nbytes = nbytes
        self.recorded = []

    def array(self, dtype, shape):
        count = int(np.prod(shape))
        return _words(self.ptr, dtype, count, self).reshape(shape)

    def record(self, stream):
        self.recorded.append(stream)


@pytest.fixture
def fake(monkeypatch):
    log = []
    allocators = {}
    streams = {}

    def stream_of(dev):
        return streams.setdefault(dev, FakeStream(dev, log))

    def copy(dst, src, n, stream):
        log.append(("copy", stream.device))
        ctypes.memmove(dst, src, n)

    ns = types.SimpleNamespace(
        host_to_device=copy, device_to_host=copy, device_to_device=copy,
        memset8=lambda p, v, n, s: _words(p, np.uint8, n).fill(v & 0xFF),
        memset16=lambda p, v, n, s: _words(p, np.uint16, n).fill(v & 0xFFFF),
        memset32=lambda p, v, n, s: _words(p, np.uint32, n).fill(v & 0xFFFFFFFF),
        memset32_strided=lambda p, pitch, v, n, s: [
            _words(p + i * pitch, np.uint32, 1).fill(v) for i in range(n)],
    )
    monkeypatch.setattr(tensors, "_get_allocator", lambda i: allocators.setdefault(i, FakeAllocator()))
    monkeypatch.setattr(tensors, "current_stream", stream_of)
    monkeypatch.setattr(tensors, "copies", ns)
    monkeypatch.setattr(tensors, "PinnedBuffer", FakePinned)
    return types.SimpleNamespace(log=log, allocators=allocators)


def ref_and_dev(rng, shape, dtype, device="cuda"):
    dt = getattr(cutegrad, dtype)
    if dt.is_floating_point:
        vals = rng.standard_normal(shape) * 50
    else:  # in range for every integer dtype, so the NumPy casts are exact
        vals = rng.integers(0 if dtype in ("uint8", "bool") else -100, 100, shape)
    cpu = cutegrad.tensor(vals, dtype=dt)
    return cpu, cutegrad.tensor(vals, dtype=dt, device=device)


def same(dev_tensor, cpu_tensor):
    assert dev_tensor.device.type == "cuda"
    got = dev_tensor.cpu()
    assert got.dtype is cpu_tensor.dtype and tuple(got.shape) == tuple(cpu_tensor.shape)
    np.testing.assert_array_equal(got.numpy().astype(np.float64), cpu_tensor.numpy().astype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [0, 1, -3.5, 2 ** 40 + 3, float("nan")])
def test_full_writes_the_bit_pattern_of_every_dtype(fake, dtype, value):
    dt = getattr(cutegrad, dtype)
    if not dt.is_floating_point and value != value:
        pytest.skip("NaN has no integer value")
    with np.errstate(invalid="ignore", over="ignore"):
        try:
            expect = cutegrad.full((3, 5), value, dtype=dt)
        except OverflowError:  # out of range for the dtype: the device must refuse it too
            with pytest.raises(OverflowError):
                cutegrad.full((3, 5), value, dtype=dt, device="cuda")
            return
        got = cutegrad.full((3, 5), value, dtype=dt, device="cuda")
    same(got, expect)


def test_zeros_ones_empty(fake):
    same(cutegrad.zeros(7, 3, device="cuda"), cutegrad.zeros(7, 3))
    same(cutegrad.ones(1, 9, dtype=cutegrad.float64, device="cuda"), cutegrad.ones(1, 9, dtype=cutegrad.float64))
    e = cutegrad.empty(4, 2, device="cuda")
    assert tuple(e.shape) == (4, 2) and e.is_contiguous() and e.device == cutegrad.device("cuda:0")
    assert tuple(cutegrad.zeros(0, 3, device="cuda").cpu().shape) == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_through_the_device(fake, dtype):
    rng = np.random.default_rng(len(dtype))
    for shape in [(), (1,), (13,), (3, 7), (2, 5, 3)]:
        cpu, dev = ref_and_dev(rng, shape, dtype)
        same(dev, cpu)
        same(cpu.to("cuda"), cpu)
        same(cpu.cuda(), cpu)
        assert dev.to("cpu").device.type == "cpu"


def test_item_tolist_and_repr(fake):
    t = cutegrad.tensor([[1.5, -2.0], [3.25, 4.0]], device="cuda")
    assert t[1, 0].item() == 3.25
    assert t.tolist() == [[1.5, -2.0], [3.25, 4.0]]
    assert "3.25" in repr(t)


def test_strided_views_come_back_right(fake):
    rng = np.random.default_rng(3)
    cpu, dev = ref_and_dev(rng, (6, 9), "float32")
    same(dev.t(), cpu.t())
    same(dev[1:5:2, ::3], cpu[1:5:2, ::3])
    same(dev[:, 4], cpu[:, 4])
    same(dev.t().to("cuda:1"), cpu.t())  # a strided cross-device move goes through the host


@pytest.mark.parametrize("src_dtype, dst_dtype", [("float32", "float32"), ("float64", "float16"),
                                                  ("int64", "float32"), ("float32", "int32"),
                                                  ("float32", "bfloat16"), ("uint8", "bool")])
def test_copy_casts_and_broadcasts_like_the_cpu(fake, src_dtype, dst_dtype):
    rng = np.random.default_rng(7)
    for src_dev in ("cpu", "cuda"):
        for src_shape in [(4, 5), (1, 5), (5,), ()]:
            src_cpu, src = ref_and_dev(rng, src_shape, src_dtype, src_dev)
            dst_cpu, dst = ref_and_dev(rng, (4, 5), dst_dtype)
            with np.errstate(invalid="ignore", over="ignore"):
                dst_cpu.copy_(src_cpu)
                dst.copy_(src)
            same(dst, dst_cpu)


def test_copy_into_a_strided_destination_keeps_the_rest(fake):
    rng = np.random.default_rng(11)
    base_cpu, base = ref_and_dev(rng, (5, 6), "float32")
    src_cpu, src = ref_and_dev(rng, (6, 2), "float32")
    base_cpu.t()[:, 1:3].copy_(src_cpu)
    base.t()[:, 1:3].copy_(src)
    same(base, base_cpu)


def test_overlapping_copy_reads_before_writing(fake):
    rng = np.random.default_rng(5)
    cpu, dev = ref_and_dev(rng, (10,), "float32")
    cpu[2:].copy_(cpu[:8].clone())  # what an overlapping copy must produce
    dev[2:].copy_(dev[:8])
    same(dev, cpu)


def test_same_dtype_contiguous_copy_stays_on_the_device(fake):
    rng = np.random.default_rng(9)
    src_cpu, src = ref_and_dev(rng, (8, 3), "float32")
    dst = cutegrad.empty(8, 3, device="cuda")
    fake.log.clear()
    dst.copy_(src)
    assert fake.log == [("copy", 0)]  # one device-to-device copy, no host round trip
    same(dst, src_cpu)


def test_cross_device_copy_orders_both_streams(fake):
    rng = np.random.default_rng(2)
    cpu, src = ref_and_dev(rng, (16,), "float32", "cuda:1")
    fake.log.clear()
    out = src.to("cuda:0")
    assert fake.log == [("wait", 1, 0), ("copy", 1), ("wait", 0, 1)]
    assert out.device == cutegrad.device("cuda:0")
    same(out, cpu)


def test_storage_returns_to_the_allocator_and_record_stream(fake):
    t = cutegrad.zeros(100, device="cuda")
    view = t[10:20]
    alloc = fake.allocators[0]
    assert len(alloc.live) == 1
    block = next(iter(alloc.live.values()))
    other = FakeStream(0, [])
    other.handle = 0x999
    cuda.record_stream(view, other)
    assert block.uses == [0x999]
    with pytest.raises(ValueError, match="cuda:0"):
        cuda.record_stream(t, FakeStream(1, []))
    del t
    gc.collect()
    assert alloc.freed == 0  # the view keeps the storage
    del view
    gc.collect()
    assert alloc.freed == 1 and not alloc.live


class _Capture:
    device, stream_handle = 0, 0x100

    def __init__(self):
        self.aborted = []

    def abort(self, reason):
        self.aborted.append(reason)


@pytest.mark.parametrize("use", [lambda t: t.cpu(), lambda t: t[0, 0].item(),
                                 lambda t: repr(t), lambda t: t.tolist(),
                                 lambda t: t.t().copy_(cutegrad.ones(3, 2))])
def test_host_copies_are_refused_during_capture(fake, use):
    t = cutegrad.zeros(2, 3, device="cuda")
    cap = _Capture()
    capture_guard.register(cap)
    try:
        with pytest.raises(cuda.StreamCaptureError, match="to the host|staging"):
            use(t)
    finally:
        capture_guard.unregister(cap)
    assert cap.aborted
