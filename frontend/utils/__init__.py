"""cutegrad.utils: PyTorch's `torch.utils` names (`cutegrad.utils.data`)."""
from . import data

__all__ = ["data"]
