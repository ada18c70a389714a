"""cutegrad.io: checkpoints in the safetensors format, and DLPack exchange.

`save`/`load` read and write safetensors files (see docs/io.md);
`from_dlpack` and `Tensor.__dlpack__` share memory with NumPy, PyTorch and
any other DLPack library.
"""
from .safetensors_file import SafetensorsError, save, load, load_metadata
from .dlpack import from_dlpack

__all__ = ["SafetensorsError", "save", "load", "load_metadata", "from_dlpack"]
