"""Character-level tokenizer: one id per distinct character of the corpus.

The vocabulary is the sorted set of characters in the training text, so the
same corpus always gives the same ids. Characters absent from it cannot be
encoded and raise a ValueError naming them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

import numpy as np

from .cache import write_atomic

__all__ = ["CharTokenizer"]

_FORMAT = "cutegrad-char-tokenizer-v2"


class CharTokenizer:
    """Maps each character of a fixed alphabet to an id and back."""

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer: the alphabet is empty")
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer: alphabet entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: the alphabet has repeated characters")
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The tokenizer whose alphabet is the sorted set of characters of `text`."""
        if not text:
            raise ValueError("CharTokenizer.from_text: the text is empty")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int64 ids, one per character."""
        index = self._index
        try:
            return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as exc:
            missing = sorted(set(text) - set(index))
            raise ValueError(f"CharTokenizer.encode: characters not in the vocabulary: {missing[:10]!r}") from exc

    def decode(self, ids: Union[Iterable[int], np.ndarray]) -> str:
        """ids -> text; an id outside `[0, vocab_size)` raises."""
        numpy = getattr(ids, "numpy", None)
        arr = np.asarray(numpy() if callable(numpy) else ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.chars)):
            raise ValueError(f"CharTokenizer.decode: ids must be in [0, {len(self.chars)}), got range [{arr.min()}, {arr.max()}]")
        chars = self.chars
        return "".join(chars[i] for i in arr.tolist())

    def save(self, path: Union[str, Path]) -> None:
        """Write the alphabet as JSON."""
        # Code points, not a string: JSON would fuse two adjacent lone surrogates into one character.
        payload = {"format": _FORMAT, "code_points": [ord(c) for c in self.chars]}
        write_atomic(Path(path), json.dumps(payload, ensure_ascii=True).encode("ascii"))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CharTokenizer":
        """Read a tokenizer written by `save`."""
        payload = json.loads(Path(path).read_text(encoding="ascii"))
        if payload.get("format") != _FORMAT:
            raise ValueError(f"CharTokenizer.load: {path} is not a {_FORMAT} file (format={payload.get('format')!r})")
        return cls(chr(c) for c in payload["code_points"])

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
