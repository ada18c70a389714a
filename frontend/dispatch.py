"""The one registry of kernels: name -> one implementation per backend.

Ops (cutegrad.ops) look their Kernel up once at import and index `impl` by
the device's backend number on each call: no string work on the hot path.
"""
from .device import CPU, CUDA

BACKEND_NAMES = ("cpu", "cuda")


class Kernel:
    __slots__ = ("name", "impl")

    def __init__(self, name):
        self.name = name
        self.impl = [_missing(name, b) for b in BACKEND_NAMES]

    def __repr__(self):
        return f"Kernel({self.name!r})"


def _missing(name, backend):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"kernel '{name}' has no implementation for device '{backend}'")
    fail.missing = True
    return fail


KERNELS = {}


def kernel(name):
    k = KERNELS.get(name)
    if k is None:
        k = KERNELS[name] = Kernel(name)
    return k


def register(name, backend):
    """Decorator: register fn as kernel `name` for backend (device.CPU/CUDA)."""
    def deco(fn):
        kernel(name).impl[backend] = fn
        return fn
    return deco


def has_impl(name, backend):
    return not getattr(kernel(name).impl[backend], "missing", False)


__all__ = ["CPU", "CUDA", "Kernel", "KERNELS", "kernel", "register", "has_impl"]
