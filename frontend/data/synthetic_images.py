"""A procedurally generated 32x32x3, 10-class image dataset: the offline default for ViT.

Each image is rendered on the fly from `default_rng([seed, split, index])`,
so a dataset is a few bytes of state, deterministic, and the train and test
splits come from disjoint random streams. The label is `index % 10` (balanced).

Classes are defined by structure, never by colour:
  0 stripes near 0 degrees    1 stripes near 45     2 stripes near 90
  3 stripes near 135          4 checkerboard        5 disc
  6 ring                      7 square              8 plus-shaped cross
  9 triangle
Nuisances drawn per image: foreground and background colours (with a minimum
contrast), stripe period and phase, orientation jitter (+-15 degrees for the
oriented classes, any angle for square, triangle and checkerboard), shape size
and position, a smooth brightness gradient, and Gaussian pixel noise. Stripe
classes differ only by orientation, shape classes by outline, so a model
must learn spatial features; colour alone predicts nothing.

Rendered images are quantised to uint8 like real photographs and, by
default, kept once rendered (150 MB for 50,000 images), so only the first
epoch pays for rendering (a few hundred microseconds per image).
Items are float32 [3, 32, 32] scaled as (x/255 - 0.5) / 0.25, and int64 labels.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

from .dataset import Dataset

__all__ = ["SyntheticImages", "SYNTHETIC_CLASSES"]

SYNTHETIC_CLASSES = (
    "stripes-0",
    "stripes-45",
    "stripes-90",
    "stripes-135",
    "checkerboard",
    "disc",
    "ring",
    "square",
    "cross",
    "triangle",
)
_SPLIT_IDS = {"train": 0, "test": 1}
_SIZE = 32
_YY, _XX = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float32) + 0.5
_MEAN, _STD = 0.5, 0.25


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _soft(d: np.ndarray) -> np.ndarray:
    # Signed distance (positive inside) -> coverage with a one-pixel antialiased edge.
    return np.clip(d + 0.5, 0.0, 1.0)


def _mask(label: int, rng: np.random.Generator) -> np.ndarray:
    """Foreground coverage in [0, 1], [32, 32] float32."""
    if label <= 3:
        angle = math.radians(45.0 * label + rng.uniform(-15.0, 15.0))
        period = rng.uniform(4.0, 10.0)
        # Stripes run along `angle`: the pattern varies across it.
        u = -math.sin(angle) * _XX + math.cos(angle) * _YY
        wave = np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
        return (0.5 + 0.5 * np.tanh(3.0 * wave)).astype(np.float32)
    if label == 4:
        period = rng.uniform(6.0, 14.0)
        u, v = _rotate(_XX, _YY, rng.uniform(0, math.pi / 2))
        phase_u, phase_v = rng.uniform(0, 2 * math.pi, size=2)
        wave = np.sin(2 * math.pi * u / period + phase_u) * np.sin(2 * math.pi * v / period + phase_v)
        return (0.5 + 0.5 * np.tanh(4.0 * wave)).astype(np.float32)

    cx, cy = rng.uniform(10.0, 22.0, size=2)
    x, y = _XX - cx, _YY - cy
    if label == 5:
        r = rng.uniform(5.0, 10.0)
        return _soft(r - np.hypot(x, y))
    if label == 6:
        r = rng.uniform(6.0, 10.0)
        width = rng.uniform(1.5, 3.0)
        return _soft(width / 2 - np.abs(np.hypot(x, y) - r))
    if label == 7:
        half = rng.uniform(4.0, 8.0)
        u, v = _rotate(x, y, rng.uniform(0, math.pi / 2))
        return _soft(half - np.maximum(np.abs(u), np.abs(v)))
    if label == 8:
        arm = rng.uniform(6.0, 10.0)
        width = rng.uniform(1.5, 3.0)
        u, v = _rotate(x, y, math.radians(rng.uniform(-15.0, 15.0)))
        bar_h = np.minimum(arm - np.abs(u), width - np.abs(v))
        bar_v = np.minimum(arm - np.abs(v), width - np.abs(u))
        return _soft(np.maximum(bar_h, bar_v))
    # label 9: an equilateral-ish triangle as the intersection of three half-planes.
    r = rng.uniform(6.0, 10.0)
    base = rng.uniform(0, 2 * math.pi)
    d = np.full_like(x, np.inf)
    for k in range(3):
        a = base + 2 * math.pi * k / 3
        # Inward distance to the edge whose outward normal points at angle `a`.
        d = np.minimum(d, r / 2 - (math.cos(a) * x + math.sin(a) * y))
    return _soft(d)


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `label` in [0, 1], float32 [3, 32, 32]."""
    mask = _mask(label, rng)
    bg = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    fg = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    # Enforce a minimum contrast by pushing fg away from bg in brightness.
    gap = float(fg.sum() - bg.sum()) / 3.0
    if abs(gap) < 0.25:
        shift = (0.25 - abs(gap)) * (1.0 if gap >= 0 else -1.0)
        fg = np.clip(fg + shift, 0.0, 1.0)
        bg = np.clip(bg - shift, 0.0, 1.0)
    gx, gy = rng.uniform(-0.15, 0.15, size=2) / _SIZE
    img = bg[:, None, None] + (fg - bg)[:, None, None] * mask[None]
    img += (np.float32(gx) * (_XX - 16) + np.float32(gy) * (_YY - 16))[None]
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(rng.uniform(0.03, 0.12))
    return np.clip(img, 0.0, 1.0, out=img)


