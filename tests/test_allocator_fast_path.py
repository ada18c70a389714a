"""The allocator's native exact-size hit (cutegrad._C.AllocatorFastPath) against its
Python twin (PythonCachingAllocator): same blocks, same statistics, same errors,
and no call into the Python policy on a hit. CPU only (SimulatedMemory)."""

import gc
import random
import weakref

import numpy as np
import pytest

from cutegrad.allocator import OutOfMemoryError, SimulatedMemory, parse_config
from cutegrad.allocator.block import ALLOCATED, QUICK, Block, BlockPool, Segment
from cutegrad.allocator.caching import NATIVE_FAST_PATH, CachingAllocator, PythonCachingAllocator

pytestmark = pytest.mark.skipif(not NATIVE_FAST_PATH, reason="cutegrad._C (with AllocatorFastPath) is not built")

KiB = 1 << 10
MiB = 1 << 20


def pair(conf=""):
    """A native allocator and its Python twin, each over its own simulated device."""
    return [cls(SimulatedMemory(), parse_config(conf)) for cls in (CachingAllocator, PythonCachingAllocator)]


class PolicyCalls:
    """Counts the calls a native allocator makes into the Python policy."""

    def __init__(self, alloc):
        self.mallocs = self.frees = 0
        malloc_slow, free_slow = alloc._malloc_slow, alloc._free_slow

        def counted_malloc(*args, **kwargs):
            self.mallocs += 1
            return malloc_slow(*args, **kwargs)

        def counted_free(*args, **kwargs):
            self.frees += 1
            return free_slow(*args, **kwargs)
        alloc._malloc_slow, alloc._free_slow = counted_malloc, counted_free


def test_allocator_is_native_where_c_is_built():
    assert type(CachingAllocator(SimulatedMemory())).malloc.__qualname__ == "AllocatorFastPath.malloc"
    assert type(PythonCachingAllocator(SimulatedMemory())).malloc.__qualname__ == "PythonFastPath.malloc"


@pytest.mark.parametrize("seed", [1, 2])
def test_native_and_python_hand_out_the_same_blocks(seed):
    """The same random program (sizes that repeat and sizes that do not, two streams,
    cross-stream uses, frees in any order) on both: identical addresses, statistics
    and snapshots after every step."""
    rnd = random.Random(seed)
    native, python = pair("max_split_size_mb:8")
    live = []
    sizes = [rnd.choice([1, 300, 512, 4 * KiB, 70 * KiB, 3 * MiB]) + rnd.randrange(2) * rnd.randrange(20000)
             for _ in range(40)]
    for step in range(3000):
        op = rnd.random()
        if op < 0.55 or not live:
            nbytes, stream = rnd.choice(sizes), rnd.choice((0, 7))
            got = (native.malloc(nbytes, stream), python.malloc(nbytes, stream))
            assert (got[0].ptr, got[0].size) == (got[1].ptr, got[1].size), step
            live.append(got)
        elif op < 0.6:
            b_native, b_python = live[rnd.randrange(len(live))]
            if b_native.stream == 0:
                native.record_stream(b_native, 7)
                python.record_stream(b_python, 7)
        elif op < 0.62:
            for alloc in (native, python):
                alloc.memory.complete(7)
        else:
            b_native, b_python = live.pop(rnd.randrange(len(live)))
            native.free(b_native)
            python.free(b_python)
        if step % 100 == 0:
            assert native.memory_stats() == python.memory_stats(), step
            assert native.memory_snapshot() == python.memory_snapshot(), step
            native.check_invariants()
    assert native.memory_stats() == python.memory_stats()


def test_a_repeated_size_never_reaches_the_python_policy():
    alloc = CachingAllocator(SimulatedMemory(), parse_config(""))
    for nbytes in (100, 64 * KiB, 2 * MiB):
        alloc.free(alloc.malloc(nbytes, 3))             # the miss that files the size
    calls = PolicyCalls(alloc)
    for _ in range(10):
        blocks = [alloc.malloc(nbytes, 3) for nbytes in (100, 64 * KiB, 2 * MiB)]
        for b in blocks:
            alloc.free(b)
    assert (calls.mallocs, calls.frees) == (0, 0)
    stats = alloc.memory_stats()
    assert stats["allocation.all.allocated"] == 33 and stats["allocation.all.current"] == 0
    assert stats["requested_bytes.all.allocated"] == 11 * (100 + 64 * KiB + 2 * MiB)
    assert stats["allocated_bytes.all.peak"] == 512 + 64 * KiB + 2 * MiB
    alloc.check_invariants()


