"""Where cutegrad keeps downloaded corpora and trained tokenizers.

`$CUTEGRAD_CACHE` wins; otherwise `~/.cache/cutegrad`. Files are written to a
temporary name in the same folder and renamed, so a crash or a concurrent
process never leaves a half-written cache entry behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "write_atomic"]


def cache_dir() -> Path:
    """The cache folder, created if missing."""
    root = os.environ.get("CUTEGRAD_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "cutegrad"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
