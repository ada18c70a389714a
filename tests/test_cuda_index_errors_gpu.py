"""Deferred device-side index bounds errors (cutegrad.cuda.index_errors).

On CUDA, gather / index_select / scatter_add / index_add / embedding /
one_hot(num_classes given) do not read their index tensor back: a kernel
skips an out-of-range index and records it, and the host raises IndexError at
its next wait for the device. These tests check each op's message (index,
dimension, size, op), every wait point, recovery (the process, the allocator
and later ops keep working), that valid indices never raise, that the eager
path makes no host read, and that a captured embedding lookup replays and
reports a bad index written into its static input.

The first two tests exercise the host half (record -> message) and run
without a GPU.
"""
import re

import numpy as np
import pytest

import cutegrad as cg
import cutegrad.cuda as cuda
import cutegrad.graphs as graphs
from cutegrad.cuda import index_errors

def _fake_record(dev):
    rec = index_errors._Record()
    index_errors._records[dev] = (rec, 0)
    return rec


def test_pending_record_raises_once_with_the_cpu_wording():
    dev = 1000  # no real device has this index: the entry is the test's own
    rec = _fake_record(dev)
    try:
        index_errors.raise_pending(dev)  # flag 0: nothing to raise
        rec.op, rec.dim, rec.index, rec.size, rec.flag = index_errors.INDEX_SELECT, 0, 37, 10, 1
        assert index_errors.pending(dev).startswith("index 37 is out of bounds")
        with pytest.raises(IndexError) as err:
            index_errors.raise_pending(dev)
        assert str(err.value) == ("index 37 is out of bounds for dimension 0 with size 10 (index_select on "
                                  "cuda:1000, detected on the device by a kernel queued earlier)")
        assert rec.flag == 0 and index_errors.pending(dev) is None
        index_errors.raise_pending(dev)  # cleared: a second wait does not raise again
    finally:
        del index_errors._records[dev]


def test_record_layout_matches_the_kernel_struct():
    # kernels/cuda/ops_args.h IndexErrorRecord: int flag, op, dim, reserved; int64 index, size
    R = index_errors._Record
    assert [(f, getattr(R, f).offset) for f, _ in R._fields_] == [
        ("flag", 0), ("op", 4), ("dim", 8), ("reserved", 12), ("index", 16), ("size", 24)]
    assert index_errors.ctypes.sizeof(R) == 32


# ---- on the GPU -------------------------------------------------------------

@pytest.fixture
def clean_device():
    """The device has no error pending before the test and none left after it."""
    if not cuda.is_available():
        pytest.skip("needs a CUDA GPU and driver")
    cuda.synchronize()
    yield
    cuda.synchronize()  # raises if the test left an error unconsumed
    assert index_errors.pending(cuda.current_device()) is None


def _msg(index, dim, size, op):
    return re.escape(f"index {index} is out of bounds for dimension {dim} with size {size} ({op} on cuda:0, "
                     f"detected on the device by a kernel queued earlier)")


def _t(values, dtype=cg.float32):
    return cg.tensor(np.asarray(values), dtype=dtype, device="cuda")


def _bad_cases():
    """(name, thunk returning the output, expected (index, dim, size, op), numpy check of the output)."""
    x = np.arange(30, dtype=np.float32).reshape(3, 10)
    w = np.arange(40, dtype=np.float32).reshape(10, 4)

    def gather():
        return cg.gather(_t(x), 1, _t([[0, 37], [1, 2], [9, 3]], cg.int64))

    def gather_ref(out):
        np.testing.assert_array_equal(out, [[0, 0], [11, 12], [29, 23]])  # the bad position reads 0

    def index_select():
        return cg.index_select(_t(w), 0, _t([3, 37, 9], cg.int64))

    def index_select_ref(out):
        np.testing.assert_array_equal(out, np.stack([w[3], np.zeros(4, np.float32), w[9]]))

    def index_select_negative():
        return cg.index_select(_t(w), 0, _t([-1, 2], cg.int32))

    def index_select_negative_ref(out):
        np.testing.assert_array_equal(out, np.stack([np.zeros(4, np.float32), w[2]]))

    def scatter_add():
        return cg.scatter_add(_t(x), 1, _t([[37], [4], [0]], cg.int64), _t(np.ones((3, 1))))

    def scatter_add_ref(out):
        ref = x.copy()
        ref[1, 4] += 1
        ref[2, 0] += 1
        np.testing.assert_array_equal(out, ref)

    def index_add_rows():  # float, dim 0: the deterministic (embedding backward) path
        return cg.index_add(_t(w), 0, _t([2, 37, 2], cg.int64), _t(np.ones((3, 4))))

    def index_add_rows_ref(out):
        ref = w.copy()
        ref[2] += 2
        np.testing.assert_array_equal(out, ref)

    def index_add_atomic():  # int64 along dim 1: the atomic scatter path
        return cg.index_add(_t(x, cg.int64), 1, _t([37, 5], cg.int64), _t(np.ones((3, 2)), cg.int64))

    def index_add_atomic_ref(out):
        ref = x.astype(np.int64)
        ref[:, 5] += 1
        np.testing.assert_array_equal(out, ref)

    def embedding():
        return cg.nn.functional.embedding(_t([[1, 2], [37, 0]], cg.int64), _t(w))

    def embedding_ref(out):
        np.testing.assert_array_equal(out, np.stack([w[[1, 2]], np.stack([np.zeros(4, np.float32), w[0]])]))

    def one_hot():
        return cg.nn.functional.one_hot(_t([1, 37, 0], cg.int64), 10)

    def one_hot_ref(out):
        np.testing.assert_array_equal(out, np.eye(10, dtype=np.int64)[[1, 0, 0]] * np.array([[1], [0], [1]]))

    return [
        ("gather", gather, (37, 1, 10, "gather"), gather_ref),
        ("index_select", index_select, (37, 0, 10, "index_select"), index_select_ref),
        ("index_select_negative", index_select_negative, (-1, 0, 10, "index_select"), index_select_negative_ref),
        ("scatter_add", scatter_add, (37, 1, 10, "scatter_add"), scatter_add_ref),
        ("index_add_rows", index_add_rows, (37, 0, 10, "index_add"), index_add_rows_ref),
        ("index_add_atomic", index_add_atomic, (37, 1, 10, "index_add"), index_add_atomic_ref),
        ("embedding", embedding, (37, 0, 10, "index_select"), embedding_ref),
        ("one_hot", one_hot, (37, 1, 10, "one_hot"), one_hot_ref),
    ]


