"""DistributedSampler: each rank's share of a dataset's indices, as torch.utils.data.DistributedSampler.

Epoch `e` with seed `s` orders the indices exactly as torch's sampler does
when shuffling: `torch.randperm(n)` from a generator seeded with `s + e`
(`torch_randperm` below reproduces it), `arange(n)` otherwise; so a job that
mixes the libraries, or compares with a torch run, sees the same shards.
With `drop_last=False` the order is padded by repeating its head until its
length divides by `num_replicas`; with `drop_last=True` the tail is cut
instead.  Rank `r` takes positions r, r + R, r + 2R, ... so the ranks' shares
are disjoint (without padding) and of equal length, and together cover the
dataset.  Call `set_epoch(e)` before each epoch so every rank draws the same
permutation.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["DistributedSampler", "torch_randperm"]


def torch_randperm(n, seed):
    """torch.randperm(n) on the CPU from a generator seeded with `seed`, bit for bit.

    torch's CPU generator is MT19937 seeded by the standard 32-bit init (the
    one NumPy's legacy RandomState uses); for n below 2**32 / 20 its randperm
    is a Fisher-Yates pass swapping position i with i + (next 32-bit draw %
    (n - i)).  The swaps are sequential, hence the Python loop: about a
    second per million indices, once per epoch.
    """
    state = np.random.RandomState(seed & 0xFFFFFFFF).get_state(legacy=False)["state"]
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": state}
    perm = list(range(n))
    for i, draw in enumerate(bits.random_raw(max(n - 1, 0)).tolist()):
        j = i + draw % (n - i)
        perm[i], perm[j] = perm[j], perm[i]
    return np.asarray(perm, dtype=np.int64)


class DistributedSampler:
    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, seed=0, drop_last=False):
        if num_replicas is None or rank is None:
            from .. import distributed as dist
            if not dist.is_initialized():
                raise RuntimeError("DistributedSampler: pass num_replicas and rank, or call "
                                   "cutegrad.distributed.init_process_group first")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"DistributedSampler: rank {rank} is outside [0, {num_replicas})")
        self.dataset = dataset
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        n = len(dataset)
        if drop_last:
            self.num_samples = n // self.num_replicas
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def indices(self):
        n = len(self.dataset)
        order = torch_randperm(n, self.seed + self.epoch) if self.shuffle else np.arange(n)
        if self.total_size > n:
            order = np.resize(order, self.total_size)  # repeats the head cyclically
        else:
            order = order[:self.total_size]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        return iter(int(i) for i in self.indices())

    def __len__(self):
        return self.num_samples
