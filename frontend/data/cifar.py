"""CIFAR-10 from the user's copy of the standard archives.

Reads either distribution without extracting it to disk:
- python: `cifar-10-python.tar.gz` or its folder `cifar-10-batches-py/`, files
  `data_batch_1..5` and `test_batch`, each a pickled dict whose `data` is a
  uint8 [10000, 3072] array (rows are R, G, B planes of 32x32, row-major) and
  whose `labels` is a list of ints;
- binary: `cifar-10-binary.tar.gz` or `cifar-10-batches-bin/`, files
  `data_batch_1.bin..5` and `test_batch.bin`, each a run of 3073-byte records
  (one label byte, then the 3072 image bytes in the same plane order).

The pickles are read with an unpickler that only admits the NumPy array
constructors such files contain, so a tampered archive cannot run code.
Images are kept as uint8 NCHW; items are normalised float32 [3, 32, 32] with
the usual per-channel CIFAR-10 mean/std, labels int64.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .dataset import Dataset

__all__ = ["CIFAR10", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "find_cifar10", "read_cifar10"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_PY_DIR, _PY_TAR = "cifar-10-batches-py", "cifar-10-python.tar.gz"
_BIN_DIR, _BIN_TAR = "cifar-10-batches-bin", "cifar-10-binary.tar.gz"
_FILES = {
    ("python", "train"): [f"data_batch_{i}" for i in range(1, 6)],
    ("python", "test"): ["test_batch"],
    ("binary", "train"): [f"data_batch_{i}.bin" for i in range(1, 6)],
    ("binary", "test"): ["test_batch.bin"],
}
_RECORD = 1 + 3 * 32 * 32

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which a CIFAR-10 pickle never contains")
        return super().find_class(module, name)


def find_cifar10(root: Union[str, Path]) -> Optional[Tuple[str, Path]]:
    """Locate a CIFAR-10 distribution at or under `root`: ("python"|"binary", path) or None.

    `root` may be the folder holding the archive/extracted folder, or the
    archive or extracted folder itself. Extracted folders win over archives,
    the python format over the binary one.
    """
    root = Path(root).expanduser()
    candidates = [
        ("python", root if root.name == _PY_DIR else root / _PY_DIR),
        ("python", root if root.name == _PY_TAR else root / _PY_TAR),
        ("binary", root if root.name == _BIN_DIR else root / _BIN_DIR),
        ("binary", root if root.name == _BIN_TAR else root / _BIN_TAR),
    ]
    for fmt, p in candidates:
        if p.exists():
            return fmt, p
    return None


def _read_members(path: Path, folder: str, names: List[str]) -> Dict[str, bytes]:
    if path.is_dir():
        out = {}
        for n in names:
            f = path / n
            if not f.is_file():
                raise FileNotFoundError(f"CIFAR-10: {f} is missing")
            out[n] = f.read_bytes()
        return out
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.TarError as exc:
        raise ValueError(f"CIFAR-10: {path} is not a readable tar archive ({exc})") from exc
    with tar:
        out = {}
        for n in names:
            try:
                member = tar.getmember(f"{folder}/{n}")
            except KeyError:
                raise FileNotFoundError(f"CIFAR-10: {path} has no member {folder}/{n}") from None
            f = tar.extractfile(member)
            if f is None:
                raise ValueError(f"CIFAR-10: {path}: {folder}/{n} is not a regular file")
            out[n] = f.read()
        return out


def _parse_python_batch(name: str, raw: bytes) -> Tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"CIFAR-10: {name} is not a valid python-format batch ({exc})") from exc
    if isinstance(batch, dict):
        # The published pickles come from Python 2 (bytes keys); re-pickled copies may have str keys.
        batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"CIFAR-10: {name} lacks the 'data' and 'labels' entries of a CIFAR-10 batch")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR-10: {name}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"CIFAR-10: {name}: {len(labels)} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def _parse_binary_batch(name: str, raw: bytes) -> Tuple[np.ndarray, np.ndarray]:
    if len(raw) == 0 or len(raw) % _RECORD:
        raise ValueError(f"CIFAR-10: {name} has {len(raw)} bytes, not a whole number of {_RECORD}-byte records")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _RECORD)
    labels = records[:, 0].astype(np.int64)
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def read_cifar10(root: Union[str, Path], split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) of `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"read_cifar10: split must be 'train' or 'test', got {split!r}")
    found = find_cifar10(root)
    if found is None:
        raise FileNotFoundError(
            f"CIFAR-10 not found at {root}: expected {_PY_DIR}/, {_PY_TAR}, {_BIN_DIR}/ or {_BIN_TAR}"
        )
    fmt, path = found
    names = _FILES[(fmt, split)]
    members = _read_members(path, _PY_DIR if fmt == "python" else _BIN_DIR, names)
    parse = _parse_python_batch if fmt == "python" else _parse_binary_batch
    parts = [parse(n, members[n]) for n in names]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10: labels must be in [0, 9], got range [{labels.min()}, {labels.max()}]")
    return images, labels


class CIFAR10(Dataset):
    """CIFAR-10 `split` read from `root`; items are (float32 [3, 32, 32], int64 label).

    With `normalize`, pixels are scaled to [0, 1] and standardised per channel
    with CIFAR10_MEAN/CIFAR10_STD; otherwise they are only scaled to [0, 1].
    """

    classes = CIFAR10_CLASSES

    def __init__(self, root: Union[str, Path], split: str = "train", normalize: bool = True):
        self.images, self.labels = read_cifar10(root, split)
        self.split = split
        if normalize:
            mean = np.asarray(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
        else:
            mean = np.zeros((1, 3, 1, 1), dtype=np.float32)
            std = np.ones((1, 3, 1, 1), dtype=np.float32)
        # x_norm = u8 * scale + shift, folded so a batch costs one multiply-add.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._shift = (-mean / std).astype(np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.int64]:
        x = self.images[index].astype(np.float32) * self._scale[0] + self._shift[0]
        return x, self.labels[index]

    def get_batch(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        x = self.images[indices].astype(np.float32) * self._scale + self._shift
        return x, self.labels[indices]