def test_every_other_case_goes_to_the_python_policy():
    alloc = CachingAllocator(SimulatedMemory(), parse_config(""))
    alloc.free(alloc.malloc(4 * KiB))
    calls = PolicyCalls(alloc)
    b = alloc.malloc(8 * KiB)                           # a size not filed
    alloc.free(alloc.malloc(np.int64(4 * KiB)))         # not an int
    alloc.free(alloc.malloc(4 * KiB, stream=0))         # a keyword
    assert calls.mallocs == 3 and calls.frees == 0
    alloc.record_stream(b, 5)
    alloc.free(b)                                       # used on another stream
    assert calls.frees == 1
    alloc.check_invariants()


def test_bad_calls_raise_the_python_errors():
    alloc = CachingAllocator(SimulatedMemory(), parse_config(""))
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        alloc.malloc(-1)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        alloc.malloc(1.5)
    with pytest.raises(TypeError, match="expected a Block"):
        alloc.free("block")
    b = alloc.malloc(1000)
    alloc.free(b)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(b)                                   # filed QUICK: a double free
    other = CachingAllocator(SimulatedMemory(base=0x100000000000), parse_config(""))
    with pytest.raises(ValueError, match="does not belong to this allocator"):
        other.free(alloc.malloc(1000))
    with pytest.raises(TypeError):
        alloc.malloc(1, 0, 2)
    with pytest.raises(OutOfMemoryError):
        alloc.malloc(1 << 62)                           # past the native hit's range: Python's ladder
    alloc.check_invariants()


def test_queued_frees_are_drained_by_the_native_hit():
    """A free that finds the token taken is queued; the next native hit frees it."""
    alloc = CachingAllocator(SimulatedMemory(), parse_config(""))
    alloc.free(alloc.malloc(4 * KiB))
    a = alloc.malloc(8 * KiB)
    token = alloc._token.pop()                          # as if another thread held the allocator
    alloc.free(a)
    assert alloc._pending_frees == [a] and a.state == ALLOCATED
    alloc._token.append(token)
    b = alloc.malloc(4 * KiB)                           # a hit; then the queue is drained
    assert alloc._pending_frees == [] and a.state == QUICK
    alloc.free(b)
    assert alloc.memory_stats()["allocation.all.current"] == 0
    alloc.check_invariants()


def test_closed_fast_path_takes_the_general_path():
    """During a capture (and with poisoning) the native entries serve nothing themselves."""
    mem = SimulatedMemory()
    alloc = CachingAllocator(mem, parse_config(""))
    alloc.free(alloc.malloc(4 * KiB, 1))
    pool = alloc.new_pool_id()
    mem.begin_capture(1)
    alloc.begin_allocate_to_pool(pool, 1)
    calls = PolicyCalls(alloc)
    b = alloc.malloc(4 * KiB, 1)
    assert b.pool is not alloc._small and calls.mallocs == 1
    alloc.free(b)
    assert calls.frees == 1
    alloc.end_allocate_to_pool(pool)
    mem.end_capture(1)
    assert mem.violations == []
    poisoned = CachingAllocator(SimulatedMemory(backing=True), parse_config(""), poison_freed_blocks=True)
    calls = PolicyCalls(poisoned)
    poisoned.free(poisoned.malloc(1000))
    poisoned.free(poisoned.malloc(1000))
    assert (calls.mallocs, calls.frees) == (2, 2)
    alloc.check_invariants()
    poisoned.check_invariants()


def test_counters_are_plain_attributes_of_the_policy():
    alloc = CachingAllocator(SimulatedMemory(), parse_config(""))
    alloc.malloc(1000)
    assert (alloc._n_alloc, alloc._bytes_alloc, alloc._bytes_req) == (1, 1024, 1000)
    alloc._bytes_req += 1
    with pytest.raises(AssertionError, match="requested bytes"):
        alloc.check_invariants()
    with pytest.raises(TypeError):
        alloc._slow = 1                                 # a flag takes a bool only


def test_bind_layout_checks_the_classes():
    from cutegrad._C import AllocatorFastPath

    class NoSlots:
        pass
    with pytest.raises(TypeError, match="NoSlots.state"):
        AllocatorFastPath.bind_layout(NoSlots, Segment, BlockPool, ALLOCATED, QUICK)
    with pytest.raises(TypeError, match="three classes"):
        AllocatorFastPath.bind_layout(Block, Segment, BlockPool)
    alloc = CachingAllocator(SimulatedMemory(), parse_config(""))   # the failed calls changed nothing
    alloc.free(alloc.malloc(1000))
    calls = PolicyCalls(alloc)
    alloc.free(alloc.malloc(1000))
    assert (calls.mallocs, calls.frees) == (0, 0)


def test_an_allocator_is_collected():
    alloc = CachingAllocator(SimulatedMemory(), parse_config(""))
    alloc.free(alloc.malloc(1000))
    ref = weakref.ref(alloc)
    del alloc
    gc.collect()
    assert ref() is None


