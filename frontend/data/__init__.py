"""cutegrad.data: datasets, the DataLoader, tokenizers and the reference workloads' data.

Everything inside works on NumPy arrays; batches become cutegrad tensors only
at the end of the DataLoader's collate (`to_tensors`).
"""

from .bpe import BPETokenizer, pretokenize
from .cache import cache_dir
from .char_tokenizer import CharTokenizer
from .cifar import CIFAR10, CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, find_cifar10, read_cifar10
from .corpus import Corpus, embedded_corpus, resolve_corpus
from .dataset import ConcatDataset, Dataset, IterableDataset, Subset, TensorDataset, random_split
from .images import ImageData, resolve_image_data
from .loader import DataLoader, collate_numpy, default_collate, default_convert, to_tensor, to_tensors
from .samplers import (BatchSampler, RandomSampler, Sampler, SequentialSampler, SubsetRandomSampler,
                       WeightedRandomSampler)
from .workers import get_worker_info
from .reversal import IGNORE_INDEX, ReversalDataset, ReversalTask, exact_sequence_accuracy
from .synthetic_images import SYNTHETIC_CLASSES, SyntheticImages
from .text import TextData, TextDataset, prepare_text, split_tokens
from .distributed_sampler import DistributedSampler

__all__ = [
    "BPETokenizer",
    "CIFAR10",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CharTokenizer",
    "Corpus",
    "DataLoader",
    "Dataset",
    "IGNORE_INDEX",
    "ImageData",
    "ReversalDataset",
    "ReversalTask",
    "SYNTHETIC_CLASSES",
    "Subset",
    "SyntheticImages",
    "TensorDataset",
    "TextData",
    "TextDataset",
    "cache_dir",
    "collate_numpy",
    "default_collate",
    "embedded_corpus",
    "exact_sequence_accuracy",
    "find_cifar10",
    "prepare_text",
    "pretokenize",
    "read_cifar10",
    "resolve_corpus",
    "resolve_image_data",
    "split_tokens",
    "to_tensor",
    "to_tensors",
    "BatchSampler", "RandomSampler", "Sampler", "SequentialSampler", "SubsetRandomSampler", "WeightedRandomSampler",
    "get_worker_info", "random_split",
    "DistributedSampler",
    "ConcatDataset", "IterableDataset", "default_convert",
]
