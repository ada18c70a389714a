"""Dataset, TensorDataset, Subset, collate and DataLoader (batching, shuffling, prefetch)."""

import gc
import threading
import time
from collections import namedtuple

import numpy as np
import pytest

import cutegrad
from cutegrad.data import DataLoader, Dataset, Subset, TensorDataset, collate_numpy


class Counting(Dataset):
    """Items are their own index; records every index fetched (thread-safe)."""

    def __init__(self, n, delay=0.0, fail_at=None):
        self.n = n
        self.delay = delay
        self.fail_at = fail_at
        self.fetched = []
        self.lock = threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        if i == self.fail_at:
            raise KeyError(f"sample {i} is broken")
        with self.lock:
            self.fetched.append(i)
        return np.int64(i)


def numpy_loader(ds, **kw):
    return DataLoader(ds, collate_fn=collate_numpy, **kw)


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "cutegrad-data-prefetch"]


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("n,bs,drop_last", [(10, 3, False), (10, 3, True), (9, 3, True), (1, 4, False), (1, 4, True), (17, 1, False), (0, 2, False)])
def test_batches_cover_dataset_in_order(n, bs, drop_last, prefetch):
    loader = numpy_loader(Counting(n), batch_size=bs, drop_last=drop_last, prefetch=prefetch)
    batches = list(loader)
    expected_len = n // bs if drop_last else -(-n // bs)
    assert len(loader) == expected_len == len(batches)
    flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    kept = (n // bs) * bs if drop_last else n
    np.testing.assert_array_equal(flat, np.arange(kept))
    assert all(len(b) == bs for b in batches[:-1])
    if drop_last and batches:
        assert len(batches[-1]) == bs


def test_drop_last_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, bs = int(rng.integers(1, 200)), int(rng.integers(1, 40))
        loader = numpy_loader(Counting(n), batch_size=bs, shuffle=True, seed=3, drop_last=True, prefetch=0)
        batches = list(loader)
        assert len(batches) == n // bs == len(loader)
        assert all(len(b) == bs for b in batches)
        flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
        assert len(set(flat.tolist())) == len(flat)  # no sample twice


def test_shuffle_is_reproducible_and_fresh_each_epoch():
    a = numpy_loader(Counting(50), batch_size=7, shuffle=True, seed=123)
    b = numpy_loader(Counting(50), batch_size=7, shuffle=True, seed=123)
    ea = [np.concatenate(list(a)) for _ in range(3)]
    eb = [np.concatenate(list(b)) for _ in range(3)]
    for x, y in zip(ea, eb):
        np.testing.assert_array_equal(x, y)
    for e in ea:
        np.testing.assert_array_equal(np.sort(e), np.arange(50))
    assert not np.array_equal(ea[0], ea[1])
    assert not np.array_equal(ea[0], np.arange(50))
    # set_epoch replays a given epoch exactly.
    a.set_epoch(1)
    np.testing.assert_array_equal(np.concatenate(list(a)), ea[1])
    c = numpy_loader(Counting(50), batch_size=7, shuffle=True, seed=124)
    assert not np.array_equal(np.concatenate(list(c)), ea[0])


def test_seed_none_draws_a_seed_that_reproduces():
    a = numpy_loader(Counting(30), batch_size=30, shuffle=True)
    b = numpy_loader(Counting(30), batch_size=30, shuffle=True, seed=a.seed)
    np.testing.assert_array_equal(next(iter(a)), next(iter(b)))


def test_prefetch_and_sync_agree():
    ds = TensorDataset(np.arange(40).reshape(20, 2), np.arange(20, dtype=np.int32))
    sync = [tuple(map(np.copy, b)) for b in numpy_loader(ds, batch_size=6, shuffle=True, seed=5, prefetch=0)]
    pre = [b for b in numpy_loader(ds, batch_size=6, shuffle=True, seed=5, prefetch=3)]
    assert len(sync) == len(pre) == 4
    for (x0, y0), (x1, y1) in zip(sync, pre):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
        assert y1.dtype == np.int64


def test_get_batch_path_matches_per_item_path():
    ds = TensorDataset(np.random.default_rng(0).normal(size=(13, 3)), np.arange(13, dtype=np.uint8))
    per_item = [collate_numpy([ds[i] for i in idx]) for idx in DataLoader(ds, 4, shuffle=True, seed=1).index_batches(0)]
    from cutegrad.data.loader import _cast_tree

    batched = [_cast_tree(ds.get_batch(idx)) for idx in DataLoader(ds, 4, shuffle=True, seed=1).index_batches(0)]
    for (a, b), (c, d) in zip(per_item, batched):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
        assert a.dtype == c.dtype == np.float32 and b.dtype == d.dtype == np.int64


def test_prefetch_runs_at_most_depth_ahead():
    ds = Counting(200)
    it = iter(numpy_loader(ds, batch_size=5, prefetch=2))
    next(it)
    time.sleep(0.3)
    # One batch consumed, at most 2 queued and 1 being built.
    assert len(ds.fetched) <= (1 + 2 + 1) * 5
    assert len(ds.fetched) >= 5
    it.close()


def test_prefetch_thread_stops_when_iterator_dropped():
    ds = Counting(10_000, delay=0.0005)
    before = len(prefetch_threads())
    it = iter(numpy_loader(ds, batch_size=4, prefetch=2))
    next(it)
    assert len(prefetch_threads()) == before + 1
    del it
    gc.collect()
    deadline = time.time() + 5
    while len(prefetch_threads()) > before and time.time() < deadline:
        time.sleep(0.01)
    assert len(prefetch_threads()) == before
    fetched = len(ds.fetched)
    time.sleep(0.1)
    assert len(ds.fetched) == fetched  # nothing is fetched after shutdown
    assert fetched < 10_000


def test_prefetch_close_and_break_out_of_loop():
    ds = Counting(1000, delay=0.0002)
    before = len(prefetch_threads())
    for i, _ in enumerate(numpy_loader(ds, batch_size=2, prefetch=4)):
        if i == 3:
            break
    gc.collect()
    deadline = time.time() + 5
    while len(prefetch_threads()) > before and time.time() < deadline:
        time.sleep(0.01)
    assert len(prefetch_threads()) == before
    it = iter(numpy_loader(ds, batch_size=2, prefetch=4))
    next(it)
    it.close()
    assert not it.worker_alive
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_worker_exception_reaches_consumer(prefetch):
    ds = Counting(20, fail_at=13)
    got = []
    with pytest.raises(KeyError, match="sample 13 is broken"):
        for b in numpy_loader(ds, batch_size=4, prefetch=prefetch):
            got.append(b)
    # Batches before the broken one were delivered in order.
    assert [b.tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert prefetch_threads() == []  # the consumer joined the worker when it re-raised


def test_collate_dtypes_and_structures():
    samples = [
        {"img": np.full((2, 2), i, dtype=np.float64), "lbl": i, "w": float(i), "h": np.float16(i), "m": bool(i % 2), "pair": Pair(np.int32(i), [i, i])}
        for i in range(3)
    ]
    out = collate_numpy(samples)
    assert out["img"].shape == (3, 2, 2) and out["img"].dtype == np.float32
    assert out["lbl"].dtype == np.int64 and out["lbl"].tolist() == [0, 1, 2]
    assert out["w"].dtype == np.float32
    assert out["h"].dtype == np.float16
    assert out["m"].dtype == np.bool_ and out["m"].tolist() == [False, True, False]
    assert isinstance(out["pair"], Pair) and out["pair"].x.dtype == np.int64
    assert out["pair"].y[0].tolist() == [0, 1, 2]
    assert collate_numpy(["a", "b"]) == ["a", "b"]


def test_collate_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"shapes \(2,\) and \(3,\)"):
        collate_numpy([np.zeros(2), np.zeros(3)])
    with pytest.raises(TypeError, match="different numbers of fields"):
        collate_numpy([(1, 2), (1,)])
    with pytest.raises(TypeError, match="dict keys"):
        collate_numpy([{"a": 1}, {"b": 1}])
    with pytest.raises(ValueError, match="empty batch"):
        collate_numpy([])
    with pytest.raises(TypeError, match="cannot batch"):
        collate_numpy([object(), object()])


def test_loader_argument_errors():
    ds = Counting(3)
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(ds, batch_size=0)
    with pytest.raises(ValueError, match="prefetch"):
        DataLoader(ds, prefetch=-1)
    with pytest.raises(ValueError, match="seed"):
        DataLoader(ds, seed=-5)
    with pytest.raises(TypeError, match="__len__"):
        DataLoader(object())
    with pytest.raises(TypeError, match="collate_fn"):
        DataLoader(ds, collate_fn=3)


def test_tensor_dataset_and_subset():
    x = np.arange(12).reshape(6, 2)
    y = np.arange(6)
    ds = TensorDataset(x, y)
    assert len(ds) == 6
    np.testing.assert_array_equal(ds[2][0], [4, 5])
    with pytest.raises(ValueError, match="different first dimensions"):
        TensorDataset(x, np.arange(5))
    with pytest.raises(ValueError, match="scalar"):
        TensorDataset(np.float32(1.0))
    sub = Subset(ds, [5, 0, 3])
    assert len(sub) == 3 and sub[0][1] == 5
    np.testing.assert_array_equal(sub.get_batch(np.array([0, 2]))[1], [5, 3])
    assert not hasattr(Subset(Counting(4), [1]), "get_batch")
    with pytest.raises(IndexError, match="out of range"):
        Subset(ds, [6])
    with pytest.raises(NotImplementedError, match="__len__"):
        len(Dataset())


has_from_numpy = hasattr(cutegrad, "from_numpy")


@pytest.mark.skipif(not has_from_numpy, reason="cutegrad.from_numpy is not implemented yet (core Tensor in progress)")
def test_default_collate_gives_cutegrad_tensors():
    ds = TensorDataset(np.random.default_rng(0).normal(size=(10, 3)), np.arange(10, dtype=np.int32))
    batches = list(DataLoader(ds, batch_size=4, shuffle=True, seed=0))
    assert len(batches) == 3
    order = DataLoader(ds, batch_size=4, shuffle=True, seed=0).index_order(0)
    x, y = batches[0]
    assert isinstance(x, cutegrad.Tensor) and isinstance(y, cutegrad.Tensor)
    assert x.dtype == cutegrad.float32 and y.dtype == cutegrad.int64
    assert tuple(x.shape) == (4, 3) and tuple(y.shape) == (4,)
    np.testing.assert_allclose(x.numpy(), ds.arrays[0][order[:4]].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), order[:4])