_CASES = {c[0]: c for c in _bad_cases()}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(_CASES))
def test_bad_index_raises_at_the_next_sync_and_the_output_skips_it(name, clean_device):
    _, run, (index, dim, size, op), check = _CASES[name]
    out = run()  # queues the kernel; nothing is read back, nothing raises yet
    with pytest.raises(IndexError, match=_msg(index, dim, size, op)):
        cuda.synchronize()
    cuda.synchronize()  # the record was cleared: the same error is not raised twice
    check(out.cpu().numpy())  # the bad index was skipped; every other position is right


WAITS = {
    "synchronize": lambda out: cuda.synchronize(),
    "stream": lambda out: cuda.current_stream().synchronize(),
    "event": lambda out: _recorded_event().synchronize(),
    "cpu": lambda out: out.cpu(),
    "item": lambda out: out.sum().item(),
    "tolist": lambda out: out.tolist(),
    "repr": lambda out: repr(out),
}


def _recorded_event():
    ev = cuda.Event()
    ev.record()
    return ev


@pytest.mark.gpu
@pytest.mark.parametrize("wait", list(WAITS))
def test_every_host_wait_surfaces_the_error(wait, clean_device):
    w = _t(np.ones((10, 3)))
    out = cg.index_select(w, 0, _t([4, 12], cg.int64))
    with pytest.raises(IndexError, match=_msg(12, 0, 10, "index_select")):
        WAITS[wait](out)


@pytest.mark.gpu
def test_the_first_bad_index_wins_until_the_host_clears_it(clean_device):
    w = _t(np.ones((10, 3)))
    cg.index_select(w, 0, _t([11], cg.int64))
    cg.gather(_t(np.ones((2, 5))), 1, _t([[0, 99]], cg.int64))  # queued after: does not overwrite
    with pytest.raises(IndexError, match=_msg(11, 0, 10, "index_select")):
        cuda.synchronize()
    cg.gather(_t(np.ones((2, 5))), 1, _t([[0, 99]], cg.int64))
    with pytest.raises(IndexError, match=_msg(99, 1, 5, "gather")):
        cuda.synchronize()


@pytest.mark.gpu
def test_many_bad_indices_report_one_of_them_and_later_work_is_normal(clean_device, rng):
    w = rng.standard_normal((50, 8)).astype(np.float32)
    bad = rng.integers(50, 10_000, 100_003)
    cg.index_select(_t(w), 0, _t(bad, cg.int64))
    with pytest.raises(IndexError) as err:
        cuda.synchronize()
    got = int(re.match(r"index (\d+) is out of bounds for dimension 0 with size 50 \(index_select",
                       str(err.value)).group(1))
    assert got in set(bad.tolist())
    # the process, the allocator and later ops are unaffected
    for n in (1, 7, 1000, 65_537):
        idx = rng.integers(0, 50, n)
        blocks = [cg.empty(n, 8, device="cuda") for _ in range(3)]
        out = cg.index_select(_t(w), 0, _t(idx, cg.int64)).cpu().numpy()
        np.testing.assert_array_equal(out, w[idx])
        del blocks
    cuda.empty_cache()


