"""Byte-level BPE tokenizer trained on a corpus.

Design:
- Ids 0..255 are the bytes; merge `i` (0-based) creates id `256 + i` from a
  pair of existing ids. Text is UTF-8 encoded with `surrogatepass`, so every
  Python str (lone surrogates included) maps to bytes and back:
  `decode(encode(s)) == s` for any `s`.
- Pre-tokenization: the text is split into chunks (letters with an optional
  leading space, digit runs, punctuation runs, whitespace runs; chunks are cut
  to at most 64 characters). Merges never cross chunk boundaries, and the
  chunks concatenate back to the text exactly.
- Training works on the distinct chunks weighted by their counts. Pair counts
  and, per pair, the set of chunks containing it are kept up to date after
  each merge (only the chunks holding the merged pair are touched), and a heap
  with lazy invalidation yields the most frequent pair; ties go to the
  smallest (left id, right id). So a merge costs time proportional to the
  chunks it changes, not to the corpus. Training stops early if no pair is
  left.
- Encoding applies merges by rank within each chunk (lowest rank first, all
  its occurrences left to right), which reproduces the training-time
  segmentation; distinct chunks are encoded once and memoised.
- A trained tokenizer is cached as JSON under `cache_dir()/bpe/`, keyed by the
  SHA-256 of the corpus, the vocab size and the format version.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .cache import cache_dir, write_atomic

__all__ = ["BPETokenizer", "pretokenize"]

_FORMAT = "cutegrad-byte-bpe-v1"
_CHUNK = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\w\s]|_)+|\s+(?!\S)|\s+")
_MAX_CHUNK_CHARS = 64


def pretokenize(text: str) -> List[str]:
    """Split `text` into the chunks BPE merges within; `"".join(chunks) == text`."""
    chunks = []
    for piece in _CHUNK.findall(text):
        if len(piece) <= _MAX_CHUNK_CHARS:
            chunks.append(piece)
        else:
            # Long runs (e.g. unspaced scripts) are cut so per-chunk encoding stays short.
            chunks.extend(piece[i : i + _MAX_CHUNK_CHARS] for i in range(0, len(piece), _MAX_CHUNK_CHARS))
    return chunks


def _to_bytes(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


class BPETokenizer:
    """Byte-level BPE with a learned merge list. Build with `train` or `load`."""

    def __init__(self, merges: Sequence[Tuple[int, int]]):
        vocab = [bytes([b]) for b in range(256)]
        ranks = {}
        for rank, (a, b) in enumerate(merges):
            a, b = int(a), int(b)
            if not (0 <= a < len(vocab) and 0 <= b < len(vocab)):
                raise ValueError(f"BPETokenizer: merge {rank} ({a}, {b}) refers to an id not yet defined")
            if (a, b) in ranks:
                raise ValueError(f"BPETokenizer: merge {rank} ({a}, {b}) repeats an earlier merge")
            ranks[(a, b)] = rank
            vocab.append(vocab[a] + vocab[b])
        self.merges = [tuple(map(int, m)) for m in merges]
        self._ranks = ranks
        self._vocab = vocab
        self._memo: dict = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for."""
        return self._vocab[token_id]

    # -- training ---------------------------------------------------------------------------

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        """Learn `vocab_size - 256` merges from `text` (fewer if the text runs out of pairs)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 256:
            raise ValueError(f"BPETokenizer.train: vocab_size must be an integer >= 256, got {vocab_size!r}")
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.train: text must be a str, got {type(text).__name__}")
        counts = Counter(pretokenize(text))
        words: List[List[int]] = [list(_to_bytes(w)) for w in counts]
        freqs: List[int] = list(counts.values())

        pair_count: dict = {}
        pair_words: dict = {}
        for wi, (w, f) in enumerate(zip(words, freqs)):
            for pair in zip(w, w[1:]):
                pair_count[pair] = pair_count.get(pair, 0) + f
                where = pair_words.get(pair)
                if where is None:
                    pair_words[pair] = {wi}
                else:
                    where.add(wi)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)

        merges: List[Tuple[int, int]] = []
        next_id = 256
        while next_id < vocab_size and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg:
                continue  # stale heap entry; the current count was pushed when it changed
            merges.append(pair)
            new_id = next_id
            next_id += 1
            a, b = pair
            changed = {}
            for wi in pair_words.pop(pair):
                w = words[wi]
                f = freqs[wi]
                merged = []
                i = 0
                n = len(w)
                while i < n:
                    if i + 1 < n and w[i] == a and w[i + 1] == b:
                        merged.append(new_id)
                        i += 2
                    else:
                        merged.append(w[i])
                        i += 1
                if len(merged) == n:
                    continue  # the pair left this chunk in an earlier merge
                for p in zip(w, w[1:]):
                    changed[p] = changed.get(p, 0) - f
                for p in zip(merged, merged[1:]):
                    changed[p] = changed.get(p, 0) + f
                    if p != pair:
                        where = pair_words.get(p)
                        if where is None:
                            pair_words[p] = {wi}
                        else:
                            where.add(wi)
                words[wi] = merged
            for p, delta in changed.items():
                if delta == 0:
                    continue
                c = pair_count.get(p, 0) + delta
                if c > 0:
                    pair_count[p] = c
                    heapq.heappush(heap, (-c, p))
                else:
                    pair_count.pop(p, None)
                    pair_words.pop(p, None)
            pair_count.pop(pair, None)
        return cls(merges)

    @classmethod
    def train_cached(cls, text: str, vocab_size: int, cache: Optional[Union[str, Path]] = None) -> "BPETokenizer":
        """`train`, memoised on disk by a hash of (text, vocab_size).

        `cache` is the folder (default `cache_dir()/bpe`).
        """
        folder = Path(cache) if cache is not None else cache_dir() / "bpe"
        path = folder / f"{cls.cache_key(text, vocab_size)}.json"
        if path.exists():
            try:
                return cls.load(path)
            except (ValueError, KeyError, json.JSONDecodeError):
                pass  # a damaged cache entry is retrained and overwritten
        tok = cls.train(text, vocab_size)
        tok.save(path)
        return tok

    @staticmethod
    def cache_key(text: str, vocab_size: int) -> str:
        h = hashlib.sha256()
        h.update(f"{_FORMAT}\0{vocab_size}\0".encode())
        h.update(_to_bytes(text))
        return h.hexdigest()[:32]

    # -- encoding ---------------------------------------------------------------------------

    def _encode_chunk(self, chunk: str) -> List[int]:
        ids = list(_to_bytes(chunk))
        ranks = self._ranks
        while len(ids) > 1:
            best = None
            best_rank = None
            for p in zip(ids, ids[1:]):
                r = ranks.get(p)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = p, r
            if best is None:
                break
            a, b = best
            new_id = 256 + best_rank
            merged = []
            i = 0
            n = len(ids)
            while i < n:
                if i + 1 < n and ids[i] == a and ids[i + 1] == b:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            ids = merged
        return ids

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int64 ids."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode: text must be a str, got {type(text).__name__}")
        memo = self._memo
        out: List[int] = []
        for chunk in pretokenize(text):
            ids = memo.get(chunk)
            if ids is None:
                ids = self._encode_chunk(chunk)
                if len(memo) < 1_000_000:
                    memo[chunk] = ids
            out.extend(ids)
        return np.array(out, dtype=np.int64)

    def decode(self, ids: Union[Iterable[int], np.ndarray]) -> str:
        """ids -> text. Exact inverse of `encode`; a sequence that does not form
        valid UTF-8 (e.g. a model's sample cut inside a character) decodes with
        U+FFFD replacement characters."""
        numpy = getattr(ids, "numpy", None)
        arr = np.asarray(numpy() if callable(numpy) else ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"BPETokenizer.decode: ids must be in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        vocab = self._vocab
        data = b"".join(vocab[i] for i in arr.tolist())
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> None:
        """Write the merge list as JSON (atomically)."""
        payload = {"format": _FORMAT, "vocab_size": self.vocab_size, "merges": [list(m) for m in self.merges]}
        write_atomic(Path(path), json.dumps(payload, separators=(",", ":")).encode("ascii"))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "BPETokenizer":
        """Read a tokenizer written by `save`."""
        payload = json.loads(Path(path).read_text(encoding="ascii"))
        if payload.get("format") != _FORMAT:
            raise ValueError(f"BPETokenizer.load: {path} is not a {_FORMAT} file (format={payload.get('format')!r})")
        tok = cls([tuple(m) for m in payload["merges"]])
        if tok.vocab_size != payload["vocab_size"]:
            raise ValueError(f"BPETokenizer.load: {path} says vocab_size {payload['vocab_size']} but holds {tok.vocab_size}")
        return tok

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