class SyntheticImages(Dataset):
    """`size` procedurally rendered images of `split` ("train" or "test").

    Defaults mirror CIFAR-10: 50,000 train and 10,000 test images, 10 classes.
    With `cache`, rendered images are kept (as uint8) for later epochs.
    """

    classes = SYNTHETIC_CLASSES

    def __init__(self, split: str = "train", size: Optional[int] = None, seed: int = 0, cache: bool = True):
        if split not in _SPLIT_IDS:
            raise ValueError(f"SyntheticImages: split must be 'train' or 'test', got {split!r}")
        if size is None:
            size = 50_000 if split == "train" else 10_000
        if size < 0:
            raise ValueError(f"SyntheticImages: size must be >= 0, got {size}")
        if seed < 0:
            raise ValueError(f"SyntheticImages: seed must be >= 0, got {seed}")
        self.split = split
        self.size = int(size)
        self.seed = int(seed)
        self._images = np.zeros((self.size, 3, _SIZE, _SIZE), dtype=np.uint8) if cache else None
        self._rendered = np.zeros(self.size, dtype=bool) if cache else None

    def __len__(self) -> int:
        return self.size

    def _index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticImages: index {index} out of range for {self.size} images")
        return index

    def image_uint8(self, index: int) -> np.ndarray:
        """Image `index` as uint8 [3, 32, 32] (rendered, or read from the cache)."""
        index = self._index(index)
        if self._rendered is not None and self._rendered[index]:
            return self._images[index]
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        img = np.rint(render(index % 10, rng) * 255.0).astype(np.uint8)
        if self._images is not None:
            self._images[index] = img
            self._rendered[index] = True
        return img

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.int64]:
        index = self._index(index)
        return _normalize(self.image_uint8(index)), np.int64(index % 10)

    def get_batch(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        idx = [self._index(i) for i in np.asarray(indices).reshape(-1)]
        images = np.stack([self.image_uint8(i) for i in idx]) if idx else np.zeros((0, 3, _SIZE, _SIZE), np.uint8)
        return _normalize(images), np.array([i % 10 for i in idx], dtype=np.int64)


def _normalize(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) * np.float32(1.0 / (255.0 * _STD)) - np.float32(_MEAN / _STD)
