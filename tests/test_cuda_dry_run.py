"""The dry-run CUDA device: the frontend, CUDA backend and caching allocator run with
every `_C` call recorded (cutegrad.cuda.dry_run); launch counts are deterministic."""
import numpy as np
import pytest

import cutegrad
import cutegrad.allocator
from cutegrad.backends.cuda import launch
from cutegrad.cuda import driver
from cutegrad.ops import codes as C


def _binary_codes(dry):
    return [(c[1][0], c[1][1]) for c in dry.calls if c[0] == "elementwise"]


def test_add_is_one_binary_launch(dry_cuda):
    a = cutegrad.empty(8, 16, device="cuda")
    b = cutegrad.empty(8, 16, device="cuda")
    dry_cuda.reset()
    out = a + b
    assert dry_cuda.names() == ["elementwise"]
    assert _binary_codes(dry_cuda) == [(launch._BINARY, C.ADD)]
    args = dry_cuda.calls[0][1]
    assert args[3] == (8, 16) and args[4] == out.data_ptr() != a.data_ptr()
    assert out.device == cutegrad.device("cuda") and out.shape == (8, 16)


def test_matmul_is_one_gemm(dry_cuda):
    a = cutegrad.empty(32, 64, device="cuda", dtype=cutegrad.bfloat16)
    b = cutegrad.empty(64, 16, device="cuda", dtype=cutegrad.bfloat16)
    dry_cuda.reset()
    out = a @ b
    assert dry_cuda.names() == ["gemm"]
    assert out.shape == (32, 16) and out.dtype is cutegrad.bfloat16


def test_zeros_is_a_driver_memset_not_a_kernel(dry_cuda):
    cutegrad.zeros(5, 7, device="cuda")
    assert dry_cuda.count() == 0
    assert dry_cuda.launches() == {"cuMemsetD32Async": 1}


def test_backward_counts_are_deterministic(dry_cuda):
    def step():
        x = cutegrad.empty(4, 32, device="cuda").requires_grad_()
        w = cutegrad.empty(32, device="cuda").requires_grad_()
        dry_cuda.reset()
        (x * w).sum().backward()
        return dry_cuda.launches()

    first = step()
    assert step() == first
    # forward mul + sum; backward: ones, two muls, w's grad summed over rows
    assert first["elementwise"] == 3 and first["reduce"] == 2


def test_values_read_back_are_zeros(dry_cuda):
    x = cutegrad.tensor(np.arange(6, dtype=np.float32), device="cuda")
    assert dry_cuda.launches() == {"cuMemcpyHtoDAsync": 1}
    assert x.sum().item() == 0.0
    assert np.array_equal(x.cpu().numpy(), np.zeros(6, np.float32))


def test_new_kernel_entries_are_recorded_without_changes(dry_cuda):
    assert launch._lib().some_future_kernel(1, (2, 3), stream=0) is None
    assert dry_cuda.calls == [("some_future_kernel", (1, (2, 3)), {"stream": 0})]
    dry_cuda.kernels.returns("some_future_kernel", lambda *a, **k: 42)
    assert launch._lib().some_future_kernel() == 42
    assert launch._lib().gemm_specializations() == []


def test_allocations_come_from_the_simulated_allocator(dry_cuda):
    alloc = dry_cuda.allocator()
    assert isinstance(alloc.memory, cutegrad.allocator.SimulatedMemory)
    x = cutegrad.empty(1000, device="cuda")
    assert alloc.memory_stats()["allocated_bytes.all.current"] == 4096
    del x
    assert alloc.memory_stats()["allocated_bytes.all.current"] == 0
    alloc.check_invariants()


def test_streams_and_events_work(dry_cuda):
    s = cutegrad.cuda.Stream()
    with cutegrad.cuda.stream(s):
        y = cutegrad.empty(3, device="cuda") * 2
    assert dry_cuda.calls[-1][1][-1] == s.handle
    ev = cutegrad.cuda.Event()
    ev.record(s)
    cutegrad.cuda.current_stream().wait_event(ev)
    cutegrad.cuda.synchronize()
    assert y.shape == (3,)


def test_unsimulated_driver_call_names_itself(dry_cuda):
    with pytest.raises(NotImplementedError, match="cuStreamBeginCapture"):
        driver.call("cuStreamBeginCapture", 0, 0)


def test_state_is_restored_after_the_block():
    available = cutegrad.cuda.is_available()  # first: it initialises the driver state compared below
    before = (driver._drv, driver._init_failure, launch._native, dict(cutegrad.allocator._default_allocators),
              available)
    with cutegrad.cuda.dry_run() as dry:
        cutegrad.ones(4, device="cuda") + 1
        assert cutegrad.cuda.is_available() and cutegrad.cuda.device_count() == 1
        with pytest.raises(RuntimeError, match="already active"):
            dry.__enter__()
    after = (driver._drv, driver._init_failure, launch._native, dict(cutegrad.allocator._default_allocators),
             cutegrad.cuda.is_available())
    assert after == before
    assert dry.count("elementwise") == 1


def test_two_devices(rng):
    with cutegrad.cuda.dry_run(devices=2) as dry:
        x = cutegrad.empty(4, device="cuda:1")
        y = x + x
        assert y.device == cutegrad.device("cuda:1")
        assert dry.allocator(1).memory_stats()["allocated_bytes.all.current"] == 1024
        assert dry.allocator(0).memory_stats()["allocated_bytes.all.current"] == 0


def test_training_step_allocations_take_the_fast_path(dry_cuda):
    """Once a step repeats, its allocations are exact-size hits of the allocator's fast path."""
    from cutegrad.models import build_model
    from cutegrad.models.presets import PRESETS
    from cutegrad.train import build_optimizer, loss_fn
    preset = PRESETS["minigpt"]  # the full size: the CPU preset's step is too small to fragment
    model = build_model(preset.model).to("cuda")
    opt = build_optimizer(model, preset.optimizer)
    shape = (preset.batch_size, preset.model.block_size)
    idx = cutegrad.randint(0, preset.model.vocab_size, shape, device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with cutegrad.autocast("cuda", dtype=cutegrad.bfloat16):
            loss = loss_fn(model, idx, idx)
        loss.backward()
        cutegrad.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    alloc = dry_cuda.allocator()
    for _ in range(12):
        step()
    general = alloc._malloc_general
    misses = []
    alloc._malloc_general = lambda nbytes, stream: misses.append(nbytes) or general(nbytes, stream)
    before = alloc._n_alloc_total
    step()
    total = alloc._n_alloc_total - before
    assert total > 300
    assert len(misses) <= 0.05 * total
    alloc.check_invariants()
