"""Python-side access to the native GEMM (cutegrad._C.gemm).

`import cutegrad` never loads the extension: a machine without the built
module or without a CUDA driver still imports cutegrad and runs on the CPU.
The first GPU GEMM asks for the module here and gets a clear error if it is
missing or cannot load.  The full argument contract is in docs/kernels.md.
"""

_native = None


def native():
    """The cutegrad._C module, imported on first use."""
    global _native
    if _native is None:
        try:
            from cutegrad import _C
        except ImportError as exc:
            raise RuntimeError(
                "cutegrad._C (the GPU kernels) is not available: "
                f"{exc}. Build it with `pip install -e .` (see docs/kernels.md)."
            ) from exc
        _native = _C
    return _native


def gemm(*args, **kwargs):
    """cutegrad._C.gemm: D = epilogue(A @ B (+ D)) on device pointers; returns the kernel's name."""
    return native().gemm(*args, **kwargs)
