"""Python-side access to the native GEMM (cutegrad._C.gemm).

`import cutegrad` never loads the extension: a machine without the built
module or without a CUDA driver still imports cutegrad and runs on the CPU.
The first GPU GEMM asks for the module here and gets a clear error if it is
missing or cannot load.  The full argument contract is in docs/kernels.md.

`_C.gemm` takes dtype, epilogue and path as integer codes (no string parsing
on the hot path); the tables below are those codes, in the order of the enums
in kernels/cuda/gemm_args.h.  `gemm()` here accepts the names, for tests,
benchmarks and interactive use.
"""

# "tf32": fp32 operands that may run on TF32 tensor cores (an operand dtype only).
DTYPES = {"bf16": 0, "fp16": 1, "fp32": 2, "tf32": 3}
EPILOGUES = {"none": 0, "bias": 1, "gelu": 2, "bias_gelu": 3, "gelu_bwd": 4, "residual": 5, "bias_residual": 6,
             "bias_gelu_aux": 7}
PATHS = {"auto": 0, "tensor_core": 1, "simt": 2}

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


def _code(table, value, what, error):
    if isinstance(value, int):
        return value
    code = table.get(value)
    if code is None:
        raise error(f"gemm: unsupported {what} {value!r} (expected one of {', '.join(table)})")
    return code


def gemm(a, a_shape, a_strides, b, b_shape, b_strides, d, d_shape, d_strides, dtype, out_dtype, epilogue="none",
         bias=0, aux=0, aux_strides=None, accumulate=False, stream=0, path="auto", tile_n=0, split_k=0, device=-1):
    """cutegrad._C.gemm with dtype / epilogue / path given by name; returns the kernel's name."""
    return native().gemm(a, a_shape, a_strides, b, b_shape, b_strides, d, d_shape, d_strides,
                         _code(DTYPES, dtype, "dtype", TypeError), _code(DTYPES, out_dtype, "out_dtype", TypeError),
                         _code(EPILOGUES, epilogue, "epilogue", ValueError), bias, aux, aux_strides, accumulate,
                         stream, _code(PATHS, path, "path", ValueError), tile_n, split_k, device)