def test_an_op_on_the_dry_run_device_allocates_natively(dry_cuda):
    """The dry-run device's allocator is the native one: in the steady state an add's
    output is taken and given back without a call into the Python policy."""
    import cutegrad
    a, b = cutegrad.randn(64, 256, device="cuda"), cutegrad.randn(64, 256, device="cuda")
    alloc = dry_cuda.allocator()
    assert type(alloc) is CachingAllocator
    a + b
    calls = PolicyCalls(alloc)
    for _ in range(5):
        a + b
    assert (calls.mallocs, calls.frees) == (0, 0)
    assert dry_cuda.count("elementwise") == 6


# ---------------------------------------------------------------- outputs built in C (_C.device_tensor)

TENSOR_SLOTS = ("_storage", "_shape", "_strides", "_offset", "_dtype", "_np", "_requires_grad", "_grad",
                "grad_fn", "_base", "_hooks", "_retains_grad", "_accum", "_base_fn")


def python_empty(launch, shape, dtype, dev, stream):
    """launch._empty with the C constructor switched off: the Python reference."""
    native, launch._device_tensor = launch._device_tensor, None
    try:
        return launch._empty(shape, dtype, dev, stream)
    finally:
        launch._device_tensor = native


@pytest.mark.parametrize("shape", [(64, 256), (), (3, 0, 5), (1, 7, 1), (2, 3, 4, 5)])
def test_device_tensor_builds_what_empty_builds_in_python(dry_cuda, shape):
    import cutegrad
    from cutegrad.backends.cuda import launch
    a = cutegrad.zeros(1, device="cuda")                 # the first output binds _C.device_tensor
    assert launch._device_tensor is not None
    dev, alloc = a.device, dry_cuda.allocator()
    for dtype in (cutegrad.float32, cutegrad.bfloat16, cutegrad.int64, cutegrad.bool):
        ours, ref = launch._empty(shape, dtype, dev, 0), python_empty(launch, shape, dtype, dev, 0)
        assert type(ours) is type(ref) and type(ours._storage) is type(ref._storage)
        for name in TENSOR_SLOTS[1:]:
            assert getattr(ours, name) == getattr(ref, name), name
        st, st_ref = ours._storage, ref._storage
        assert (st.device, st.version, st.allocator) == (st_ref.device, st_ref.version, alloc)
        assert (st.data.requested, st.data.state, st.data.stream) == (st_ref.data.requested, ALLOCATED, 0)
        assert ours.is_contiguous() and ours._strides is ref._strides
    del ours, ref, st, st_ref
    assert alloc.memory_stats()["allocation.all.current"] == 1   # only `a`: the outputs gave their blocks back
    alloc.check_invariants()


def test_device_tensor_takes_any_shape_the_python_path_takes(dry_cuda):
    import cutegrad
    from cutegrad.backends.cuda import launch
    a = cutegrad.zeros(1, device="cuda")
    dev, f32 = a.device, cutegrad.float32
    t = launch._empty(a.shape.__class__((4, 8)), f32, dev, 0)          # a Size
    assert t.shape == (4, 8) and t._storage.data.requested == 128
    t = launch._empty((np.int64(4), 8), f32, dev, 0)                   # NumPy integers
    assert t._storage.data.requested == 128
    with pytest.raises(TypeError, match="shape must be a tuple"):
        launch._device_tensor(dry_cuda.allocator(), [4, 8], f32, dev, 0)


def test_device_tensor_calls_an_instance_malloc(dry_cuda):
    """A malloc set on the allocator object (bench/e2e.py's timer) is the one called."""
    import cutegrad
    a = cutegrad.zeros(64, device="cuda")
    alloc = dry_cuda.allocator()
    seen = []
    alloc.malloc = lambda nbytes, stream=0: seen.append(nbytes) or type(alloc).malloc(alloc, nbytes, stream)
    try:
        a + a
    finally:
        del alloc.malloc
    assert seen == [256]


def test_poisoned_outputs_are_built_in_python(dry_cuda):
    import cutegrad
    from cutegrad.backends.cuda import launch
    a = cutegrad.zeros(64, device="cuda")
    launch.set_poison_outputs(True)
    try:
        del dry_cuda.work[:]
        a + a
        assert [w[0] for w in dry_cuda.work] == ["cuMemsetD8Async"]
    finally:
        launch.set_poison_outputs(False)


def test_bind_device_tensor_refuses_classes_it_does_not_fill():
    from cutegrad import dtypes
    from cutegrad._C import bind_device_tensor
    from cutegrad.cuda.tensors import DeviceStorage
    from cutegrad.tensor import Tensor, contiguous_strides

    class Wider(Tensor):
        __slots__ = ("_extra",)
    with pytest.raises(TypeError, match="Wider's __slots__ are not the ones device_tensor writes"):
        bind_device_tensor(Wider, DeviceStorage, dtypes.DType, {}, contiguous_strides)
    with pytest.raises(TypeError, match="bind_device_tensor"):
        bind_device_tensor(Tensor, DeviceStorage)