@pytest.mark.skipif(not has_from_numpy, reason="cutegrad.from_numpy is not implemented yet (core Tensor in progress)")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_reference_datasets_reach_tensors(prefetch):
    from cutegrad.data import ReversalTask, SyntheticImages, TextDataset

    datasets = [
        (ReversalTask().dataset(20, seed=0), (cutegrad.int64, cutegrad.int64)),
        (SyntheticImages("test", size=20), (cutegrad.float32, cutegrad.int64)),
        (TextDataset(np.arange(100, dtype=np.uint16), seq_len=8), (cutegrad.int64, cutegrad.int64)),
    ]
    for ds, dtypes in datasets:
        as_tensors = list(DataLoader(ds, batch_size=6, shuffle=True, seed=9, prefetch=prefetch))
        as_numpy = list(DataLoader(ds, batch_size=6, shuffle=True, seed=9, prefetch=prefetch, collate_fn=collate_numpy))
        assert len(as_tensors) == len(as_numpy)
        for tb, nb in zip(as_tensors, as_numpy):
            for t, n, dt in zip(tb, nb, dtypes):
                assert isinstance(t, cutegrad.Tensor) and t.dtype == dt
                np.testing.assert_array_equal(t.numpy(), n)


@pytest.mark.skipif(not has_from_numpy, reason="cutegrad.from_numpy is not implemented yet (core Tensor in progress)")
def test_to_tensors_keeps_structure_and_bools():
    from cutegrad.data import to_tensors

    out = to_tensors({"m": np.array([True, False]), "x": (np.ones((2, 3), np.float32)[:, ::2], "name")})
    assert out["m"].dtype == cutegrad.bool and out["m"].numpy().tolist() == [True, False]
    assert tuple(out["x"][0].shape) == (2, 2) and out["x"][1] == "name"


