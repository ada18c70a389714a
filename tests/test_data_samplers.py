"""cutegrad.utils.data against torch.utils.data: samplers (lengths, index
sets, replacement, argument errors; exact orders where no RNG is involved),
the DataLoader's sampler/batch_sampler arguments, worker processes (same
batches as in-process, seeds, worker_init_fn, errors, persistent workers),
pin_memory without a GPU, random_split.
"""
import collections
import os

import numpy as np
import pytest

import cutegrad
import cutegrad.cuda as cuda
import cutegrad.utils.data as cdata

torch = pytest.importorskip("torch")
tdata = torch.utils.data


def test_names_match_torch():
    for name in ("Dataset", "TensorDataset", "DataLoader", "Subset", "random_split", "default_collate", "Sampler",
                 "SequentialSampler", "RandomSampler", "SubsetRandomSampler", "WeightedRandomSampler",
                 "BatchSampler", "get_worker_info"):
        assert hasattr(cdata, name) and hasattr(tdata, name), name
    assert cutegrad.utils.data.DataLoader is cutegrad.data.DataLoader


def test_sequential_and_batch_sampler_equal_torch():
    for n, bs, drop in ((10, 3, False), (10, 3, True), (9, 3, True), (1, 4, False), (0, 2, False)):
        c = cdata.BatchSampler(cdata.SequentialSampler(range(n)), bs, drop)
        t = tdata.BatchSampler(tdata.SequentialSampler(range(n)), bs, drop)
        assert list(c) == list(t) and len(c) == len(t)
    assert list(cdata.BatchSampler([5, 1, 4, 2, 3], 2, False)) == list(tdata.BatchSampler([5, 1, 4, 2, 3], 2, False))


@pytest.mark.parametrize("bad", [dict(batch_size=0, drop_last=False), dict(batch_size=True, drop_last=False),
                                 dict(batch_size=2.0, drop_last=False), dict(batch_size=2, drop_last=1)])
def test_batch_sampler_errors_like_torch(bad):
    with pytest.raises(ValueError) as t_err:
        tdata.BatchSampler(range(4), **bad)
    with pytest.raises(ValueError) as c_err:
        cdata.BatchSampler(range(4), **bad)
    assert str(c_err.value).split(",")[0] == str(t_err.value).split(",")[0]


@pytest.mark.parametrize("n,num_samples", [(10, None), (7, 20), (7, 3), (1, 5)])
def test_random_sampler_without_replacement(n, num_samples):
    c = list(cdata.RandomSampler(range(n), num_samples=num_samples))
    t = list(tdata.RandomSampler(range(n), num_samples=num_samples))
    assert len(c) == len(t) == len(cdata.RandomSampler(range(n), num_samples=num_samples))
    # torch's structure: whole permutations, the last one cut short
    assert collections.Counter(c).keys() <= set(range(n))
    full, rest = divmod(len(c), n)
    for k in range(full):
        assert sorted(c[k * n:(k + 1) * n]) == list(range(n))
    assert len(set(c[full * n:])) == rest


def test_random_sampler_with_replacement_and_errors():
    c = list(cdata.RandomSampler(range(5), replacement=True, num_samples=1000))
    assert len(c) == 1000 and set(c) == set(range(5))
    for kw, exc in ((dict(replacement=1), TypeError), (dict(num_samples=0), ValueError),
                    (dict(num_samples=2.5), ValueError)):
        with pytest.raises(exc):
            tdata.RandomSampler(range(5), **kw)
        with pytest.raises(exc):
            cdata.RandomSampler(range(5), **kw)


def test_random_orders_follow_the_generators():
    g = cutegrad.Generator().manual_seed(5)
    s = cdata.RandomSampler(range(50), generator=g)
    e1, e2 = list(s), list(s)
    assert e1 != e2  # consecutive epochs differ
    g.manual_seed(5)
    assert list(s) == e1  # re-seeding repeats them
    cutegrad.manual_seed(3)
    a = list(cdata.RandomSampler(range(50)))
    cutegrad.manual_seed(3)
    assert list(cdata.RandomSampler(range(50))) == a  # without a generator: the global seed decides
    sub = [3, 9, 27, 81]
    assert sorted(cdata.SubsetRandomSampler(sub)) == sub == sorted(tdata.SubsetRandomSampler(sub))
    assert len(cdata.SubsetRandomSampler(sub)) == 4


