"""The dry-run CUDA device: the real frontend, dispatch, CUDA backend and caching
allocator run on any machine, and every kernel call is recorded instead of run.

    with cutegrad.cuda.dry_run() as dry:
        x = cutegrad.randn(64, 256, device="cuda")
        y = x + x
    dry.count("elementwise")        # 1
    dry.launches()                  # Counter({'random': 1, 'elementwise': 1})

Inside the block:
- `cutegrad._C` is replaced by `RecordingKernels`: every attribute is a function
  that appends `(name, args, kwargs)` to `dry.calls` and returns None, so a kernel
  entry added to `_C` later is recorded without changing this module. Entries
  whose callers use a result get one from `RETURNS` (gemm: a kernel name);
  `dry.kernels.returns(name, fn)` adds one. Entries that launch nothing are
  answered without being recorded: the queries in `QUERIES` (load_kernels,
  gemm_specializations, attention_backward_workspace) and the `set_*` entries
  that configure the module (the GEMM's workspace allocator).
- the CUDA driver is `DryDriver` (cutegrad.cuda.dry_driver): no GPU is touched;
  copies and memsets queued on a stream are recorded in `dry.work`.
- every device's caching allocator runs over `SimulatedMemory` (`dry.allocator(i)`),
  so allocation, its fast path and its statistics are real.
- devices, streams, events, the current stream and Philox generators are fresh;
  everything is restored on exit, also on a machine with a GPU in use (real CUDA
  tensors must not be touched inside the block, nor dry-run tensors after it).

Values are not computed: an output holds whatever the simulated device holds,
and reading one back (`.item()`, `.cpu()`) gives zeros. Graph capture is not
simulated. The block is meant for one thread.
"""
import collections
import sys

from . import capture_guard, driver as _driver, index_errors, pinned, streams
from .device import current_device
from .dry_driver import DryDriver

_device = sys.modules[current_device.__module__]  # the package's name `device` is the context manager