# IterableDataset, ConcatDataset and DataLoader(batch_size=None): torch.utils.data's semantics, compared with torch.

def _as_lists(tree):
    """Batches of either library as nested Python lists (tensors -> tolist, tuples -> lists)."""
    if hasattr(tree, "tolist"):
        return ["tensor", str(tree.dtype).split(".")[-1], tree.tolist()]
    if isinstance(tree, dict):
        return {k: _as_lists(v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):  # cutegrad's default_collate keeps tuples where torch's makes lists
        return [_as_lists(x) for x in tree]
    return tree


def _stream_class(base):
    class Stream(base):
        """Samples (row, label) from a generator; the length only when `n` is given."""

        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter((r, np.int64(i % 3)) for i, r in enumerate(self.rows))

    return Stream


@pytest.mark.parametrize("batch_size,drop_last", [(3, False), (3, True), (4, False), (None, False), (7, False)])
def test_iterable_dataset_batches_consecutive_samples_like_torch(batch_size, drop_last):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader as TorchLoader, IterableDataset as TorchIterable
    from cutegrad.utils.data import IterableDataset
    rows = np.random.default_rng(3).standard_normal((10, 2)).astype(np.float32)
    ours = DataLoader(_stream_class(IterableDataset)(rows), batch_size=batch_size, drop_last=drop_last)
    ref = TorchLoader(_stream_class(TorchIterable)(rows), batch_size=batch_size, drop_last=drop_last)
    for _ in range(2):  # a fresh pass over the stream each epoch
        got, want = [_as_lists(b) for b in ours], [_as_lists(b) for b in ref]
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            assert g[0][:2] == w[0][:2] and g[1] == w[1]
            np.testing.assert_allclose(g[0][2], w[0][2], rtol=1e-6)
    with pytest.raises(TypeError):  # no __len__ on the dataset: no len() of the loader, as torch's
        len(ours)
    with pytest.raises(TypeError):
        len(ref)


def test_iterable_dataset_length_and_argument_errors_follow_torch():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader as TorchLoader, IterableDataset as TorchIterable
    from cutegrad.utils.data import IterableDataset

    def sized(base, n):
        cls = _stream_class(base)
        cls.__len__ = lambda self: n
        return cls(np.zeros((n, 2), np.float32))

    for n, bs, drop in [(10, 3, False), (10, 3, True), (9, 3, True), (5, None, False)]:
        assert len(DataLoader(sized(IterableDataset, n), batch_size=bs, drop_last=drop)) == \
            len(TorchLoader(sized(TorchIterable, n), batch_size=bs, drop_last=drop))
    ds = sized(IterableDataset, 4)
    for kw in ({"shuffle": True}, {"sampler": [0, 1]}, {"batch_sampler": [[0]]}):
        with pytest.raises(ValueError, match="IterableDataset: expected unspecified " + next(iter(kw))):
            DataLoader(ds, **kw)
    with pytest.raises(NotImplementedError, match="num_workers=0"):
        DataLoader(ds, num_workers=2)


def test_concat_dataset_indexes_like_torch():
    torch = pytest.importorskip("torch")
    from torch.utils.data import ConcatDataset as TorchConcat
    from cutegrad.utils.data import ConcatDataset
    parts = [list(range(3)), list(range(10, 15)), [], list(range(20, 22))]
    ours, ref = ConcatDataset(parts), TorchConcat(parts)
    assert len(ours) == len(ref) == 10 and ours.cumulative_sizes == ref.cumulative_sizes
    for i in range(-10, 10):
        assert ours[i] == ref[i]
    for bad in (10, -11):
        with pytest.raises((IndexError, ValueError)):
            ours[bad]
        with pytest.raises((IndexError, ValueError)):
            ref[bad]
    both = TensorDataset(np.arange(4)) + TensorDataset(np.arange(4, 6))
    assert isinstance(both, ConcatDataset) and [int(both[i][0]) for i in range(6)] == list(range(6))
    assert [b.tolist() for (b,) in DataLoader(both, batch_size=4)] == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="empty"):
        ConcatDataset([])


