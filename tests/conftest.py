"""Shared pytest fixtures for the whole suite.

Append new fixtures at the end, one block each, with a docstring saying what
they are for; keep helpers that are not fixtures in their own *_harness.py.
"""
import os
import zlib

import numpy as np
import pytest

import cutegrad

# Tests that trace CuTeDSL code in this process (wgmma layouts, helpers) need the
# DSL's target arch before the first `import cutlass` of the session, whichever
# test module happens to import it first: without a GPU the DSL assumes sm_100a.
os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")


@pytest.fixture(autouse=True)
def cutegrad_global_state(request):
    """Each test starts from cutegrad's defaults (float32 default dtype, grad
    mode on, the CPU generator seeded from the test's name) and cannot leak
    changes to them into the next test."""
    from cutegrad.autograd import grad_mode
    dtype = cutegrad.get_default_dtype()
    enabled = grad_mode.state.enabled
    # Only the CPU generator: device generators may be mid-way through a
    # module's graph captures, which a reseed would disturb.
    cutegrad.random.cpu_generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    cutegrad.set_default_dtype(dtype)
    grad_mode.state.enabled = enabled


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's node id: reproducible, and
    different for each parametrization."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def dry_cuda():
    """A dry-run CUDA device (cutegrad.cuda.dry_run): the real CUDA backend and
    allocator (on SimulatedMemory) with every `_C` call recorded, not run; for
    launch counts and host-path tests on any machine."""
    with cutegrad.cuda.dry_run() as dry:
        yield dry


@pytest.fixture(params=["native", "python"])
def allocator_fast_path(request, monkeypatch):
    """Runs a test module's `CachingAllocator` both ways: with the exact-size hit in C
    (cutegrad._C.AllocatorFastPath, the default) and with it in Python
    (PythonCachingAllocator, what runs without _C). Use it with
    `pytestmark = pytest.mark.usefixtures("allocator_fast_path")`."""
    from cutegrad.allocator import caching
    if request.param == "native":
        if not caching.NATIVE_FAST_PATH:
            pytest.skip("cutegrad._C (with AllocatorFastPath) is not built")
        cls = caching.CachingAllocator
    else:
        cls = caching.PythonCachingAllocator
    monkeypatch.setattr(request.module, "CachingAllocator", cls)
    return request.param