def _attention_backward_workspace(batch, sq, hq, sk, head_dim, deterministic):
    # kernels/cuda/attention_bwd_bindings.cpp's formula with kernels/cute/attention_bwd.py's
    # 64-row query and 128-key blocks: sizes only shape the simulated allocations.
    sq_pad = -(-sq // 64) * 64
    parts = -(-sk // 128) if deterministic else 1
    return batch * hq * sq_pad, parts * batch * hq * sq_pad * head_dim, parts


# Results of the kernel entries whose callers read one (recorded like every launch).
RETURNS = {
    "gemm": lambda *args, **kwargs: "dry_run",
}
# Entries that launch nothing and only answer a question (module loading, the kernel
# table, workspace sizes): answered, never recorded, so launch counts stay launches.
QUERIES = {
    "load_kernels": lambda *args, **kwargs: 0,
    "gemm_specializations": lambda *args, **kwargs: [],
    "attention_backward_workspace": _attention_backward_workspace,
}


class RecordingKernels:
    """Stands in for the `cutegrad._C` module: each attribute records its calls in `calls`."""

    def __init__(self, calls, returns=RETURNS):
        self.calls = calls
        self._returns = dict(returns)

    def returns(self, name, fn):
        """Make entry `name` answer fn(*args, **kwargs) (after recording the call)."""
        self._returns[name] = fn
        self.__dict__.pop(name, None)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        calls = self.calls
        answer = self._returns.get(name)
        if name.startswith("set_") or name in QUERIES:
            query = QUERIES.get(name, lambda *args, **kwargs: None)

            def record(*args, **kwargs):
                return query(*args, **kwargs)
        elif answer is None:
            def record(*args, **kwargs):
                calls.append((name, args, kwargs))
        else:
            def record(*args, **kwargs):
                calls.append((name, args, kwargs))
                return answer(*args, **kwargs)
        record.__name__ = name
        setattr(self, name, record)  # later lookups are a plain attribute read
        return record


class DryRun:
    """What a dry run recorded. `calls`: the `_C` calls as (name, args, kwargs);
    `work`: the driver's stream work (copies, memsets) as (name, args)."""

    def __init__(self, devices=1):
        self.calls = []
        self.work = []
        self.kernels = RecordingKernels(self.calls)
        self.driver = DryDriver(devices, self.work)
        self.devices = devices
        self._saved = None

    def count(self, name=None):
        """Number of `_C` calls named `name` (all of them for None)."""
        if name is None:
            return len(self.calls)
        return sum(1 for c in self.calls if c[0] == name)

    def names(self):
        """Names of the `_C` calls in order."""
        return [c[0] for c in self.calls]

    def launches(self):
        """Counter of everything queued on streams: `_C` calls and driver copies/memsets."""
        return collections.Counter([c[0] for c in self.calls] + [w[0] for w in self.work])

    def reset(self):
        """Forget what was recorded so far (the allocator and tensors stay)."""
        del self.calls[:]
        del self.work[:]

    def allocator(self, device=0):
        """The caching allocator (over SimulatedMemory) of a dry-run device."""
        from cutegrad.allocator import get_allocator
        return get_allocator(device)

    # --- entering and leaving ------------------------------------------------------------
    def __enter__(self):
        if self._saved is not None:
            raise RuntimeError("this dry run is already active")
        if capture_guard.any_capture_underway():
            raise RuntimeError("cutegrad.cuda.dry_run() cannot start while a CUDA graph capture is underway")
        self._saved = _swap_state(self._fresh_state())
        return self

    def __exit__(self, *exc):
        _swap_state(self._saved)
        self._saved = None
        return False

    def _fresh_state(self):
        from cutegrad.allocator import CachingAllocator, SimulatedMemory
        allocators = {i: CachingAllocator(SimulatedMemory(device=i, base=0x7F0000000000 + (i << 40)))
                      for i in range(self.devices)}
        return {
            (_driver, "_drv"): self.driver, (_driver, "_init_failure"): None,
            (_driver, "_device_count"): self.devices, (_driver, "_primary_ctx"): {},
            (_driver, "_capture_error_codes"): frozenset(),
            (_device, "_props_cache"): {}, (streams, "_default_streams"): {},
            (index_errors, "_records"): {}, (pinned, "_free"): {},
            (_allocator_module(), "_default_allocators"): allocators,
            (_launch_module(), "_allocators"): {}, (_launch_module(), "_native"): self.kernels,
            (_gemm_module(), "_native"): self.kernels, (_linalg_module(), "_gemm_fn"): None,
            (_column_sum_module(), "_counters"): {},
            (_rng_module(), "_default_generators"): {},
            (_driver._tls, None): {}, (_device._tls, None): {}, (streams._tls, None): {},
        }


def _swap_state(new):
    """Install `new` ({(module or thread-local, attribute or None): value}); return what it replaced.

    A key with attribute None stands for the calling thread's whole thread-local dict.
    """
    old = {}
    for (owner, attr), value in new.items():
        if attr is None:
            old[(owner, None)] = dict(owner.__dict__)
            owner.__dict__.clear()
            owner.__dict__.update(value)
        else:
            old[(owner, attr)] = getattr(owner, attr)
            setattr(owner, attr, value)
    return old


def _allocator_module():
    import cutegrad.allocator
    return cutegrad.allocator


def _launch_module():
    from cutegrad.backends.cuda import launch
    return launch


def _column_sum_module():
    from cutegrad.backends.cuda import column_sum
    return column_sum


def _linalg_module():
    from cutegrad.backends.cuda import linalg
    return linalg


def _gemm_module():
    from cutegrad import _gemm
    return _gemm


def _rng_module():
    from cutegrad.graphs import rng
    return rng


def dry_run(devices=1):
    """A context manager running CUDA work on `devices` simulated GPUs with every kernel recorded.

    Returns the `DryRun` that records the block's calls (see this module's docstring).
    """
    return DryRun(devices)
