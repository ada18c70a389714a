"""The sequence-reversal task (DESIGN.md's `reverse` workload: vocab 36, seq 64).

Format of one example, with `vocab_size = V` and `seq_len = T` (defaults 36, 64):
- Tokens `0 .. V-3` are content symbols, `V-2` is SEP, `V-1` is PAD.
- The content is `L` symbols drawn uniformly and independently
  (`L = T // 2` by default: 32 for T = 64).
- The full sequence is `a_1 .. a_L, SEP, a_L .. a_1`, padded with PAD up to
  `T + 1` tokens when `2L + 1 < T + 1`.
- For next-token prediction, `inputs = seq[:T]` and `targets = seq[1:T+1]`,
  with `targets[t] = -100` (the ignore_index) wherever the token being
  predicted is not part of the reversed half: the prompt (content and SEP)
  and the padding. So for T = 64, L = 32: `targets[:32] = -100`, and
  `targets[32:] = a_32 .. a_1`, predicted from inputs ending at SEP, a_32, ...

Splits: every content sequence belongs to exactly one split, decided by a hash
of its symbols (`heldout` when the hash lands in the first
`heldout_fraction` of its range). Samplers draw uniformly and reject
sequences of the other split (spaces of at most 65,536 sequences are
enumerated and drawn from the split's member list instead), so train and
held-out sets can never share a sequence. Sampling is seeded: the same
(split, n, seed) gives the same arrays.

Exact-sequence accuracy counts an example as right when every supervised
position (targets != -100) is predicted correctly.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

from .dataset import Dataset

__all__ = ["IGNORE_INDEX", "ReversalTask", "ReversalDataset", "exact_sequence_accuracy"]

IGNORE_INDEX = -100

# Fixed odd multipliers for the split hash (a multiplicative hash mod 2**64).
_HASH_SEED = 0x5EED_0F_2E7E
_SPLITS = ("train", "heldout")
_ENUMERATE_BELOW = 1 << 16


def _all_sequences(n_symbols: int, length: int) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n_symbols, dtype=np.int64)] * length, indexing="ij")
    return np.stack(grids, axis=-1).reshape(-1, length)


class ReversalTask:
    """Generator of sequence-reversal examples; see the module docstring for the format."""

    def __init__(self, vocab_size: int = 36, seq_len: int = 64, length: Optional[int] = None, heldout_fraction: float = 0.1):
        if vocab_size < 4:
            raise ValueError(f"ReversalTask: vocab_size must be >= 4 (2 symbols + SEP + PAD), got {vocab_size}")
        if seq_len < 2:
            raise ValueError(f"ReversalTask: seq_len must be >= 2, got {seq_len}")
        if length is None:
            length = seq_len // 2
        if length < 1 or 2 * length + 1 > seq_len + 1:
            raise ValueError(f"ReversalTask: length must be in [1, {seq_len // 2}] for seq_len {seq_len}, got {length}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"ReversalTask: heldout_fraction must be in (0, 1), got {heldout_fraction}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.length = length
        self.heldout_fraction = heldout_fraction
        self.n_symbols = vocab_size - 2
        self.sep = vocab_size - 2
        self.pad = vocab_size - 1
        weights = np.random.default_rng(_HASH_SEED).integers(1, 2**63, size=length, dtype=np.uint64)
        self._hash_weights = weights | np.uint64(1)
        self._heldout_below = np.uint64(int(heldout_fraction * 2**64) - 1)

    def split_of(self, content: np.ndarray) -> np.ndarray:
        """For `[n, length]` content symbols, True where the sequence is held-out."""
        content = np.asarray(content)
        if content.ndim != 2 or content.shape[1] != self.length:
            raise ValueError(f"ReversalTask.split_of: expected content of shape [n, {self.length}], got {content.shape}")
        with np.errstate(over="ignore"):
            h = (content.astype(np.uint64) + np.uint64(1)) * self._hash_weights
            h = h.sum(axis=1, dtype=np.uint64)
            # Mix the high bits down so the threshold test sees all inputs.
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(32)
        return h <= self._heldout_below

    def sample_content(self, n: int, split: str = "train", seed: int = 0) -> np.ndarray:
        """`[n, length]` int64 content symbols of the given split, seeded."""
        if split not in _SPLITS:
            raise ValueError(f"ReversalTask: split must be one of {_SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"ReversalTask: n must be >= 0, got {n}")
        rng = np.random.default_rng([seed, _SPLITS.index(split)])
        want_heldout = split == "heldout"
        if self.n_symbols ** self.length <= _ENUMERATE_BELOW:
            # Small spaces: draw from the split's exact member list (rejection
            # could spin forever on a split that happens to be empty).
            every = _all_sequences(self.n_symbols, self.length)
            members = every[self.split_of(every) == want_heldout]
            if len(members) == 0:
                raise ValueError(f"ReversalTask: the {split} split is empty for {self.n_symbols} symbols and length {self.length}")
            return members[rng.integers(0, len(members), size=n)]
        out = np.empty((n, self.length), dtype=np.int64)
        filled = 0
        rate = self.heldout_fraction if want_heldout else 1.0 - self.heldout_fraction
        while filled < n:
            # Oversample by the acceptance rate so one or two rounds suffice.
            draw = rng.integers(0, self.n_symbols, size=(int((n - filled) / rate) + 16, self.length), dtype=np.int64)
            keep = draw[self.split_of(draw) == want_heldout][: n - filled]
            out[filled : filled + len(keep)] = keep
            filled += len(keep)
        return out

    def encode(self, content: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Content `[n, length]` -> (inputs, targets), both `[n, seq_len]` int64."""
        content = np.asarray(content, dtype=np.int64)
        if content.ndim != 2 or content.shape[1] != self.length:
            raise ValueError(f"ReversalTask.encode: expected content of shape [n, {self.length}], got {content.shape}")
        if content.size and (content.min() < 0 or content.max() >= self.n_symbols):
            raise ValueError(f"ReversalTask.encode: content symbols must be in [0, {self.n_symbols}), got range [{content.min()}, {content.max()}]")
        n, L, T = len(content), self.length, self.seq_len
        seq = np.full((n, T + 1), self.pad, dtype=np.int64)
        seq[:, :L] = content
        seq[:, L] = self.sep
        seq[:, L + 1 : 2 * L + 1] = content[:, ::-1]
        inputs = seq[:, :T].copy()
        targets = seq[:, 1:].copy()
        supervised = np.zeros(T, dtype=bool)
        supervised[L : 2 * L] = True  # targets[t] = seq[t+1]; the reversal sits at seq[L+1 : 2L+1]
        targets[:, ~supervised] = IGNORE_INDEX
        return inputs, targets

    def sample(self, n: int, split: str = "train", seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """`n` seeded examples of `split` as (inputs, targets) `[n, seq_len]` int64 arrays."""
        return self.encode(self.sample_content(n, split, seed))

    def prompts(self, content: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """For generation: prompts `content, SEP` `[n, length+1]` and answers (content reversed) `[n, length]`."""
        content = np.asarray(content, dtype=np.int64)
        prompt = np.concatenate([content, np.full((len(content), 1), self.sep, dtype=np.int64)], axis=1)
        return prompt, content[:, ::-1].copy()

    def batches(self, batch_size: int, split: str = "train", seed: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Endless seeded stream of fresh (inputs, targets) batches."""
        step = 0
        while True:
            yield self.sample(batch_size, split, seed=_stream_seed(seed, step))
            step += 1

    def dataset(self, size: int, split: str = "train", seed: int = 0) -> "ReversalDataset":
        """A fixed map-style dataset of `size` examples."""
        return ReversalDataset(self, size, split, seed)


def _stream_seed(seed: int, step: int) -> int:
    # Distinct from any (seed, split) pair a caller would pass to sample() directly.
    return int(np.random.SeedSequence([seed, step, 0x5E0]).generate_state(1, np.uint64)[0])


class ReversalDataset(Dataset):
    """`size` fixed examples of one split; items are (inputs, targets) int64 `[seq_len]` arrays."""

    def __init__(self, task: ReversalTask, size: int, split: str = "train", seed: int = 0):
        self.task = task
        self.split = split
        self.inputs, self.targets = task.sample(size, split, seed)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.inputs[index], self.targets[index]

    def get_batch(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return self.inputs[indices], self.targets[indices]


def exact_sequence_accuracy(predicted, targets, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of rows whose predictions match the targets at every supervised position.

    `predicted` and `targets` are `[n, T]` integer arrays (or tensors with
    `.numpy()`); positions where `targets == ignore_index` are not compared.
    Use it with teacher-forced argmax predictions, or with greedy generations
    written into the answer positions.
    """
    p = _to_numpy(predicted)
    t = _to_numpy(targets)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"exact_sequence_accuracy: predicted {p.shape} and targets {t.shape} must be the same [n, T] shape")
    if len(t) == 0:
        raise ValueError("exact_sequence_accuracy: no sequences to score")
    ok = (p == t) | (t == ignore_index)
    return float(ok.all(axis=1).mean())


def _to_numpy(x) -> np.ndarray:
    numpy = getattr(x, "numpy", None)
    return np.asarray(numpy() if callable(numpy) else x)
