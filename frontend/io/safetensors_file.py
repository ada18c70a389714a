"""The safetensors file format: `save_file` and `load_file` (flat {name: Tensor}),
the layer under `cutegrad.save` and `cutegrad.load` (checkpoint.py).

The format (https://github.com/huggingface/safetensors):

    8 bytes   N, the header length, unsigned little-endian
    N bytes   JSON: {"__metadata__": {str: str}, name: {"dtype": "F32",
              "shape": [..], "data_offsets": [begin, end]}, ...}
    rest      the tensors' bytes, little-endian, C order; offsets are
              relative to the end of the header

Written here with NumPy and json instead of through `safetensors.numpy`,
which does not know ml_dtypes' bfloat16. The writer lays files out as the
reference (Rust) writer does, byte for byte: tensors in its dtype order then
by name, compact JSON, header padded with spaces so the data starts at a
multiple of 8 bytes.

The reader trusts nothing in the file: every way a truncated or corrupted
file can be malformed raises `SafetensorsError` naming the file and the
problem, before any tensor is built. The writer writes a temporary file in
the target's directory, fsyncs it and renames it over the target, so a crash
or an error leaves either the old file or the new one, never a mix.
"""
import io
import json
import os
import sys
import tempfile
from collections.abc import Mapping

import numpy as np

from .. import dtypes as dt
from ..device import device as _device
from ..tensor import Tensor, from_numpy_owned, numel_of

# Same limit as the reference reader: a header longer than this is corruption.
MAX_HEADER_BYTES = 100_000_000

_NAMES = {
    dt.bool_: "BOOL", dt.uint8: "U8", dt.int8: "I8", dt.int16: "I16", dt.int32: "I32", dt.int64: "I64",
    dt.float16: "F16", dt.bfloat16: "BF16", dt.float32: "F32", dt.float64: "F64",
}
_DTYPES = {v: k for k, v in _NAMES.items()}
# Rank of each dtype in the reference writer's Dtype enum; it writes the
# highest rank first, then by name.
_WRITE_RANK = {dt.bool_: 0, dt.uint8: 1, dt.int8: 2, dt.int16: 3, dt.float16: 4, dt.bfloat16: 5, dt.int32: 6,
               dt.float32: 7, dt.float64: 8, dt.int64: 9}
# Valid safetensors dtypes that cutegrad has no tensor type for.
_FOREIGN = {"U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64"}
_BIG_ENDIAN = sys.byteorder == "big"


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: names the file and what is wrong."""

    def __init__(self, path, problem):
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


# --- writing ------------------------------------------------------------------------
def save_file(state_dict, path, metadata=None):
    """Write a mapping {name: Tensor} to `path` as a safetensors file.

    metadata: optional {str: str} stored under "__metadata__". Non-contiguous
    tensors are written contiguously and device tensors are copied to the
    host first; tensors that share memory are each written in full. The
    write is atomic: on any error the previous file at `path` is untouched.
    """
    stream = is_file_object(path)
    if not stream:
        path = os.fspath(path)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"save_file() expects a mapping of names to tensors, got {type(state_dict).__name__}")
    entries = []
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"save(): tensor names must be str, got {type(name).__name__} {name!r}")
        if name == "__metadata__":
            raise ValueError("save(): '__metadata__' is reserved by the safetensors format and cannot name a tensor")
        if not isinstance(t, Tensor):
            raise TypeError(f"save(): {name!r} is a {type(t).__name__}, not a cutegrad Tensor")
        if t._dtype not in _NAMES:
            raise TypeError(f"save(): {name!r} has dtype {t._dtype}, which safetensors cannot store")
        entries.append((name, t))
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"save(): metadata must be a mapping of str to str, got {type(metadata).__name__}")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"save(): metadata must map str to str, got {k!r}: {v!r}")

    # The reference writer's order, so files come out byte-identical to it;
    # element sizes never grow along it, so with the data starting at a
    # multiple of 8 every tensor is aligned to its element size.
    entries.sort(key=lambda e: (-_WRITE_RANK[e[1]._dtype], e[0]))
    header = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, t in entries:
        nbytes = numel_of(t._shape) * t._dtype.itemsize
        header[name] = {"dtype": _NAMES[t._dtype], "shape": list(t._shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    head += b" " * (-(8 + len(head)) % 8)

    if stream:
        _write_body(path, head, entries)
    else:
        _atomic_write(path, head, entries)


def is_file_object(f):
    """Whether f is an open binary file object (torch.save/torch.load take them as well as paths)."""
    return not isinstance(f, (str, bytes, os.PathLike)) and (hasattr(f, "write") or hasattr(f, "read"))


def _write_body(f, head, entries):
    f.write(len(head).to_bytes(8, "little"))
    f.write(head)
    for _, t in entries:
        f.write(_host_bytes(t))


def _host_bytes(t):
    """The tensor's elements as a C-ordered little-endian uint8 array (a view when possible)."""
    arr = np.ascontiguousarray(t.detach()._host_array()).reshape(-1)
    if _BIG_ENDIAN and arr.dtype.itemsize > 1:
        arr = arr.byteswap()
    return arr.view(np.uint8)


