"""Language-model data: token windows over a corpus, split by position.

A token stream of length N is split at `round(N * (1 - val_fraction))`: the
first part is training data, the rest validation, so no window crosses from
one to the other. A window starting at `i` is `seq_len + 1` consecutive
tokens; inputs are its first `seq_len`, targets its last `seq_len`.

`TextDataset` is map-style (item `i` is the window starting at `i`, so a
shuffled DataLoader visits every window once per epoch), and `random_batches`
draws windows at uniformly random starts, vectorised, as a nanoGPT-style
training loop does.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Tuple, Union

import numpy as np

from .bpe import BPETokenizer
from .char_tokenizer import CharTokenizer
from .dataset import Dataset

__all__ = ["TextDataset", "TextData", "split_tokens", "prepare_text"]


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> Tuple[np.ndarray, np.ndarray]:
    """(train, val): the first `1 - val_fraction` of the stream and the rest."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split_tokens: val_fraction must be in [0, 1), got {val_fraction}")
    tokens = np.asarray(tokens)
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    return tokens[:cut], tokens[cut:]


class TextDataset(Dataset):
    """Windows of `seq_len + 1` tokens over a 1-D token array; items are (inputs, targets) int64."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"TextDataset: tokens must be one-dimensional, got shape {tokens.shape}")
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"TextDataset: tokens must be integers, got dtype {tokens.dtype}")
        if seq_len < 1:
            raise ValueError(f"TextDataset: seq_len must be >= 1, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ValueError(f"TextDataset: {len(tokens)} tokens are too few for one window of seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens.astype(np.int64, copy=False)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"TextDataset: window {index} out of range for {n} windows")
        w = self.tokens[index : index + self.seq_len + 1]
        return w[:-1], w[1:]

    def get_batch(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)[:, None] + np.arange(self.seq_len + 1)
        w = self.tokens[idx]
        return w[:, :-1], w[:, 1:]

    def random_batches(self, batch_size: int, seed: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Endless (inputs, targets) `[batch_size, seq_len]` int64 NumPy batches of random windows."""
        if batch_size < 1:
            raise ValueError(f"TextDataset.random_batches: batch_size must be >= 1, got {batch_size}")
        rng = np.random.default_rng(seed)
        n = len(self)
        while True:
            yield self.get_batch(rng.integers(0, n, size=batch_size))


class TextData(NamedTuple):
    """A tokenized corpus ready for a language model."""

    tokenizer: Union[BPETokenizer, CharTokenizer]
    train: TextDataset
    val: TextDataset

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def prepare_text(
    text: str,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    seq_len: int = 128,
    val_fraction: float = 0.1,
    cache: bool = True,
) -> TextData:
    """Tokenize `text` (`"bpe"`: byte-level BPE of `vocab_size`, trained and cached;
    `"char"`: one id per character) and split it into train/val windows."""
    if tokenizer == "bpe":
        tok = BPETokenizer.train_cached(text, vocab_size) if cache else BPETokenizer.train(text, vocab_size)
    elif tokenizer == "char":
        tok = CharTokenizer.from_text(text)
    else:
        raise ValueError(f"prepare_text: tokenizer must be 'bpe' or 'char', got {tokenizer!r}")
    train, val = split_tokens(tok.encode(text), val_fraction)
    return TextData(tok, TextDataset(train, seq_len), TextDataset(val, seq_len))
