"""cutegrad.io: checkpoints in the safetensors format, and DLPack exchange.

`save`/`load` write and read whole checkpoints (nested dicts, lists and
tuples of tensors and plain values; see docs/io.md) as safetensors files;
`save_file`/`load_file` are the flat {name: Tensor} layer under them.
`from_dlpack` and `Tensor.__dlpack__` share memory with NumPy, PyTorch and
any other DLPack library.
"""
from .safetensors_file import SafetensorsError, save_file, load_file, load_metadata
from .checkpoint import save, load
from .dlpack import from_dlpack

__all__ = ["SafetensorsError", "save", "load", "save_file", "load_file", "load_metadata", "from_dlpack"]
