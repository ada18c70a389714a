"""The float32 matmul precision: PyTorch's switches, one state behind them.

`cutegrad.set_float32_matmul_precision("highest" | "high" | "medium")`,
`cutegrad.get_float32_matmul_precision()` and
`cutegrad.backends.cuda.matmul.allow_tf32` (True <-> "high", False <-> "highest")
read and write the same setting, as in PyTorch.  The default is "highest": fp32
GEMMs compute in full fp32.  What each level does on the GPU is in
frontend/backends/cuda/linalg.py; the CPU backend always computes exactly.
"""

_LEVELS = ("highest", "high", "medium")
_precision = "highest"


def set_float32_matmul_precision(precision):
    """Set the internal precision of float32 matrix multiplications ("highest", "high" or "medium")."""
    global _precision
    if precision not in _LEVELS:
        raise ValueError(f"set_float32_matmul_precision: precision must be one of {', '.join(map(repr, _LEVELS))}, "
                         f"got {precision!r}")
    _precision = precision


def get_float32_matmul_precision():
    """The current float32 matmul precision ("highest" by default)."""
    return _precision


class CudaMatmulSettings:
    """`cutegrad.backends.cuda.matmul`: allow_tf32 mirrors the float32 matmul precision."""

    __slots__ = ()

    @property
    def allow_tf32(self):
        return _precision != "highest"

    @allow_tf32.setter
    def allow_tf32(self, value):
        set_float32_matmul_precision("high" if value else "highest")

    def __repr__(self):
        return f"<cutegrad.backends.cuda.matmul allow_tf32={self.allow_tf32}>"


cuda_matmul = CudaMatmulSettings()
