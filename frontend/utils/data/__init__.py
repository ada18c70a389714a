"""cutegrad.utils.data: torch.utils.data's names, from cutegrad.data (docs/data.md).

Datasets (map-style and iterable), the DataLoader (samplers, batch samplers,
worker processes, pinned batches, batch_size=None), samplers, random_split,
default_collate/default_convert, and `.distributed.DistributedSampler`.
"""
from ...data.dataset import ConcatDataset, Dataset, IterableDataset, Subset, TensorDataset, random_split
from ...data.distributed_sampler import DistributedSampler
from ...data.loader import DataLoader, default_collate, default_convert
from ...data.samplers import (BatchSampler, RandomSampler, Sampler, SequentialSampler, SubsetRandomSampler,
                             WeightedRandomSampler)
from ...data.workers import get_worker_info

__all__ = ["BatchSampler", "ConcatDataset", "DataLoader", "Dataset", "DistributedSampler", "IterableDataset",
           "RandomSampler", "Sampler", "SequentialSampler", "Subset", "SubsetRandomSampler", "TensorDataset",
           "WeightedRandomSampler", "default_collate", "default_convert", "get_worker_info", "random_split"]
