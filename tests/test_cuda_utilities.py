"""torch.cuda's utilities: seeds, capability queries, memory statistics,
pinned tensors. On the CPU: what each does without a GPU (torch's behaviour:
seeds are kept for later, queries that need a device raise, statistics read
0), pin_memory over a host-memory stand-in for the pinned allocator. On a GPU
(marker gpu): real values, and the non_blocking upload from pinned memory.
"""
import ctypes

import numpy as np
import pytest

import cutegrad
import cutegrad.cuda as cuda
from cutegrad.cuda import pinned, pinned_tensors
from cutegrad.graphs import rng

no_gpu = pytest.mark.skipif(cuda.is_available(), reason="checks the behaviour without a GPU")
gpu = pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU and driver")


@pytest.fixture
def host_pinned(monkeypatch):
    """The pinned allocator backed by ordinary host memory (no driver); lists what it handed out."""
    handed = []

    def take(nbytes):
        buf = ctypes.create_string_buffer(max(nbytes, 1))
        ctypes.memset(buf, 0xFF, max(nbytes, 1))  # garbage, as fresh pinned memory is
        handed.append(buf)
        return ctypes.addressof(buf), len(buf)

    monkeypatch.setattr(pinned, "_take", take)
    monkeypatch.setattr(pinned, "_give_back", lambda ptr, size, event: None)
    return handed


@pytest.fixture
def cuda_seed_restored():
    saved = (rng._initial_seed, {d: g.get_state() for d, g in rng._default_generators.items()})
    yield
    rng._initial_seed = saved[0]
    for d, state in saved[1].items():
        rng._default_generators[d].set_state(state)


@no_gpu
def test_without_gpu_like_torch(cuda_seed_restored):
    cuda.manual_seed(11)  # kept for the generators CUDA makes later, as torch queues it
    assert rng.Generator(0).initial_seed() == 11
    cuda.manual_seed_all(12)
    assert rng.Generator(1).initial_seed() == 12
    assert cuda.is_bf16_supported() is False
    assert (cuda.memory_allocated(), cuda.max_memory_allocated(), cuda.memory_reserved(),
            cuda.max_memory_reserved(), cuda.memory_stats()) == (0, 0, 0, 0, {})
    for f in (cuda.get_device_capability, cuda.get_device_name, cuda.synchronize, cuda.reset_peak_memory_stats,
              cuda.initial_seed, lambda: cutegrad.ones(2).pin_memory()):
        with pytest.raises(cuda.CudaNotAvailableError, match="no CUDA device available"):
            f()
    assert cutegrad.ones(2).is_pinned() is False


def test_manual_seed_all_reaches_existing_generators(cuda_seed_restored):
    g = rng.default_generator(0)
    g.philox_args(8)
    cuda.manual_seed_all(2024)
    assert g.get_state() == (2024, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "bool"])
def test_pin_memory_copies_into_pinned_storage(host_pinned, rng, dtype):
    dt = getattr(cutegrad, dtype if dtype != "bool" else "bool")
    t = cutegrad.tensor(rng.standard_normal((3, 5)) > 0 if dtype == "bool" else rng.standard_normal((3, 5)) * 9,
                        dtype=dt)
    p = t.pin_memory()
    assert len(host_pinned) == 1
    assert p.is_pinned() and not t.is_pinned()
    assert p.device == cutegrad.device("cpu") and p.dtype is t.dtype and p.shape == t.shape
    np.testing.assert_array_equal(p.numpy(), t.numpy())
    assert pinned_tensors.pinned_buffer_of(p).nbytes == t.numel() * t.element_size()
    assert p[1:].is_pinned() and p.t().is_pinned()  # views share the pinned storage
    assert p.pin_memory() is p and len(host_pinned) == 1
    if dtype != "bool":
        t.add_(1)
        assert not np.array_equal(p.numpy(), t.numpy())  # a copy, not a view


