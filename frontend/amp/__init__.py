"""cutegrad.amp: automatic mixed precision in torch.amp's shape.

`cutegrad.amp.autocast` is `cutegrad.autocast` (the same class: a context
manager and a decorator, docs/autocast.md); `GradScaler` is dynamic loss
scaling for float16 (grad_scaler.py, docs/amp.md).
"""
from ..autocast import autocast, is_autocast_enabled, get_autocast_dtype
from .grad_scaler import GradScaler


def is_autocast_available(device_type):
    """Whether autocast supports device_type ("cpu" and "cuda")."""
    return device_type in ("cpu", "cuda")


__all__ = ["autocast", "GradScaler", "is_autocast_available", "is_autocast_enabled", "get_autocast_dtype"]
