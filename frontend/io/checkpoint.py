"""`cutegrad.save` / `cutegrad.load`: whole checkpoints as torch.save users write
them, stored as safetensors and never pickled.

    cutegrad.save({"model": model.state_dict(), "optim": opt.state_dict(),
                   "step": 3, "config": {...}}, "ckpt.safetensors")

A flat {str: Tensor} mapping is written as a plain safetensors file (what
safetensors.torch.save_file writes, byte for byte). Anything else is a
"tree": every tensor is stored under a readable, unique name made from its
path ("model.fc.weight", "optim.state.0.exp_avg"), and the structure with the
non-tensor values goes into the header's metadata as JSON under TREE_KEY.
JSON keeps None, bools, ints, strings, finite floats, lists and str-keyed
dicts as they are; the rest is tagged with a one-key object whose key starts
with "@" (a user dict key starting with "@" forces the tagged dict form, so
the encoding is unambiguous):

    {"@tensor": name}                a tensor (plus "device" when not saved from the CPU)
    {"@tuple": [...]}                a tuple
    {"@dict": [[key, value], ...]}   a dict with non-str keys (optimizer state's int keys)
    {"@float": "inf"|"-inf"|"nan"}   a non-finite float (strict JSON has none)
    {"@dtype": "float32"}, {"@device": "cuda:0"}

Loading parses JSON and builds tensors from bytes: no code from the file ever
runs. A tensor object referenced twice in the saved tree is stored once and
comes back as one tensor referenced twice (as torch.save keeps sharing).
"""
import json
import math
import os
import warnings
from collections.abc import Mapping

import numpy as np

from .. import dtypes as dt
from ..device import device as _device
from ..tensor import Tensor
from .safetensors_file import SafetensorsError, is_file_object, read_file, save_file

TREE_KEY = "cutegrad.tree"
_TAGS = ("@tensor", "@tuple", "@dict", "@float", "@dtype", "@device")
_PICKLE_SUFFIXES = (".pt", ".pth")


def _warn_suffix(path, verb):
    if not is_file_object(path) and os.fspath(path).endswith(_PICKLE_SUFFIXES):
        warnings.warn(f"cutegrad.{verb}({os.fspath(path)!r}): cutegrad checkpoints are safetensors files, not "
                      f"PyTorch's pickle format; torch.load cannot read this file (safetensors.torch.load_file "
                      f"can). Name it '.safetensors' to say so.", UserWarning, stacklevel=3)


def _is_flat(obj):
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


