"""cutegrad.utils.data: torch.utils.data's names, from cutegrad.data (docs/data.md).

Datasets, the DataLoader (samplers, batch samplers, worker processes,
pinned batches), samplers, random_split and default_collate.
"""
from ..data.dataset import Dataset, Subset, TensorDataset, random_split
from ..data.loader import DataLoader, default_collate
from ..data.samplers import (BatchSampler, RandomSampler, Sampler, SequentialSampler, SubsetRandomSampler,
                             WeightedRandomSampler)
from ..data.workers import get_worker_info

__all__ = ["BatchSampler", "DataLoader", "Dataset", "RandomSampler", "Sampler", "SequentialSampler", "Subset",
           "SubsetRandomSampler", "TensorDataset", "WeightedRandomSampler", "default_collate", "get_worker_info",
           "random_split"]
