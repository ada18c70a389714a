"""cutegrad.cuda.amp: the torch.cuda.amp spellings, bound to device_type "cuda".

`autocast(enabled=True, dtype=float16, cache_enabled=True)` is
`cutegrad.autocast("cuda", ...)`; `GradScaler(...)` is
`cutegrad.amp.GradScaler("cuda", ...)` (which warns and disables itself
without a GPU, as torch's does).
"""
from .. import dtypes as dt
from ..autocast import autocast as _autocast
from ..amp.grad_scaler import GradScaler as _GradScaler


class autocast(_autocast):
    """torch.cuda.amp.autocast: cutegrad.autocast with device_type "cuda"."""

    def __init__(self, enabled=True, dtype=dt.float16, cache_enabled=True):
        super().__init__("cuda", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


class GradScaler(_GradScaler):
    """torch.cuda.amp.GradScaler: cutegrad.amp.GradScaler with device "cuda"."""

    _warn_stacklevel = 3

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 enabled=True):
        super().__init__("cuda", init_scale, growth_factor, backoff_factor, growth_interval, enabled)


__all__ = ["autocast", "GradScaler"]