# --- saving ---------------------------------------------------------------------------
class _Encoder:
    """Walks the saved object: tensors to unique names, the rest to JSON values."""

    def __init__(self):
        self.tensors = {}   # name -> Tensor
        self.names = {}     # id(tensor) -> name (a tensor saved twice is stored once)

    def tensor_name(self, t, where):
        name = self.names.get(id(t))
        if name is not None:
            return name
        base = where or "tensor"
        name, n = base, 1
        while name in self.tensors or name == "__metadata__":
            name, n = f"{base}~{n}", n + 1
        self.tensors[name] = t
        self.names[id(t)] = name
        return name

    def encode(self, v, where):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, Tensor):
            ref = {"@tensor": self.tensor_name(v, where)}
            if v.device.type != "cpu":
                ref["device"] = str(v.device)
            return ref
        if isinstance(v, (int, np.integer)) and not isinstance(v, np.bool_):
            return int(v)
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, (float, np.floating)):
            v = float(v)
            if math.isfinite(v):
                return v
            return {"@float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
        if isinstance(v, list):
            return [self.encode(x, _join(where, i)) for i, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"@tuple": [self.encode(x, _join(where, i)) for i, x in enumerate(v)]}
        if isinstance(v, Mapping):
            if all(isinstance(k, str) and not k.startswith("@") for k in v):
                return {k: self.encode(x, _join(where, k)) for k, x in v.items()}
            return {"@dict": [[self.encode_key(k, where), self.encode(x, _join(where, k))] for k, x in v.items()]}
        if isinstance(v, dt.DType):
            return {"@dtype": v.name}
        if isinstance(v, _device):
            return {"@device": str(v)}
        raise TypeError(_unsupported(v, where))

    def encode_key(self, k, where):
        if isinstance(k, Tensor) or not isinstance(k, (str, int, float, bool, tuple, type(None), np.generic)):
            raise TypeError(f"cutegrad.save: the dict at {where or 'the top level'!r} has a key of type "
                            f"{type(k).__name__} ({k!r}); keys must be str, int, float, bool, None or tuples of "
                            f"these")
        return self.encode(k, where)


def _join(where, key):
    return f"{where}.{key}" if where else str(key)


def _unsupported(v, where):
    kind = f"{type(v).__module__}.{type(v).__qualname__}"
    hint = ""
    if hasattr(v, "state_dict") and callable(v.state_dict):
        hint = " Save its state_dict() instead, and rebuild the object before load_state_dict()."
    elif type(v).__module__.startswith("torch"):
        hint = " Convert torch tensors with cutegrad.from_dlpack(t) first."
    elif isinstance(v, np.ndarray):
        hint = " Convert NumPy arrays with cutegrad.from_numpy(a) first."
    return (f"cutegrad.save: cannot store a {kind} at {where or 'the top level'!r}: checkpoints hold tensors, "
            f"None, bools, ints, floats, strings, dtypes, devices, and lists, tuples and dicts of these (storing "
            f"other objects would need pickle, which cutegrad never uses).{hint}")


def save(obj, f, metadata=None):
    """Write `obj` to `f` (a path, or an open binary file object) as a safetensors file (see the
    module docstring).

    obj: a Tensor, or (nested) dicts/lists/tuples of tensors and plain values.
    metadata: optional {str: str} stored in the header next to the tree.
    The write to a path is atomic: on any error the previous file there is untouched.
    """
    _check_target(f, "save")
    _warn_suffix(f, "save")
    if _is_flat(obj):
        save_file(obj, f, metadata)
        return
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"cutegrad.save: metadata must be a mapping of str to str, got {type(metadata).__name__}")
    meta = dict(metadata or {})
    if TREE_KEY in meta:
        raise ValueError(f"cutegrad.save: the metadata key {TREE_KEY!r} is reserved for the checkpoint's structure")
    enc = _Encoder()
    tree = enc.encode(obj, "")
    meta[TREE_KEY] = json.dumps(tree, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    save_file(enc.tensors, f, meta)


# --- loading --------------------------------------------------------------------------
def load(f, map_location=None, weights_only=True, mmap=False):
    """Read a file written by `save` (or any safetensors file; a path or an open binary file
    object) back into its object.

    map_location as torch.load's: None puts every tensor where it was saved
    from (plain safetensors files record no device: the CPU); a device or
    device string puts all of them there; a dict maps saved locations
    ("cpu", "cuda:1") to new ones (others stay); a callable gets
    (tensor on the CPU, saved location) and returns the tensor to use (None:
    the default). weights_only is accepted for torch's signature and changes
    nothing: loading never runs code, whatever its value. mmap=True maps the
    file instead of reading it (CPU tensors are then views of the mapping).
    """
    _check_target(f, "load")
    if weights_only is not None and not isinstance(weights_only, bool):
        raise TypeError(f"cutegrad.load: weights_only must be a bool or None, got {weights_only!r}")
    place = _placer(map_location)
    try:
        metadata, tensors = read_file(f, mmap)
    except SafetensorsError as e:
        raise _explain_foreign(f) or e from None
    tree = (metadata or {}).get(TREE_KEY)
    if tree is None:
        return {name: place(t, "cpu") for name, t in tensors.items()}
    try:
        spec = json.loads(tree)
    except ValueError as e:
        raise SafetensorsError(f, f"corrupted checkpoint structure under {TREE_KEY!r}: invalid JSON ({e})") from None
    dec = _Decoder(f, tensors, place)
    obj = dec.decode(spec)
    unused = sorted(set(tensors) - dec.used)
    if unused:
        raise SafetensorsError(f, f"corrupted checkpoint structure: tensors {unused[:5]} are in the file but not in "
                                  f"its structure")
    return obj


def _check_target(f, verb):
    if not isinstance(f, (str, os.PathLike)) and not is_file_object(f):
        raise TypeError(f"cutegrad.{verb}: expected a file path (str or os.PathLike) or a binary file object, got "
                        f"{type(f).__name__}")


def _explain_foreign(path):
    """A clearer error for a PyTorch zip or pickle checkpoint: its first bytes are a zip or pickle
    signature that, read as safetensors' header length, points past the end of the file."""
    if is_file_object(path):  # already consumed: the reader's own error stands
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return None
    signature = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04",
                                                                                       b"\x05"))
    if len(head) < 8 or not signature or int.from_bytes(head, "little") <= size - 8:
        return None
    return SafetensorsError(path, "this looks like a PyTorch torch.save file (zip/pickle); cutegrad reads only "
                                  "safetensors and never unpickles. Convert it once where torch is installed: "
                                  "safetensors.torch.save_file(torch.load(path), 'model.safetensors') for a flat "
                                  "state_dict")


