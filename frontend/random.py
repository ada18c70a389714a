"""Seeded random state: `cutegrad.manual_seed` and `cutegrad.Generator`.

The CPU generator wraps NumPy's PCG64. Device generators (Philox counters,
see docs/graphs.md) register a reseed hook here so one manual_seed call
reseeds every device, as torch.manual_seed does.
"""
import numpy as np


class Generator:
    __slots__ = ("_seed", "_np", "device")

    def __init__(self, device="cpu"):
        self.device = device
        self.manual_seed(67280421310721)

    def manual_seed(self, seed):
        seed = int(seed)
        self._seed = seed
        self._np = np.random.Generator(np.random.PCG64(seed & ((1 << 64) - 1)))
        return self

    def initial_seed(self):
        return self._seed

    def seed(self):
        s = int(np.random.SeedSequence().entropy) & ((1 << 63) - 1)
        self.manual_seed(s)
        return s

    def numpy(self):
        return self._np

    def get_state(self):
        return self._np.bit_generator.state

    def set_state(self, state):
        self._np.bit_generator.state = state


_default = Generator()
_reseed_hooks = []


def cpu_generator():
    return _default


def manual_seed(seed):
    """Seed the CPU generator and every device generator."""
    _default.manual_seed(seed)
    for hook in _reseed_hooks:
        hook(int(seed))
    return _default


def seed():
    s = _default.seed()
    for hook in _reseed_hooks:
        hook(s)
    return s


def initial_seed():
    return _default.initial_seed()


def add_reseed_hook(fn):
    """Device generators call this once so manual_seed reaches them."""
    _reseed_hooks.append(fn)
