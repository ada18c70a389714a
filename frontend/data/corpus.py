"""Which text corpus minigpt trains on.

Order of preference:
1. an explicit path (`--data PATH`); a missing file is an error, never a fallback;
2. `tinyshakespeare.txt` found in `$CUTEGRAD_DATA` (a folder, or the file itself),
   the cache folder, `./data/` or `../data/`;
3. tiny Shakespeare downloaded from the char-rnn repository into the cache
   (skipped when `$CUTEGRAD_OFFLINE` is set; bounded by a few seconds and
   silent about why it failed beyond one log line);
4. the embedded corpus shipped inside the package (works offline).

The choice is reported through `log` (default: one line on stderr) and in the
returned `Corpus.description`.
"""

from __future__ import annotations

import os
import sys
import threading
import urllib.request
from importlib import resources
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Union

from .cache import cache_dir, write_atomic

__all__ = ["Corpus", "resolve_corpus", "embedded_corpus", "TINY_SHAKESPEARE_URL"]

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_NAME = "tinyshakespeare.txt"
EMBEDDED_NAME = "embedded_english.txt"
# The genuine file is 1,115,394 bytes; anything much smaller is an error page or a truncation.
_MIN_SHAKESPEARE_BYTES = 1_000_000


class Corpus(NamedTuple):
    text: str
    name: str  # "file", "tinyshakespeare" or "embedded"
    source: str  # path or URL it came from
    description: str


def _stderr_log(message: str) -> None:
    print(f"cutegrad.data: {message}", file=sys.stderr, flush=True)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def embedded_corpus() -> str:
    """The English text that ships with the package."""
    return resources.files(__package__).joinpath("corpus", EMBEDDED_NAME).read_text(encoding="utf-8")


def _local_candidates() -> List[Path]:
    out = []
    env = os.environ.get("CUTEGRAD_DATA")
    if env:
        p = Path(env).expanduser()
        out.append(p if p.is_file() else p / TINY_SHAKESPEARE_NAME)
    out.append(cache_dir() / TINY_SHAKESPEARE_NAME)
    out.append(Path.cwd() / "data" / TINY_SHAKESPEARE_NAME)
    out.append(Path.cwd().parent / "data" / TINY_SHAKESPEARE_NAME)
    return out


def _download(url: str, timeout: float) -> Optional[bytes]:
    # urllib's timeout does not cover DNS resolution, so the whole fetch runs in
    # a daemon thread we stop waiting for after `timeout` seconds.
    result: list = []

    def fetch() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                result.append(r.read())
        except Exception:  # noqa: BLE001 - any failure means "not available"
            pass

    t = threading.Thread(target=fetch, name="cutegrad-corpus-download", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else None


def resolve_corpus(
    path: Optional[Union[str, Path]] = None,
    *,
    download: bool = True,
    timeout: float = 5.0,
    url: str = TINY_SHAKESPEARE_URL,
    log: Callable[[str], None] = _stderr_log,
) -> Corpus:
    """Pick the training text for a language model (see the module docstring)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"--data: no such file: {p}")
        text = _read(p)
        if not text:
            raise ValueError(f"--data: {p} is empty")
        desc = f"corpus: {p} ({len(text):,} characters, from --data)"
        log(desc)
        return Corpus(text, "file", str(p), desc)

    for p in _local_candidates():
        if p.is_file():
            text = _read(p)
            desc = f"corpus: tiny Shakespeare from {p} ({len(text):,} characters)"
            log(desc)
            return Corpus(text, "tinyshakespeare", str(p), desc)

    if download and not os.environ.get("CUTEGRAD_OFFLINE"):
        data = _download(url, timeout)
        if data is not None and len(data) >= _MIN_SHAKESPEARE_BYTES:
            target = cache_dir() / TINY_SHAKESPEARE_NAME
            write_atomic(target, data)
            text = data.decode("utf-8")
            desc = f"corpus: tiny Shakespeare downloaded from {url} to {target} ({len(text):,} characters)"
            log(desc)
            return Corpus(text, "tinyshakespeare", url, desc)
        log("tiny Shakespeare not found locally and not downloadable; using the embedded corpus")

    text = embedded_corpus()
    desc = f"corpus: embedded English text shipped with cutegrad ({len(text):,} characters)"
    log(desc)
    return Corpus(text, "embedded", f"cutegrad.data/corpus/{EMBEDDED_NAME}", desc)