def _placer(map_location):
    """fn(host tensor, saved location str) -> tensor where map_location puts it."""
    def move(t, where):
        dev = _device(where)
        if dev.type == "cpu":
            return t
        from .. import cuda  # noqa: F401  (importing it registers the CUDA storage kernels)
        return t.to(dev)

    if map_location is None:
        return move
    if isinstance(map_location, (str, _device)):
        target = _device(map_location)
        return lambda t, where: move(t, target)
    if isinstance(map_location, Mapping):
        table = {str(_device(k)): str(_device(v)) for k, v in map_location.items()}
        return lambda t, where: move(t, table.get(where, where))
    if callable(map_location):
        def call(t, where):
            out = map_location(t, where)
            if out is None:
                return move(t, where)
            if not isinstance(out, Tensor):
                raise TypeError(f"cutegrad.load: map_location returned a {type(out).__name__}, expected a Tensor "
                                f"or None")
            return out
        return call
    raise TypeError(f"cutegrad.load: map_location must be None, a device, a str, a dict or a callable, got "
                    f"{type(map_location).__name__}")


class _Decoder:
    def __init__(self, path, tensors, place):
        self.path, self.tensors, self.place = path, tensors, place
        self.used = set()
        self.placed = {}

    def bad(self, what):
        return SafetensorsError(self.path, f"corrupted checkpoint structure: {what}")

    def decode(self, v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self.decode(x) for x in v]
        if not isinstance(v, dict):
            raise self.bad(f"unexpected JSON value {v!r}")
        tag = next((k for k in v if k.startswith("@")), None)
        if tag is None:
            return {k: self.decode(x) for k, x in v.items()}
        if tag not in _TAGS:
            raise self.bad(f"unknown tag {tag!r}")
        arg = v[tag]
        if tag == "@tensor":
            return self.tensor(v)
        if len(v) != 1:
            raise self.bad(f"a {tag} entry has extra keys {sorted(set(v) - {tag})}")
        if tag == "@tuple" and isinstance(arg, list):
            return tuple(self.decode(x) for x in arg)
        if tag == "@dict" and isinstance(arg, list) and all(isinstance(p, list) and len(p) == 2 for p in arg):
            out = {}
            for k, x in arg:
                key, value = self.decode(k), self.decode(x)
                try:
                    out[key] = value
                except TypeError:
                    raise self.bad(f"unhashable dict key {k!r}") from None
            return out
        if tag == "@float" and arg in ("inf", "-inf", "nan"):
            return float(arg)
        if tag in ("@dtype", "@device") and isinstance(arg, str):
            try:
                return dt.from_name(arg) if tag == "@dtype" else _device(arg)
            except (TypeError, ValueError) as e:
                raise self.bad(str(e)) from None
        raise self.bad(f"bad {tag} entry {v!r}")

    def tensor(self, v):
        name, where = v["@tensor"], v.get("device", "cpu")
        if set(v) - {"@tensor", "device"} or not isinstance(name, str) or not isinstance(where, str):
            raise self.bad(f"bad @tensor entry {v!r}")
        if name not in self.tensors:
            raise self.bad(f"it names a tensor {name!r} that the file does not hold")
        if name not in self.placed:
            try:
                where = str(_device(where))
            except ValueError as e:
                raise self.bad(str(e)) from None
            self.placed[name] = self.place(self.tensors[name], where)
            self.used.add(name)
        return self.placed[name]


__all__ = ["save", "load", "TREE_KEY"]
