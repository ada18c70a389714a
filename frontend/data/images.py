"""Which image-classification data the `vit` workload uses.

1. an explicit path (`--data PATH`): CIFAR-10 must be there, else an error;
2. CIFAR-10 (either archive or extracted folder) in `$CUTEGRAD_DATA`, the
   cache folder, `./data/` or `../data/`;
3. the procedurally generated `SyntheticImages` (works offline).

The choice is reported through `log` (default: one line on stderr).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

from .cache import cache_dir
from .cifar import CIFAR10, find_cifar10
from .dataset import Dataset
from .synthetic_images import SyntheticImages

__all__ = ["ImageData", "resolve_image_data"]


class ImageData(NamedTuple):
    train: Dataset
    test: Dataset
    name: str  # "cifar10" or "synthetic"
    num_classes: int
    description: str


def _stderr_log(message: str) -> None:
    print(f"cutegrad.data: {message}", file=sys.stderr, flush=True)


def resolve_image_data(
    path: Optional[Union[str, Path]] = None,
    *,
    seed: int = 0,
    synthetic_train_size: int = 50_000,
    synthetic_test_size: int = 10_000,
    log: Callable[[str], None] = _stderr_log,
) -> ImageData:
    """CIFAR-10 when the user has it, otherwise the synthetic 10-class dataset."""
    if path is not None:
        roots = [Path(path).expanduser()]
        if find_cifar10(roots[0]) is None:
            raise FileNotFoundError(f"--data: no CIFAR-10 archive or folder at {roots[0]}")
    else:
        roots = []
        env = os.environ.get("CUTEGRAD_DATA")
        if env:
            roots.append(Path(env).expanduser())
        roots += [cache_dir(), Path.cwd() / "data", Path.cwd().parent / "data"]
    for root in roots:
        found = find_cifar10(root)
        if found is not None:
            fmt, where = found
            train, test = CIFAR10(root, "train"), CIFAR10(root, "test")
            desc = f"images: CIFAR-10 ({fmt} format) from {where}, {len(train):,} train / {len(test):,} test"
            log(desc)
            return ImageData(train, test, "cifar10", 10, desc)
    train = SyntheticImages("train", synthetic_train_size, seed)
    test = SyntheticImages("test", synthetic_test_size, seed)
    desc = f"images: procedurally generated 10-class 32x32 dataset (CIFAR-10 not found), {len(train):,} train / {len(test):,} test"
    log(desc)
    return ImageData(train, test, "synthetic", 10, desc)