def test_weighted_random_sampler():
    w = [0.0, 1.0, 3.0, 0.0, 6.0]
    c = list(cdata.WeightedRandomSampler(w, 20000))
    t = list(tdata.WeightedRandomSampler(w, 20000))
    assert len(c) == len(t) == 20000
    assert set(c) == set(t) == {1, 2, 4}  # zero weights never drawn
    freq = np.bincount(c, minlength=5) / len(c)
    np.testing.assert_allclose(freq, np.array(w) / 10, atol=0.02)
    no_rep = list(cdata.WeightedRandomSampler(w, 3, replacement=False))
    assert sorted(no_rep) == [1, 2, 4]
    for args, kw in (((w, 0), {}), (([[1.0, 2.0]], 2), {}), ((w, 2), {"replacement": 0})):
        with pytest.raises(ValueError):
            tdata.WeightedRandomSampler(*args, **kw)
        with pytest.raises(ValueError):
            cdata.WeightedRandomSampler(*args, **kw)
    four = list(cdata.WeightedRandomSampler(w, 4, replacement=False))  # zero weights follow the others, as torch
    assert sorted(four[:3]) == [1, 2, 4] and four[3] in (0, 3)
    assert sorted(list(tdata.WeightedRandomSampler(w, 4, replacement=False))[:3]) == [1, 2, 4]
    with pytest.raises(RuntimeError):
        list(tdata.WeightedRandomSampler(w, 6, replacement=False))
    with pytest.raises(RuntimeError):
        list(cdata.WeightedRandomSampler(w, 6, replacement=False))
    first = collections.Counter(next(iter(cdata.WeightedRandomSampler(w, 1, replacement=False))) for _ in range(3000))
    np.testing.assert_allclose([first[1] / 3000, first[2] / 3000, first[4] / 3000], [0.1, 0.3, 0.6], atol=0.04)


def table(n=23):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n)
    return x, y


def loader_labels(loader):
    return [b[1].numpy().tolist() if hasattr(b[1], "numpy") else b[1] for b in loader]


def test_dataloader_sampler_and_batch_sampler_like_torch():
    x, y = table()
    cds, tds = cdata.TensorDataset(x, y), tdata.TensorDataset(torch.tensor(x), torch.tensor(y))
    order = [5, 3, 22, 0, 1, 9, 8]
    for kw in (dict(batch_size=3), dict(batch_size=3, drop_last=True)):
        c = cdata.DataLoader(cds, sampler=order, **kw)
        t = tdata.DataLoader(tds, sampler=order, **kw)
        assert loader_labels(c) == [b[1].tolist() for b in t] and len(c) == len(t)
    bs = [[1, 2], [20, 0, 4], [7]]
    c = cdata.DataLoader(cds, batch_sampler=bs)
    t = tdata.DataLoader(tds, batch_sampler=bs)
    assert loader_labels(c) == [b[1].tolist() for b in t] and len(c) == len(t) == 3
    np.testing.assert_array_equal(next(iter(c))[0].numpy(), next(iter(t))[0].numpy())
    c = cdata.DataLoader(cds, batch_size=4, sampler=cdata.RandomSampler(cds), drop_last=True)
    labels = loader_labels(c)
    assert len(labels) == len(c) == 5 and len(set(sum(labels, []))) == 20


@pytest.mark.parametrize("kw", [dict(sampler=[0, 1], shuffle=True), dict(batch_sampler=[[0]], batch_size=2),
                                dict(batch_sampler=[[0]], drop_last=True), dict(batch_sampler=[[0]], sampler=[0]),
                                dict(num_workers=-1), dict(persistent_workers=True),
                                dict(prefetch_factor=2), dict(timeout=-1)])
def test_dataloader_argument_errors_like_torch(kw):
    x, y = table()
    with pytest.raises(ValueError):
        tdata.DataLoader(tdata.TensorDataset(torch.tensor(x)), **kw)
    with pytest.raises(ValueError):
        cdata.DataLoader(cdata.TensorDataset(x), **kw)


def test_shuffle_with_generator_and_global_seed():
    x, y = table()
    ds = cdata.TensorDataset(x, y)
    runs = []
    for _ in range(2):
        g = cutegrad.Generator().manual_seed(7)
        dl = cdata.DataLoader(ds, batch_size=5, shuffle=True, generator=g)
        runs.append((loader_labels(dl), loader_labels(dl)))
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]
    assert sorted(sum(runs[0][0], [])) == list(range(23))
    cutegrad.manual_seed(1)
    a = loader_labels(cdata.DataLoader(ds, batch_size=5, shuffle=True))
    cutegrad.manual_seed(1)
    assert loader_labels(cdata.DataLoader(ds, batch_size=5, shuffle=True)) == a


class WhoBuilt(cdata.Dataset):
    """Samples carry the building worker's id and seed; index 13 raises when asked to."""

    def __init__(self, n=24, fail_at=None):
        self.n, self.fail_at = n, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyError(f"sample {i} is broken")
        info = cdata.get_worker_info()
        wid = -1 if info is None else info.id
        return np.float32(i), wid, os.getpid(), int(np.random.randint(0, 2 ** 31)), info.seed if info else -1