def _atomic_write(path, head, entries):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_body(f, head, entries)
            f.flush()
            os.fchmod(f.fileno(), _new_file_mode(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _new_file_mode(path):
    # mkstemp creates 0600; give the checkpoint the mode open() would have
    # given it (or keep the mode of the file it replaces).
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        pass
    umask = _current_umask()
    return 0o666 & ~umask


def _current_umask():
    # /proc avoids os.umask's set-and-restore, which races with other threads.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync_directory(directory):
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# --- reading ------------------------------------------------------------------------
def _reject_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_header(f, path, file_size):
    """-> (metadata, [(name, dtype, shape, begin, end)] in header order, data start)."""
    if file_size < 8:
        raise SafetensorsError(path, f"truncated: {file_size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(f.read(8), "little")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(path, f"corrupted header length {n} (more than the {MAX_HEADER_BYTES}-byte limit)")
    if 8 + n > file_size:
        raise SafetensorsError(path, f"truncated: the header claims {n} bytes but only {file_size - 8} follow "
                                     "the length field")
    raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(path, f"corrupted header: not UTF-8 ({e})") from None
    if not text.startswith("{"):
        raise SafetensorsError(path, "corrupted header: it does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as e:
        raise SafetensorsError(path, f"corrupted header: invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(path, f"corrupted header: expected a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(path, "corrupted header: '__metadata__' must map strings to strings")
    tensors = [_parse_entry(path, name, info) for name, info in header.items()]
    _check_layout(path, tensors, file_size - 8 - n)
    return metadata, tensors, 8 + n


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _parse_entry(path, name, info):
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(path, f"{where}: expected an object with dtype, shape, data_offsets, got {info!r}")
    keys = set(info)
    if keys != {"dtype", "shape", "data_offsets"}:
        missing = sorted({"dtype", "shape", "data_offsets"} - keys)
        extra = sorted(keys - {"dtype", "shape", "data_offsets"})
        raise SafetensorsError(path, f"{where}: bad header entry (missing {missing}, unexpected {extra})")
    code = info["dtype"]
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        if code in _FOREIGN:
            raise SafetensorsError(path, f"{where}: dtype {code} is valid safetensors but cutegrad has no such dtype")
        raise SafetensorsError(path, f"{where}: unknown dtype {code!r}; expected one of {sorted(_DTYPES)}")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise SafetensorsError(path, f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise SafetensorsError(path, f"{where}: data_offsets must be two non-negative ints, got {offsets!r}")
    begin, end = offsets
    if end < begin:
        raise SafetensorsError(path, f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = numel_of(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise SafetensorsError(path, f"{where}: shape {shape} of {code} needs {nbytes} bytes but data_offsets "
                                     f"[{begin}, {end}] hold {end - begin}")
    return name, dtype, tuple(shape), begin, end


def _check_layout(path, tensors, data_size):
    # Like the reference reader: the tensors tile the data exactly, with no
    # overlap, no unindexed gap and nothing past the last tensor.
    pos = 0
    prev = None
    for name, _, _, begin, end in sorted(tensors, key=lambda e: (e[3], e[4])):
        if end > data_size:
            raise SafetensorsError(path, f"truncated: tensor {name!r} ends at data byte {end} but the file holds "
                                         f"only {data_size} data bytes")
        if begin < pos:
            raise SafetensorsError(path, f"corrupted header: tensor {name!r} at bytes [{begin}, {end}) overlaps "
                                         f"tensor {prev!r} ending at {pos}")
        if begin > pos:
            raise SafetensorsError(path, f"corrupted header: bytes [{pos}, {begin}) before tensor {name!r} belong "
                                         "to no tensor")
        pos, prev = end, name
    if pos != data_size:
        raise SafetensorsError(path, f"corrupted file: {data_size - pos} bytes after the last tensor belong to "
                                     "no tensor")


def load_metadata(path):
    """The "__metadata__" mapping of a safetensors file ({} when it has none)."""
    with open(path, "rb") as f:
        metadata, _, _ = _read_header(f, path, os.fstat(f.fileno()).st_size)
    return dict(metadata or {})


def read_file(path, mmap=False):
    """(metadata or None, {name: host Tensor} in the header's order) of a safetensors file.

    path: a file path, or an open binary file object (read from its position to its end).
    mmap=True maps the file copy-on-write instead of reading it: tensors are
    views of the mapping (zero-copy; in-place changes stay private to this
    process), except tensors whose offset is not aligned to their element
    size, which are copied.
    """
    if is_file_object(path):
        if mmap:
            raise ValueError("mmap=True needs a file path, not a file object")
        name = getattr(path, "name", None)
        name = name if isinstance(name, str) else "<file object>"
        data = path.read()
        f = io.BytesIO(data)
        metadata, entries, start = _read_header(f, name, len(data))
        arrays = _read(f, name, entries, start)
    else:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            metadata, entries, start = _read_header(f, path, size)
            if mmap and size > start:
                arrays = _map(path, entries, start)
            else:
                arrays = _read(f, path, entries, start)
    return metadata, {name: from_numpy_owned(arrays[name], dtype) for name, dtype, _, _, _ in entries}


def load_file(path, device="cpu", mmap=False):
    """Read a safetensors file into {name: Tensor} on `device`, in the header's order."""
    dev = _device(device)
    if dev.type == "cuda":
        from .. import cuda  # noqa: F401  (importing it registers the CUDA storage kernels)
    _, tensors = read_file(path, mmap)
    return tensors if dev.type == "cpu" else {k: t.to(dev) for k, t in tensors.items()}


def _from_le(arr):
    return arr.byteswap() if _BIG_ENDIAN and arr.dtype.itemsize > 1 else arr


def _read(f, path, entries, start):
    arrays = {}
    for name, dtype, shape, begin, end in entries:
        arr = np.empty(shape, dtype.np)
        dst = memoryview(arr.reshape(-1).view(np.uint8))
        f.seek(start + begin)
        got = 0
        while got < len(dst):
            n = f.readinto(dst[got:])
            if not n:
                # The size was checked; a short read means the file shrank under us.
                raise SafetensorsError(path, f"truncated while reading tensor {name!r}")
            got += n
        arrays[name] = _from_le(arr)
    return arrays


def _map(path, entries, start):
    # A plain ndarray view: np.memmap results would leak the subclass into every op.
    mapped = np.asarray(np.memmap(path, dtype=np.uint8, mode="c"))
    arrays = {}
    for name, dtype, shape, begin, end in entries:
        raw = mapped[start + begin:start + end]
        if (start + begin) % dtype.itemsize:
            raw = raw.copy()
        arrays[name] = _from_le(raw.view(dtype.np).reshape(shape))
    return arrays


__all__ = ["SafetensorsError", "save_file", "load_file", "read_file", "load_metadata", "is_file_object",
           "MAX_HEADER_BYTES"]