Pair = namedtuple("Pair", "x y")  # at module level: worker processes pickle it


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_size_none_converts_each_sample_like_torch(num_workers):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader as TorchLoader
    samples = [(np.arange(3, dtype=np.int32) + i, np.float64(i) / 2, i, "s%d" % i, {"k": np.ones(2) * i},
                Pair(np.float32(i), [np.int64(i)])) for i in range(4)]
    ours = DataLoader(samples, batch_size=None, num_workers=num_workers)
    ref = TorchLoader(samples, batch_size=None, num_workers=num_workers)
    assert len(ours) == len(ref) == 4 and ours.batch_size is None and ours.batch_sampler is None
    assert [_as_lists(b) for b in ours] == [_as_lists(b) for b in ref]
    shuffled = DataLoader(list(range(6)), batch_size=None, shuffle=True, seed=1)
    assert sorted(shuffled) == list(range(6))
    custom = DataLoader(samples, batch_size=None, collate_fn=lambda s: s[2] * 10)
    assert list(custom) == [0, 10, 20, 30]
    with pytest.raises(ValueError, match="mutually exclusive with drop_last"):
        DataLoader(samples, batch_size=None, drop_last=True)


def test_unpicklable_batch_from_a_worker_is_an_error_not_a_hang():
    from cutegrad.utils.data import DataLoader

    def collate(samples):
        return lambda: samples  # a closure: no pickle can carry it to the parent

    loader = DataLoader(list(range(8)), batch_size=4, num_workers=1, collate_fn=collate, timeout=60)
    with pytest.raises(Exception, match="pickle|Pickl"):
        next(iter(loader))