def test_workers_build_the_same_batches():
    ds = WhoBuilt()
    order = list(np.random.default_rng(0).permutation(24))
    inproc = cdata.DataLoader(ds, batch_size=5, sampler=order)
    multi = cdata.DataLoader(ds, batch_size=5, sampler=order, num_workers=2)
    a, b = list(inproc), list(multi)
    assert [x[0].numpy().tolist() for x in a] == [x[0].numpy().tolist() for x in b]
    assert all(x[1].numpy().tolist() == [-1] * len(x[1]) for x in a)
    workers = {int(w) for x in b for w in x[1].numpy()}
    assert workers == {0, 1} and all(int(p) != os.getpid() for x in b for p in x[2].numpy())
    seeds = {int(w): int(s) for x in b for w, s in zip(x[1].numpy(), x[4].numpy())}
    assert seeds[1] == seeds[0] + 1  # base_seed + worker id, as torch


def test_worker_init_fn_persistent_workers_and_early_break():
    ds = WhoBuilt()
    dl = cdata.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True,
                          worker_init_fn=lambda wid: np.random.seed(1000 + wid))
    first = list(dl)
    pids = {int(p) for x in first for p in x[2].numpy()}
    for x in dl:  # leave the epoch early: its batches in flight must not leak into the next one
        break
    second = list(dl)
    assert [x[0].numpy().tolist() for x in second] == [x[0].numpy().tolist() for x in first]
    assert {int(p) for x in second for p in x[2].numpy()} == pids  # the same processes
    draws = {int(w): int(r) for x in first for w, r in zip(x[1].numpy(), x[3].numpy())}
    assert draws[0] != draws[1]
    dl._pool.close()


def test_dropping_an_iterator_mid_epoch_stops_its_workers():
    it = iter(cdata.DataLoader(WhoBuilt(), batch_size=2, num_workers=2))
    next(it)
    processes = list(it._pool.processes)
    assert all(p.is_alive() for p in processes)
    del it
    for p in processes:
        p.join(timeout=10)
    assert not any(p.is_alive() for p in processes)


def test_worker_error_is_reraised_with_its_type():
    dl = cdata.DataLoader(WhoBuilt(fail_at=13), batch_size=4, num_workers=2)
    with pytest.raises(KeyError, match="sample 13 is broken"):
        list(dl)


def test_workers_with_a_custom_collate_and_get_batch():
    x, y = table()
    ds = cdata.TensorDataset(x, y)  # has get_batch: workers fetch whole batches
    got = list(cdata.DataLoader(ds, batch_size=6, num_workers=2))
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in got]), x)
    lists = list(cdata.DataLoader(ds, batch_size=6, num_workers=2, collate_fn=lambda s: [int(t[1]) for t in s]))
    assert sum(lists, []) == list(range(23))


@pytest.mark.skipif(cuda.is_available(), reason="checks the behaviour without a GPU")
def test_pin_memory_without_gpu_warns_and_loads():
    x, y = table()
    with pytest.warns(UserWarning, match="pin_memory"):
        dl = cdata.DataLoader(cdata.TensorDataset(x, y), batch_size=8, pin_memory=True)
    assert not dl.pin_memory and not next(iter(dl))[0].is_pinned()


@pytest.mark.parametrize("lengths", [[0.5, 0.3, 0.2], [0.34, 0.33, 0.33], [10, 5, 8], [1.0]])
def test_random_split_like_torch(lengths):
    c = cdata.random_split(range(23), lengths)
    t = tdata.random_split(range(23), lengths)
    assert [len(s) for s in c] == [len(s) for s in t]
    assert sorted(i for s in c for i in s.indices) == list(range(23))
    with pytest.raises(ValueError):
        tdata.random_split(range(23), [10, 10])
    with pytest.raises(ValueError):
        cdata.random_split(range(23), [10, 10])
    g1, g2 = cutegrad.Generator().manual_seed(4), cutegrad.Generator().manual_seed(4)
    assert [list(s.indices) for s in cdata.random_split(range(23), lengths, generator=g1)] == \
        [list(s.indices) for s in cdata.random_split(range(23), lengths, generator=g2)]


@pytest.mark.parametrize("n,world", [(10, 2), (101, 3), (7, 4), (1, 2), (64, 8)])
def test_distributed_sampler_equals_torchs_index_for_index(n, world):
    """The same shards as torch's DistributedSampler for every seed, epoch, shuffle and drop_last."""
    torch = pytest.importorskip("torch")
    from torch.utils.data.distributed import DistributedSampler as TorchSampler
    from cutegrad.utils.data.distributed import DistributedSampler
    for seed, shuffle, drop_last in [(0, True, False), (11, True, True), (2 ** 33 + 5, True, False),
                                     (3, False, False), (3, False, True)]:
        for epoch in (0, 1, 7):
            for rank in range(world):
                ours = DistributedSampler(range(n), world, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
                ref = TorchSampler(range(n), world, rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
                ours.set_epoch(epoch)
                ref.set_epoch(epoch)
                assert list(ours) == list(ref) and len(ours) == len(ref), (seed, shuffle, drop_last, epoch, rank)