def test_pin_memory_of_a_strided_view(host_pinned):
    base = cutegrad.arange(24.0).reshape(4, 6)
    p = base[:, 1::2].pin_memory()
    np.testing.assert_array_equal(p.numpy(), base.numpy()[:, 1::2])
    assert p.is_contiguous() and p.is_pinned()


# -- GPU ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@gpu
def test_gpu_queries_and_memory_stats(cuda_seed_restored):
    major, minor = cuda.get_device_capability()
    assert (major, minor) == (cuda.get_device_properties().major, cuda.get_device_properties().minor)
    assert cuda.is_bf16_supported() == (major >= 8)
    assert isinstance(cuda.get_device_name(), str)
    cuda.manual_seed(7)
    assert cuda.initial_seed() == 7
    a = cutegrad.randn(16, device="cuda")
    cuda.manual_seed(7)
    b = cutegrad.randn(16, device="cuda")
    np.testing.assert_array_equal(a.cpu().numpy(), b.cpu().numpy())
    cuda.synchronize()
    before = cuda.memory_allocated()
    x = cutegrad.empty(1 << 22, device="cuda")
    assert cuda.memory_allocated() >= before + (1 << 24)
    assert cuda.max_memory_allocated() >= cuda.memory_allocated()
    assert cuda.memory_reserved() >= cuda.memory_allocated()
    del x
    cuda.reset_peak_memory_stats()
    assert cuda.max_memory_allocated() == cuda.memory_allocated()


@pytest.mark.gpu
@gpu
def test_gpu_non_blocking_upload_from_pinned_memory(rng):
    host = cutegrad.tensor(rng.standard_normal((256, 33)), dtype=cutegrad.float32).pin_memory()
    assert host.is_pinned()
    dev = host.to("cuda", non_blocking=True)
    buf = pinned_tensors.pinned_buffer_of(host)
    assert buf._event is not None  # the DMA was queued straight from the pinned memory and recorded on it
    np.testing.assert_array_equal(dev.cpu().numpy(), host.numpy())
    plain = cutegrad.ones(4).to("cuda", non_blocking=True)  # not pinned: staged, still correct
    np.testing.assert_array_equal(plain.cpu().numpy(), np.ones(4, np.float32))
    assert not dev.is_pinned()


@pytest.mark.gpu
@gpu
def test_gpu_dataloader_pins_batches(rng):
    from cutegrad.utils.data import DataLoader, TensorDataset
    x = rng.standard_normal((40, 7)).astype(np.float32)
    for workers in (0, 2):
        dl = DataLoader(TensorDataset(x, np.arange(40)), batch_size=8, pin_memory=True, num_workers=workers)
        got = []
        for xb, yb in dl:
            assert xb.is_pinned() and yb.is_pinned()
            got.append(xb.to("cuda", non_blocking=True))
        np.testing.assert_array_equal(np.concatenate([g.cpu().numpy() for g in got]), x)


def test_tensor_cuda_takes_torchs_arguments(monkeypatch):
    """Tensor.cuda(device=None, non_blocking=False): torch's parameters, passed on to the device copy."""
    torch = pytest.importorskip("torch")
    assert "cuda(device=None, non_blocking=False" in torch.Tensor.cuda.__doc__  # torch's parameters, in order
    calls = []
    monkeypatch.setattr(cutegrad.ops, "to_device", lambda t, device, non_blocking=False: calls.append(
        (device, non_blocking)) or t)
    t = cutegrad.ones(3)
    t.cuda()
    t.cuda(1, non_blocking=True)
    t.cuda(device="cuda:0", non_blocking=False)
    assert calls == [("cuda", False), ("cuda:1", True), ("cuda:0", False)]


@pytest.mark.gpu
@gpu
def test_gpu_tensor_cuda_non_blocking_uploads_from_pinned_memory(rng):
    host = cutegrad.tensor(rng.standard_normal((64, 9)), dtype=cutegrad.float32).pin_memory()
    dev = host.cuda(non_blocking=True)
    assert pinned_tensors.pinned_buffer_of(host)._event is not None  # one queued DMA, recorded on the buffer
    np.testing.assert_array_equal(dev.cpu().numpy(), host.numpy())
