"""Shared pieces of the GEMM tests: device memory through cuda-bindings (the
driver API, no torch), dtype encodings in NumPy, operand layouts, and the
float64 reference of every epilogue."""

import importlib.util
import math
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-3}
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
GELU_K0 = math.sqrt(2.0 / math.pi)
GELU_K1 = 0.044715


def gemm_kernel_module():
    """kernels/cute/gemm.py (the spec list is plain Python; no DSL import)."""
    spec = importlib.util.spec_from_file_location("cutegrad_kernel_gemm", os.path.join(ROOT, "kernels", "cute", "gemm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- dtype encodings (bf16 kept as raw uint16 bits) -------------------------

def encode(values, dtype):
    """float64 array -> storage array of the given dtype."""
    if dtype == "fp32":
        return values.astype(np.float32)
    if dtype == "fp16":
        return values.astype(np.float16)
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
    return rounded.astype(np.uint16)


def decode(storage, dtype):
    if dtype == "bf16":
        return (storage.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return storage.astype(np.float64)


def quantize(values, dtype):
    return decode(encode(values, dtype), dtype)


# ---- device memory ----------------------------------------------------------

def cuda_device_or_skip_reason():
    """None when a CUDA GPU is usable, else the reason to skip."""
    try:
        from cuda.bindings import driver as cu

        (err,) = cu.cuInit(0)
    except Exception as exc:  # no cuda-bindings, or no driver library to load
        return f"no usable CUDA driver: {type(exc).__name__}: {exc}"
    if err != cu.CUresult.CUDA_SUCCESS:
        return f"no CUDA driver/GPU (cuInit: {err.name})"
    err, count = cu.cuDeviceGetCount()
    if err != cu.CUresult.CUDA_SUCCESS or count == 0:
        return "no CUDA GPU"
    return None


class Device:
    """Primary context of GPU 0 (the one the CUDA runtime in cutegrad._C uses)."""

    def __init__(self):
        from cuda.bindings import driver as cu

        self.cu = cu
        self._check(cu.cuInit(0))
        dev = self._check(cu.cuDeviceGet(0))
        self.ctx = self._check(cu.cuDevicePrimaryCtxRetain(dev))
        self._check(cu.cuCtxSetCurrent(self.ctx))
        self.name = self._check(cu.cuDeviceGetName(256, dev)).split(b"\0")[0].decode()
        self._live = []

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {err.name}")
        return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)

    def upload(self, host, extra_bytes=0):
        """Copy a host array to fresh device memory; returns the device address."""
        host = np.ascontiguousarray(host)
        ptr = self._check(self.cu.cuMemAlloc(max(host.nbytes + extra_bytes, 1)))
        if host.nbytes:
            self._check(self.cu.cuMemcpyHtoD(ptr, host, host.nbytes))
        self._live.append(ptr)
        return int(ptr)

    def download(self, ptr, like):
        out = np.empty_like(like)
        self.synchronize()
        if out.nbytes:
            self._check(self.cu.cuMemcpyDtoH(out, ptr, out.nbytes))
        return out

    def synchronize(self):
        self._check(self.cu.cuCtxSynchronize())

    def free_all(self):
        for ptr in self._live:
            self._check(self.cu.cuMemFree(ptr))
        self._live.clear()


# ---- operands -----------------------------------------------------------------

def round_up(x, m):
    return (x + m - 1) // m * m


def layout(batch, rows, cols, contiguous, align):
    """Strides (batch, row, col) of a rows x cols matrix stored with `contiguous`
    ("rows" or "cols") as the unit-stride axis and the leading dimension rounded
    up to `align` elements; returns (strides, number of elements)."""
    inner, outer = (cols, rows) if contiguous == "cols" else (rows, cols)
    ld = max(round_up(inner, align), 1)
    strides = (outer * ld, ld, 1) if contiguous == "cols" else (outer * ld, 1, ld)
    return strides, batch * outer * ld


def _view(flat, shape, strides):
    return np.lib.stride_tricks.as_strided(flat, shape=shape, strides=[st * flat.itemsize for st in strides])


def scatter(values, strides, size, dtype, fill):
    """Store a (batch, rows, cols) float64 array at the given strides."""
    flat = np.full(size, fill, dtype=np.float64)
    _view(flat, values.shape, strides)[...] = values
    return encode(flat, dtype)


def gather(storage, shape, strides, dtype):
    return _view(decode(storage, dtype), shape, strides).copy()


def reference(a, b, epilogue, d_old=None, bias=None, aux=None):
    """float64 epilogue(A @ B (+ D)), same order of operations as the kernels."""
    v = np.matmul(a, b)
    if d_old is not None:
        v = v + d_old
    if epilogue in ("bias", "bias_gelu"):
        v = v + bias[None, None, :]
    if epilogue in ("gelu", "bias_gelu"):
        v = 0.5 * v * (1.0 + np.tanh(GELU_K0 * (v + GELU_K1 * v**3)))
    if epilogue == "gelu_bwd":
        t = np.tanh(GELU_K0 * (aux + GELU_K1 * aux**3))
        v = v * (0.5 * (1.0 + t) + 0.5 * aux * (1.0 - t * t) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * aux * aux))
    return v


def run_gemm(dev, C, rng, *, batch, m, n, k, dtype, out_dtype, a_major, b_major, epilogue="none",
             accumulate=False, align=8, path="auto", tile_n=0):
    """Run one GEMM on fresh random data; returns (kernel name, max relative error).
    D is poisoned with NaN (or holds the accumulate input) and its row padding
    with a sentinel that must survive."""
    a_val = quantize(rng.standard_normal((batch, m, k)), dtype)
    b_val = quantize(rng.standard_normal((batch, k, n)), dtype)
    a_strides, a_size = layout(batch, m, k, "cols" if a_major == "k" else "rows", align)
    b_strides, b_size = layout(batch, k, n, "rows" if b_major == "k" else "cols", align)
    d_strides, d_size = layout(batch, m, n + 3, "cols", align)  # 3+ columns of row padding
    sentinel = 12345.0
    d_old = quantize(rng.standard_normal((batch, m, n)), out_dtype) if accumulate else None
    d_full = np.full((batch, m, n + 3), sentinel)
    d_full[:, :, :n] = np.nan if d_old is None else d_old
    d_host = scatter(d_full, d_strides, d_size, out_dtype, sentinel)
    pad_vals = gather(d_host, (batch, m, n + 3), d_strides, out_dtype)[:, :, n:]
    bias_val = quantize(rng.standard_normal(n), out_dtype) if epilogue in ("bias", "bias_gelu") else None
    aux_val = quantize(2 * rng.standard_normal((batch, m, n)), out_dtype) if epilogue == "gelu_bwd" else None

    pa = dev.upload(scatter(a_val, a_strides, a_size, dtype, 0.0))
    pb = dev.upload(scatter(b_val, b_strides, b_size, dtype, 0.0))
    pd = dev.upload(d_host)
    pbias = dev.upload(encode(bias_val, out_dtype)) if bias_val is not None else 0
    paux, aux_strides = 0, None
    if aux_val is not None:
        aux_strides, aux_size = layout(batch, m, n, "cols", align)
        paux = dev.upload(scatter(aux_val, aux_strides, aux_size, out_dtype, 0.0))
    name = C.gemm(pa, (batch, m, k), a_strides, pb, (batch, k, n), b_strides, pd, (batch, m, n), d_strides,
                  dtype, out_dtype, epilogue=epilogue, bias=pbias, aux=paux, aux_strides=aux_strides,
                  accumulate=accumulate, path=path, tile_n=tile_n)
    out_storage = dev.download(pd, d_host)
    out_full = gather(out_storage, (batch, m, n + 3), d_strides, out_dtype)
    dev.free_all()
    assert np.array_equal(out_full[:, :, n:], pad_vals), f"{name} wrote outside D (row padding changed)"
    out = out_full[:, :, :n]
    ref = reference(a_val, b_val, epilogue, d_old, bias_val, aux_val)
    assert not np.isnan(out).any(), f"{name} left NaN in D (unwritten elements)"
    scale = max(np.abs(ref).max(initial=0.0), 1e-6)
    return name, float(np.abs(out - ref).max(initial=0.0) / scale)