@pytest.mark.gpu
def test_valid_indices_never_raise(clean_device, rng):
    for _ in range(20):
        rows, cols = int(rng.integers(1, 70)), int(rng.integers(1, 33))
        w = rng.standard_normal((rows, cols))
        idx = rng.integers(0, rows, int(rng.integers(1, 300)))
        np.testing.assert_array_equal(cg.index_select(_t(w), 0, _t(idx, cg.int64)).cpu().numpy(),
                                      w[idx].astype(np.float32))
        emb = cg.nn.functional.embedding(_t(idx.reshape(1, -1), cg.int32), _t(w)).cpu().numpy()
        np.testing.assert_array_equal(emb, w[idx][None].astype(np.float32))
        g = rng.integers(0, cols, (rows, 5))
        np.testing.assert_array_equal(cg.gather(_t(w), 1, _t(g, cg.int64)).cpu().numpy(),
                                      np.take_along_axis(w, g, 1).astype(np.float32))
        acc = cg.index_add(_t(np.zeros((rows, cols)), cg.float64), 0, _t(idx, cg.int64),
                           _t(np.ones((idx.size, cols)), cg.float64)).cpu().numpy()
        np.testing.assert_array_equal(acc[:, 0], np.bincount(idx, minlength=rows))
        oh = cg.nn.functional.one_hot(_t(g.reshape(-1), cg.int64), cols).cpu().numpy()
        np.testing.assert_array_equal(oh, np.eye(cols, dtype=np.int64)[g.reshape(-1)])
    cuda.synchronize()


@pytest.mark.gpu
def test_eager_indexing_reads_nothing_back(clean_device, monkeypatch):
    import cutegrad.cuda.tensors as T
    w = cg.tensor(np.ones((10, 4), np.float32), device="cuda", requires_grad=True)
    idx = _t([[1, 2, 3], [9, 0, 1]], cg.int64)
    src = _t(np.ones((3, 4)))

    def refuse(*a, **k):
        raise AssertionError("an index op copied a CUDA tensor to the host")

    monkeypatch.setattr(T, "_download_span", refuse)
    out = cg.nn.functional.embedding(idx, w)
    out.sum().backward()  # embedding backward: deterministic index_add
    cg.gather(w.detach(), 1, _t([[0, 3]], cg.int64))
    cg.scatter_add(w.detach(), 0, _t([[1, 2, 3, 4]], cg.int64), _t(np.ones((1, 4))))
    cg.index_add(w.detach(), 0, _t([0, 9, 9], cg.int64), src)
    cg.nn.functional.one_hot(idx, 10)
    monkeypatch.undo()
    np.testing.assert_array_equal(w.grad.cpu().numpy()[:, 0], np.bincount([1, 2, 3, 9, 0, 1], minlength=10))


@pytest.mark.gpu
def test_captured_embedding_replays_and_reports_a_bad_static_index(clean_device):
    s = cuda.Stream()
    s.wait_stream(cuda.current_stream())
    with cuda.stream(s):
        w = cg.tensor(np.arange(40, dtype=np.float32).reshape(10, 4), device="cuda")
        idx = cg.tensor(np.array([[1, 2], [3, 4]]), dtype=cg.int64, device="cuda")
        grad_src = cg.ones((4, 4), device="cuda")
        cg.nn.functional.embedding(idx, w)  # warm-up outside the capture
        cg.index_add(cg.zeros((10, 4), device="cuda"), 0, idx.reshape(-1), grad_src)
    s.synchronize()
    g = graphs.CUDAGraph()
    with graphs.graph(g, stream=s):  # any host read in here would abort the capture
        out = cg.nn.functional.embedding(idx, w)
        acc = cg.index_add(cg.zeros((10, 4), device="cuda"), 0, idx.reshape(-1), grad_src)
    w_np = np.arange(40, dtype=np.float32).reshape(10, 4)
    for rows in ([[0, 9], [5, 5]], [[7, 1], [2, 3]]):
        with cuda.stream(s):
            idx.copy_(cg.tensor(np.array(rows), dtype=cg.int64, device="cuda"))
        g.replay(s)
        s.synchronize()
        np.testing.assert_array_equal(out.cpu().numpy(), w_np[np.array(rows)])
        np.testing.assert_array_equal(acc.cpu().numpy()[:, 0], np.bincount(np.ravel(rows), minlength=10))
    with cuda.stream(s):
        idx.copy_(cg.tensor(np.array([[1, 2], [3, 37]]), dtype=cg.int64, device="cuda"))
    g.replay(s)
    with pytest.raises(IndexError, match=_msg(37, 0, 10, "index_select")):
        s.synchronize()
    with cuda.stream(s):
        idx.copy_(cg.tensor(np.array([[4, 4], [0, 1]]), dtype=cg.int64, device="cuda"))
    g.replay(s)
    s.synchronize()  # a good replay after the bad one: nothing pending
    np.testing.assert_array_equal(out.cpu().numpy(), w_np[[[4, 4], [0, 1]]])
    g.reset()
