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


@pytest.mark.parametrize("op,launches", [("mul", 1), ("div", 1), ("sub", 0)])
def test_backward_computes_no_gradient_for_an_input_that_needs_none(dry_cuda, op, launches):
    """x op c with only x requiring grad: the backward launches x's gradient alone (sub's is g itself)."""
    x = cutegrad.empty(4, 32, device="cuda").requires_grad_()
    c = cutegrad.empty(4, 32, device="cuda")
    y = getattr(x, op)(c)
    dry_cuda.reset()
    y.backward(cutegrad.empty(4, 32, device="cuda"))
    assert dry_cuda.count("elementwise") == launches + 1  # + the copy of the given gradient (backward clones it)
    assert x.grad.shape == x.shape


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


def test_bf16_attention_backward_runs_with_workspaces_sized_like_C(dry_cuda):
    q, k, v = (cutegrad.randn(2, 3, 70, 32, device="cuda", dtype=cutegrad.bfloat16).requires_grad_()
               for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert dry_cuda.count("attention_backward") == 1
    assert [g.shape for g in (q.grad, k.grad, v.grad)] == [q.shape] * 3


@pytest.mark.parametrize("args", [(2, 65, 4, 129, 64, False), (2, 65, 4, 129, 64, True), (1, 1, 1, 1, 32, True),
                                  (3, 128, 2, 257, 128, True)])
def test_attention_backward_workspace_stand_in_matches_C(args):
    from cutegrad._gemm import native
    from cutegrad.cuda.dry_run import QUERIES
    try:
        lib = native()
    except ImportError as e:
        pytest.skip(f"cutegrad._C is not built here: {e}")
    assert QUERIES["attention_backward_workspace"](*args) == tuple(lib.attention_backward_workspace(*args))


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


def test_fused_optimizer_step_and_clipping_are_one_call_each(dry_cuda):
    params = [cutegrad.zeros(10, 3, device="cuda").requires_grad_() for _ in range(60)]
    for p in params:
        p.grad = cutegrad.zeros_like(p)
    opt = cutegrad.optim.AdamW(params, lr=1e-3)
    opt.step()  # the first step also creates the optimizer state
    dry_cuda.reset()
    opt.step()
    cutegrad.nn.utils.clip_grad_norm_(params, 1.0)
    assert dry_cuda.launches() == {"adamw": 1, "grad_norm": 1, "multi_tensor_scale": 1}
    (name, args, _), = [c for c in dry_cuda.calls if c[0] == "adamw"]
    assert len(args[0]) == 60  # one pointer per parameter in one call (the kernel chunks them)


F = cutegrad.nn.functional


def _ops(dev):
    """name -> zero-argument callable running one op on `dev` (the same inputs on every device)."""
    g = np.random.default_rng(0)

    def t(*s, dtype=cutegrad.float32, grad=False):
        x = cutegrad.tensor(g.standard_normal(s).astype(np.float32), device=dev).to(dtype)
        return x.requires_grad_() if grad else x

    def grad_of(op, *shapes):
        inputs = [t(*s, grad=True) for s in shapes]
        op(*inputs).sum().backward()
        return inputs[-1].grad

    x, y = t(4, 6), t(4, 6)
    i = cutegrad.tensor([0, 2, 1, 3], device=dev)
    zeros_idx = cutegrad.zeros(4, 6, dtype=cutegrad.int64, device=dev)
    return {
        "exp": lambda: x.exp(),
        "add_bcast": lambda: x + t(6),
        "mul_scalar": lambda: x * 3,
        "where": lambda: cutegrad.where(x > 0, x, y),
        "clamp": lambda: x.clamp(-0.5, 0.5),
        "gelu": lambda: F.gelu(x),
        "sum": lambda: x.sum(1),
        "mean_all": lambda: x.mean(),
        "amax": lambda: x.amax(0),
        "argmax": lambda: x.argmax(1),
        "var": lambda: x.var(1),
        "logsumexp": lambda: x.logsumexp(1),
        "matmul": lambda: x @ t(6, 3),
        "bmm": lambda: t(2, 4, 6) @ t(2, 6, 5),
        "softmax": lambda: F.softmax(x, -1),
        "log_softmax": lambda: F.log_softmax(x, 0),
        "layer_norm": lambda: F.layer_norm(x, (6,), t(6), t(6)),
        "rms_norm": lambda: F.rms_norm(x, (6,), t(6)),
        "gather": lambda: x.gather(1, zeros_idx[:, :2]),
        "index_select": lambda: x.index_select(0, i),
        "index_add": lambda: x.index_add(0, i, y),
        "scatter_add": lambda: x.scatter_add(1, zeros_idx, y),
        "getitem": lambda: x[1:3, ::2],
        "adv_index": lambda: x[i],
        "sort": lambda: x.sort(1)[0],
        "topk": lambda: x.topk(2, 1)[1],
        "cumsum": lambda: x.cumsum(1),
        "cat": lambda: cutegrad.cat([x, y], 0),
        "one_hot": lambda: F.one_hot(i, 5),
        "cast": lambda: x.to(cutegrad.bfloat16),
        "contiguous": lambda: x.t().contiguous(),
        "arange": lambda: cutegrad.arange(7, device=dev),
        "full": lambda: cutegrad.full((3,), 2.0, device=dev),
        "embedding": lambda: F.embedding(i, t(5, 3)),
        "cross_entropy": lambda: F.cross_entropy(x, i),
        "dropout": lambda: F.dropout(x, 0.5),
        "sdpa": lambda: F.scaled_dot_product_attention(t(1, 2, 4, 8), t(1, 2, 4, 8), t(1, 2, 4, 8), is_causal=True),
        "mul_backward": lambda: grad_of(lambda a: a * a, (3, 3)),
        "layer_norm_backward": lambda: grad_of(lambda a, w: F.layer_norm(a, (4,), w), (2, 4), (4,)),
    }


_VIEWS = {"getitem"}


@pytest.mark.parametrize("name", sorted(_ops("cpu")))
def test_every_backend_kernel_runs_on_the_dry_device(name):
    """Each op reaches the CUDA backend and _C without a GPU; shape and dtype match the CPU op's."""
    expected = _ops("cpu")[name]()
    with cutegrad.cuda.dry_run() as dry:
        fn = _ops("cuda")[name]
        dry.reset()
        out = fn()
        assert out.device == cutegrad.device("cuda")
        assert (out.shape, out.dtype) == (expected.shape, expected.dtype)
        assert (sum(dry.launches().values()) == 0) == (name in _VIEWS)
