"""cutegrad._C.gemm against a float64 NumPy reference.

GPU tests (-m gpu) allocate through cuda-bindings, poison outputs with NaN and
guard D's row padding with a sentinel.  The bad-input tests need no GPU: the
C++ entry validates before it touches a device."""

import importlib.util
import itertools
import math
import os
import zlib

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-3, "tf32": 1e-3}
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
    """float64 array -> storage array of the given dtype (tf32: fp32 storage)."""
    if dtype in ("fp32", "tf32"):
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


def tf32_truncate(values):
    """fp32 values with the low 13 mantissa bits cleared: exactly representable in TF32."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return bits.view(np.float32).astype(np.float64)


def quantize(values, dtype):
    """values rounded to what dtype holds (tf32: test data exact in TF32, so a TF32 kernel's
    products are exact and only its accumulation order differs from the reference)."""
    if dtype == "tf32":
        return tf32_truncate(values)
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


BIAS_EPILOGUES = ("bias", "bias_gelu", "bias_residual", "bias_gelu_aux")
AUX_INPUT_EPILOGUES = ("gelu_bwd", "residual", "bias_residual")


def reference(a, b, epilogue, d_old=None, bias=None, aux=None, out_dtype="fp32"):
    """float64 epilogue(A @ B (+ D)), same order of operations as the kernels.
    Returns (D, pre-activation written to aux or None)."""
    v = np.matmul(a, b)
    if d_old is not None:
        v = v + d_old
    if epilogue in BIAS_EPILOGUES:
        v = v + bias[None, None, :]
    preact = None
    if epilogue == "bias_gelu_aux":
        preact = quantize(v, out_dtype)
        v = preact
    if epilogue in ("gelu", "bias_gelu", "bias_gelu_aux"):
        v = 0.5 * v * (1.0 + np.tanh(GELU_K0 * (v + GELU_K1 * v**3)))
    if epilogue == "gelu_bwd":
        t = np.tanh(GELU_K0 * (aux + GELU_K1 * aux**3))
        v = v * (0.5 * (1.0 + t) + 0.5 * aux * (1.0 - t * t) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * aux * aux))
    if epilogue in ("residual", "bias_residual"):
        v = v + aux
    return v, preact


def run_gemm(dev, C, rng, *, batch, m, n, k, dtype, out_dtype, a_major, b_major, epilogue="none",
             accumulate=False, align=8, aux_align=None, path="auto", tile_n=0, split_k=0, return_output=False):
    """Run one GEMM on fresh random data; returns (kernel name, max relative error) and, with
    return_output, D and the stored pre-activation (None unless bias_gelu_aux) as well.
    D is poisoned with NaN (or holds the accumulate input) and its row padding
    with a sentinel that must survive; so is aux when the epilogue writes it.
    aux_align: aux's leading-dimension rounding (default: align)."""
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
    bias_val = quantize(rng.standard_normal(n), out_dtype) if epilogue in BIAS_EPILOGUES else None
    aux_val = quantize(2 * rng.standard_normal((batch, m, n)), out_dtype) if epilogue in AUX_INPUT_EPILOGUES else None

    pa = dev.upload(scatter(a_val, a_strides, a_size, dtype, 0.0))
    pb = dev.upload(scatter(b_val, b_strides, b_size, dtype, 0.0))
    pd = dev.upload(d_host)
    pbias = dev.upload(encode(bias_val, out_dtype)) if bias_val is not None else 0
    paux, aux_strides, aux_host = 0, None, None
    if aux_val is not None:
        aux_strides, aux_size = layout(batch, m, n, "cols", align)
        paux = dev.upload(scatter(aux_val, aux_strides, aux_size, out_dtype, 0.0))
    elif epilogue == "bias_gelu_aux":
        aux_strides, aux_size = layout(batch, m, n + 3, "cols", align if aux_align is None else aux_align)
        aux_full = np.full((batch, m, n + 3), sentinel)
        aux_full[:, :, :n] = np.nan
        aux_host = scatter(aux_full, aux_strides, aux_size, out_dtype, sentinel)
        aux_pad = gather(aux_host, (batch, m, n + 3), aux_strides, out_dtype)[:, :, n:]  # the sentinel as stored
        paux = dev.upload(aux_host)
    name = C.gemm(pa, (batch, m, k), a_strides, pb, (batch, k, n), b_strides, pd, (batch, m, n), d_strides,
                  dtype, out_dtype, epilogue=epilogue, bias=pbias, aux=paux, aux_strides=aux_strides,
                  accumulate=accumulate, path=path, tile_n=tile_n, split_k=split_k)
    out_storage = dev.download(pd, d_host)
    out_full = gather(out_storage, (batch, m, n + 3), d_strides, out_dtype)
    aux_out = gather(dev.download(paux, aux_host), (batch, m, n + 3), aux_strides, out_dtype) \
        if aux_host is not None else None
    dev.free_all()
    assert np.array_equal(out_full[:, :, n:], pad_vals), f"{name} wrote outside D (row padding changed)"
    out = out_full[:, :, :n]
    ref, preact = reference(a_val, b_val, epilogue, d_old, bias_val, aux_val, out_dtype)
    assert not np.isnan(out).any(), f"{name} left NaN in D (unwritten elements)"
    scale = max(np.abs(ref).max(initial=0.0), 1e-6)
    err = float(np.abs(out - ref).max(initial=0.0) / scale)
    if aux_out is not None:
        assert np.array_equal(aux_out[:, :, n:], aux_pad), f"{name} wrote outside aux (row padding changed)"
        assert not np.isnan(aux_out[:, :, :n]).any(), f"{name} left NaN in the stored pre-activation"
        pscale = max(np.abs(preact).max(initial=0.0), 1e-6)
        err = max(err, float(np.abs(aux_out[:, :, :n] - preact).max(initial=0.0) / pscale))
    if return_output:
        return name, err, out, None if aux_out is None else aux_out[:, :, :n]
    return name, err


# ---- tests ---------------------------------------------------------------------




SPECS = gemm_kernel_module().SPECS
_skip_reason = cuda_device_or_skip_reason()
needs_gpu = pytest.mark.skipif(_skip_reason is not None, reason=_skip_reason or "")
LAYOUTS = [("k", "k"), ("k", "n"), ("m", "n"), ("m", "k")]


class _NamedCodes:
    """cutegrad._C with gemm() taking dtype / epilogue / path by name (cutegrad._gemm.gemm)."""

    def __init__(self):
        from cutegrad import _C, _gemm

        self.raw = _C
        self.gemm = _gemm.gemm
        self.gemm_specializations = _C.gemm_specializations


@pytest.fixture(scope="module")
def C():
    return _NamedCodes()


@pytest.fixture(scope="module")
def dev():
    return Device()


def _sm(dev):
    from cuda.bindings import driver as cu

    major = dev._check(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, 0))
    minor = dev._check(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, 0))
    return major * 10 + minor


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@pytest.mark.parametrize("shape", [(1, 200, 328, 136), (3, 136, 264, 72)], ids=["partial-tiles", "batched"])
@pytest.mark.gpu
@needs_gpu
def test_every_specialization(C, dev, spec, shape):
    if _sm(dev) != int(spec.arch[3:5]):
        pytest.skip(f"{spec.arch} kernel on a different GPU")
    batch, m, n, k = shape
    rng = np.random.default_rng(zlib.crc32(f"{spec.name}{shape}".encode()))
    name, err = run_gemm(dev, C, rng, batch=batch, m=m, n=n, k=k, dtype=spec.ab_dtype, out_dtype=spec.out_dtype,
                         a_major=spec.a_major, b_major=spec.b_major, epilogue=spec.epilogue,
                         accumulate=spec.accumulate, path="tensor_core", tile_n=spec.tile_n, split_k=1)
    assert name == spec.name
    assert err < TOLERANCE[spec.ab_dtype], f"{name}: relative error {err:.2e}"


SWEEP = [
    (1, 1, 1, 1), (1, 7, 8, 127), (1, 8, 7, 1), (1, 127, 127, 127), (1, 1, 4097, 8), (1, 4097, 7, 8),
    (1, 127, 8, 4097), (1, 4097, 127, 64), (1, 64, 4097, 127), (1, 256, 4097, 512), (2, 4097, 136, 72),
    (1, 1000, 1000, 1000), (4, 127, 129, 65),
]


@pytest.mark.parametrize("shape", SWEEP, ids=["x".join(map(str, s)) for s in SWEEP])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["a%s-b%s" % l for l in LAYOUTS])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("align", [1, 8], ids=["compact", "aligned"])
@pytest.mark.gpu
@needs_gpu
def test_shape_sweep(C, dev, shape, layout, dtype, align):
    batch, m, n, k = shape
    rng = np.random.default_rng(m * 7919 + n * 104729 + k)
    name, err = run_gemm(dev, C, rng, batch=batch, m=m, n=n, k=k, dtype=dtype, out_dtype=dtype,
                         a_major=layout[0], b_major=layout[1], align=align)
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


EPILOGUE_CASES = list(itertools.product(list(gemm_kernel_module().EPILOGUES), LAYOUTS, [False, True],
                                        ["bf16", "fp16"], ["same", "fp32"]))


@pytest.mark.parametrize("epilogue,layout,accumulate,dtype,out", EPILOGUE_CASES,
                         ids=["-".join([e, "a%s-b%s" % l, "acc" if a else "set", d, o]) for e, l, a, d, o in EPILOGUE_CASES])
@pytest.mark.gpu
@needs_gpu
def test_every_epilogue_and_layout(C, dev, epilogue, layout, accumulate, dtype, out):
    out_dtype = dtype if out == "same" else out
    rng = np.random.default_rng(len(epilogue) * 31 + accumulate)
    name, err = run_gemm(dev, C, rng, batch=2, m=300, n=520, k=264, dtype=dtype, out_dtype=out_dtype,
                         a_major=layout[0], b_major=layout[1], epilogue=epilogue, accumulate=accumulate)
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


SPLIT_CASES = list(itertools.product(["none", "bias_gelu", "gelu_bwd", "bias_residual", "bias_gelu_aux"], LAYOUTS,
                                     [False, True]))


@pytest.mark.parametrize("epilogue,layout,accumulate", SPLIT_CASES,
                         ids=["-".join([e, "a%s-b%s" % l, "acc" if a else "set"]) for e, l, a in SPLIT_CASES])
@pytest.mark.parametrize("path", ["auto", "simt"])
@pytest.mark.gpu
@needs_gpu
def test_split_k(C, dev, epilogue, layout, accumulate, path):
    """Few output tiles, long K: partial products in an fp32 workspace, then the reduction applies the epilogue."""
    rng = np.random.default_rng(len(epilogue) + 3 * accumulate)
    name, err = run_gemm(dev, C, rng, batch=1, m=256, n=264, k=4096, dtype="bf16", out_dtype="bf16",
                         a_major=layout[0], b_major=layout[1], epilogue=epilogue, accumulate=accumulate, path=path,
                         split_k=0 if path == "auto" else 8)
    assert name.startswith("splitk"), name
    if path == "auto":
        assert "gemm_sm_90a" in name or _sm(dev) != 90, name
    assert err < TOLERANCE["bf16"], f"{name}: relative error {err:.2e}"


# The data-parallel + split-K hybrid (kernels/cuda/module.cpp plan_split): gpt2-small's fc1 / fc2
# weight-gradient shapes cut by rows / columns, and the forward / input-gradient layouts with the
# epilogues whose bias / aux pointers the column / row cut moves.
HYBRID_CASES = [((3072, 768, 8192), ("m", "n"), "none", False), ((768, 3072, 8192), ("m", "n"), "none", True),
                ((768, 3072, 8192), ("k", "k"), "bias", False), ((3072, 768, 8192), ("k", "n"), "gelu_bwd", False)]


@pytest.mark.parametrize("shape,layout,epilogue,accumulate", HYBRID_CASES, ids=str)
@pytest.mark.gpu
@needs_gpu
def test_split_k_hybrid_is_right_and_deterministic(C, dev, shape, layout, epilogue, accumulate):
    from cuda.bindings import driver as cu

    if _sm(dev) != 90:
        pytest.skip("the hybrid runs the tensor-core kernels (sm_90a)")
    m, n, k = shape
    sms = dev._check(cu.cuDeviceGetAttribute(cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, 0))
    plan = C.raw.gemm_split_plan(m, n, k, 1, sms, 8 if "k" in layout else 1)
    if not (plan[0] or plan[1]):
        pytest.skip(f"no hybrid for {shape} on {sms} SMs: plan {plan}")
    outs = []
    for _ in range(2):  # the same data twice: the fixed slice order gives the same bits
        name, err, out, _ = run_gemm(dev, C, np.random.default_rng(11), batch=1, m=m, n=n, k=k, dtype="bf16",
                                  out_dtype="bf16", a_major=layout[0], b_major=layout[1], epilogue=epilogue,
                                  accumulate=accumulate, return_output=True)
        assert err < TOLERANCE["bf16"], f"{name}: relative error {err:.2e}"
        outs.append(out)
    assert name.count("gemm_sm_90a") == 2 and f"+splitk{plan[2]}:" in name, (name, plan)
    assert np.array_equal(outs[0], outs[1]), f"{name}: two runs differ"


AUX_SPECS = [s for s in SPECS if s.epilogue == "bias_gelu_aux"]
# Odd M (a partial M tile), N a partial tile of 128 and of 256, K a partial K block; and a batch.
AUX_SHAPES = [(1, 201, 328, 136), (3, 129, 136, 72)]
# Bits of precision of each output dtype (the rounding of D is at most half an ulp: 2^-bits relative).
MANTISSA_BITS = {"bf16": 8, "fp16": 11, "fp32": 24}


@pytest.mark.parametrize("spec", AUX_SPECS, ids=[s.name for s in AUX_SPECS])
@pytest.mark.parametrize("shape", AUX_SHAPES, ids=["x".join(map(str, s)) for s in AUX_SHAPES])
@pytest.mark.gpu
@needs_gpu
def test_stored_preactivation_is_the_bias_epilogue_output_bit_for_bit(C, dev, spec, shape):
    """bias_gelu_aux's aux (TMA-stored through shared memory) is exactly what the bias epilogue of
    the same tile writes to D from the same data (the same mainloop, + bias, one rounding), and
    D is GELU of that rounded value.  Outputs start as NaN with a sentinel in the row padding."""
    if _sm(dev) != int(spec.arch[3:5]):
        pytest.skip(f"{spec.arch} kernel on a different GPU")
    batch, m, n, k = shape
    outputs = {}
    for epilogue in ("bias", "bias_gelu_aux"):
        rng = np.random.default_rng(zlib.crc32(f"{spec.name}{shape}".encode()))  # the same data for both
        name, err, out, aux = run_gemm(dev, C, rng, batch=batch, m=m, n=n, k=k, dtype=spec.ab_dtype,
                                       out_dtype=spec.out_dtype, a_major="k", b_major="k", epilogue=epilogue,
                                       path="tensor_core", tile_n=spec.tile_n, split_k=1, return_output=True)
        assert name == spec.name.replace("bias_gelu_aux", epilogue)
        assert err < TOLERANCE[spec.ab_dtype], f"{name}: relative error {err:.2e}"
        outputs[epilogue] = out, aux
    z = outputs["bias_gelu_aux"][1]
    assert np.array_equal(z, outputs["bias"][0]), f"{spec.name}: aux differs from the bias epilogue's D"
    gelu = 0.5 * z * (1.0 + np.tanh(GELU_K0 * (z + GELU_K1 * z**3)))
    # D rounds GELU(z) once (half an ulp) after a tanh.approx (absolute error < 2^-10.9) scaled by z / 2.
    bound = 2.0 ** -MANTISSA_BITS[spec.out_dtype] * np.abs(gelu) + 2.0 ** -11 * np.abs(z) + 1e-30
    assert (np.abs(outputs["bias_gelu_aux"][0] - gelu) <= bound).all(), f"{spec.name}: D is not GELU(aux)"


# Odd M and odd N: D's rows are not 16-byte multiples, so TMA cannot store them (SIMT fallback);
# odd M with N a partial tile of 8-aligned rows takes the tensor-core kernel on sm_90.
AUX_AUTO_SHAPES = [(1, 201, 199, 136), (1, 201, 328, 136), (2, 77, 45, 33)]


@pytest.mark.parametrize("shape", AUX_AUTO_SHAPES, ids=["x".join(map(str, s)) for s in AUX_AUTO_SHAPES])
@pytest.mark.parametrize("dtype,out_dtype", [("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32")])
@pytest.mark.gpu
@needs_gpu
def test_bias_gelu_aux_odd_shapes_auto_path(C, dev, shape, dtype, out_dtype):
    batch, m, n, k = shape
    rng = np.random.default_rng(m * 3 + n * 5 + k)
    name, err = run_gemm(dev, C, rng, batch=batch, m=m, n=n, k=k, dtype=dtype, out_dtype=out_dtype, a_major="k",
                         b_major="k", epilogue="bias_gelu_aux", split_k=1)
    if n % 8 == 0 and _sm(dev) == 90:
        assert name.startswith("gemm_sm_90a_") and name.endswith("_bias_gelu_aux"), name
    else:
        assert name == "simt", name
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.gpu
@needs_gpu
def test_bias_gelu_aux_needs_16_byte_aux_strides_for_tma(C, dev):
    """aux is TMA-stored: a row stride that is not a 16-byte multiple is refused on the forced
    tensor-core path (a clear error before launch) and runs the SIMT kernel on the auto path."""
    if _sm(dev) != 90:
        pytest.skip("tensor-core GEMM needs sm_90")
    shape = dict(batch=1, m=136, n=136, k=136, dtype="bf16", out_dtype="bf16", a_major="k", b_major="k",
                 epilogue="bias_gelu_aux", aux_align=1, split_k=1)  # aux row stride 139 elements
    with pytest.raises(ValueError, match="aux row and batch strides must be multiples of 16 bytes"):
        run_gemm(dev, C, np.random.default_rng(0), path="tensor_core", **shape)
    dev.free_all()
    name, err = run_gemm(dev, C, np.random.default_rng(0), **shape)
    assert name == "simt", name
    assert err < TOLERANCE["bf16"], f"{name}: relative error {err:.2e}"


NARROW_CASES = [(1, 1000, 10, 256, "none"), (1, 4096, 36, 128, "bias"), (2, 300, 64, 72, "bias"), (1, 129, 17, 40, "none")]


@pytest.mark.parametrize("batch,m,n,k,epilogue", NARROW_CASES, ids=["x".join(map(str, c[:4])) + c[4] for c in NARROW_CASES])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.gpu
@needs_gpu
def test_narrow_heads_take_tensor_cores_with_unaligned_rows(C, dev, batch, m, n, k, epilogue, dtype):
    """Classifier heads: N <= 64 picks a narrow tile even when D's rows (N + 3 padding, compact)
    are not 16-byte multiples; the padding must survive the predicated stores."""
    if _sm(dev) != 90:
        pytest.skip("tensor-core GEMM needs sm_90")
    rng = np.random.default_rng(m + n + k)
    name, err = run_gemm(dev, C, rng, batch=batch, m=m, n=n, k=k, dtype=dtype, out_dtype=dtype, a_major="k",
                         b_major="k", epilogue=epilogue, align=1, path="tensor_core", split_k=1)
    tile = 16 if n <= 16 else 32 if n <= 32 else 64
    assert name.endswith(f"128x{tile}_{epilogue}"), name
    assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


# ---- bad input: raises before launch (no GPU needed) --------------------------

P = 1 << 20  # a 16-byte aligned address that is never dereferenced


def _call(C, **over):
    args = dict(a=P, a_shape=(1, 64, 32), a_strides=(2048, 32, 1), b=P, b_shape=(1, 32, 48), b_strides=(1536, 48, 1),
                d=P, d_shape=(1, 64, 48), d_strides=(3072, 48, 1), dtype="bf16", out_dtype="bf16")
    args.update(over)
    return C.gemm(**args)


def test_mismatched_k_raises(C):
    with pytest.raises(ValueError, match="K mismatch"):
        _call(C, b_shape=(1, 33, 48))


def test_wrong_dtype_raises(C):
    with pytest.raises(TypeError, match="dtype 'int8'"):
        _call(C, dtype="int8")
    with pytest.raises(TypeError, match="out_dtype"):
        _call(C, out_dtype="float64")


def test_misaligned_pointer_raises(C):
    with pytest.raises(ValueError, match="A pointer .* not aligned"):
        _call(C, a=P + 1)
    with pytest.raises(ValueError, match="bias is a null pointer"):
        _call(C, epilogue="bias")


def test_noncontiguous_inner_dimension_raises(C):
    with pytest.raises(ValueError, match="A has no unit stride"):
        _call(C, a_strides=(4096, 64, 2))
    with pytest.raises(ValueError, match="D must have unit stride"):
        _call(C, d_strides=(3072, 1, 64))


def test_bad_shapes_and_options_raise(C):
    with pytest.raises(ValueError, match="D shape"):
        _call(C, d_shape=(1, 64, 47))
    with pytest.raises(ValueError, match="batch mismatch"):
        _call(C, b_shape=(2, 32, 48))
    with pytest.raises(ValueError, match="unsupported epilogue 'relu'"):
        _call(C, epilogue="relu")
    with pytest.raises(ValueError, match="gelu_bwd needs aux_strides"):
        _call(C, epilogue="gelu_bwd", aux=P)
    for epilogue in ("residual", "bias_residual", "bias_gelu_aux"):
        with pytest.raises(ValueError, match="aux is a null pointer"):
            _call(C, epilogue=epilogue, bias=P)
        with pytest.raises(ValueError, match=f"{epilogue} needs aux_strides"):
            _call(C, epilogue=epilogue, bias=P, aux=P)
    with pytest.raises(ValueError, match="aux rows overlap"):
        _call(C, epilogue="bias_gelu_aux", bias=P, aux=P, aux_strides=(3072, 40, 1))
    batched = dict(a_shape=(2, 64, 32), b_shape=(2, 32, 48), d_shape=(2, 64, 48))
    with pytest.raises(ValueError, match="aux batch stride is 0 with batch > 1"):
        _call(C, epilogue="bias_gelu_aux", bias=P, aux=P + 4096, aux_strides=(0, 48, 1), **batched)
    with pytest.raises(ValueError, match="aux and D are the same memory"):
        _call(C, epilogue="bias_gelu_aux", bias=P, aux=P, aux_strides=(3072, 48, 1))


def test_integer_codes_are_validated_by_the_native_entry(C):
    """_C.gemm itself takes integer codes; out-of-range ones raise before anything runs."""
    with pytest.raises(TypeError, match="unsupported dtype code 4"):
        _call(C, dtype=4)
    with pytest.raises(TypeError, match="unsupported out_dtype code -1"):
        _call(C, out_dtype=-1)
    with pytest.raises(TypeError, match="unsupported out_dtype code 3"):  # tf32 is an operand dtype only
        _call(C, dtype=3, out_dtype=3)
    with pytest.raises(ValueError, match="tf32 operands need out_dtype fp32"):
        _call(C, dtype=3, out_dtype=0)
    with pytest.raises(ValueError, match="unknown epilogue code 8"):
        _call(C, epilogue=8)
    with pytest.raises(ValueError, match="path code must be"):
        _call(C, path=3)


@pytest.mark.gpu
@needs_gpu
def test_forced_tensor_core_path_rejects_misaligned_strides(C, dev):
    if _sm(dev) != 90:
        pytest.skip("tensor-core GEMM needs sm_90")
    with pytest.raises(ValueError, match="row strides must be multiples of 16 bytes"):
        run_gemm(dev, C, np.random.default_rng(0), batch=1, m=136, n=136, k=136, dtype="bf16", out_dtype="bf16",
                 a_major="k", b_major="k", align=3, path="tensor_core", split_k=1)
    dev.free_all()


@pytest.mark.gpu
@needs_gpu
def test_forced_tensor_core_path_rejects_unaligned_extent(C, dev):
    if _sm(dev) != 90:
        pytest.skip("tensor-core GEMM needs sm_90")
    with pytest.raises(ValueError, match="contiguous extents must be multiples of 16 bytes"):
        run_gemm(dev, C, np.random.default_rng(0), batch=1, m=128, n=127, k=128, dtype="bf16", out_dtype="bf16",
                 a_major="k", b_major="k", path="tensor_core", split_k=1)
    dev.free_all()


def test_split_k_option_is_validated(C):
    with pytest.raises(ValueError, match="split_k=3 needs batch 1 and K"):
        _call(C, split_k=3)
    with pytest.raises(ValueError, match="split_k must be"):
        _call(C, split_k=-1)


@pytest.mark.parametrize("m,n,k", [(300, 264, 520), (129, 136, 1000), (4096, 4096, 4096)], ids=str)
@pytest.mark.gpu
@needs_gpu
def test_tf32_products_of_full_fp32_data(C, dev, m, n, k):
    """fp32 data that TF32 cannot hold exactly: the TF32 kernel runs (its name says so) and its
    error is that of 10-bit operands (above fp32's, below bf16's)."""
    if _sm(dev) != 90:
        pytest.skip("the TF32 kernels are built for sm_90a")
    rng = np.random.default_rng(m + n + k)
    a_val, b_val = rng.standard_normal((1, m, k)).astype(np.float32), rng.standard_normal((1, k, n)).astype(np.float32)
    pa, pb = dev.upload(np.ascontiguousarray(a_val)), dev.upload(np.ascontiguousarray(b_val.transpose(0, 2, 1)))
    d_host = np.full((m, n), np.nan, dtype=np.float32)
    pd = dev.upload(d_host)
    name = C.gemm(pa, (1, m, k), (m * k, k, 1), pb, (1, k, n), (n * k, 1, k), pd, (1, m, n), (m * n, n, 1),
                  "tf32", "fp32", split_k=1)
    out = dev.download(pd, d_host).astype(np.float64)
    dev.free_all()
    assert "_tf32_fp32_ak_bk_" in name, name
    want = a_val[0].astype(np.float64) @ b_val[0].astype(np.float64)
    err = np.abs(out - want).max() / np.abs(want).max()
    assert 1e-6 < err < 4e-3, f"{name}: relative error {err:.2e}"


def test_extension_holds_every_specialization(C):
    built = {s["name"] for s in C.gemm_specializations()}
    assert built == {s.name for s in SPECS}


# ---- the tiled SIMT kernel (fp32 GEMMs, narrow outputs, anything TMA cannot take) -----------
SIMT_EXTENTS = [1, 7, 33, 129, 1000]
SIMT_SHAPES = list(itertools.product(SIMT_EXTENTS, SIMT_EXTENTS, SIMT_EXTENTS))


@pytest.mark.parametrize("mnk", SIMT_SHAPES, ids=["x".join(map(str, s)) for s in SIMT_SHAPES])
@pytest.mark.gpu
@needs_gpu
def test_simt_fp32_every_extent(C, dev, mnk):
    """Each (M, N, K) with every operand major in turn (cycled per shape) and compact odd strides."""
    m, n, k = mnk
    index = SIMT_SHAPES.index(mnk)
    a_major, b_major = LAYOUTS[index % len(LAYOUTS)]
    rng = np.random.default_rng(index)
    name, err = run_gemm(dev, C, rng, batch=1, m=m, n=n, k=k, dtype="fp32", out_dtype="fp32", a_major=a_major,
                         b_major=b_major, align=1, path="simt", split_k=1)
    assert name == "simt"
    assert err < TOLERANCE["fp32"], f"relative error {err:.2e}"


# (batch, M, N, K): narrow N (128x32 tiles), few tiles (64x64), enough tiles for 128x128 tiles.
SIMT_CONFIG_SHAPES = [(1, 1000, 36, 129), (3, 129, 10, 33), (2, 200, 200, 129), (3, 1000, 1000, 129), (5, 7, 33, 1000)]


@pytest.mark.parametrize("shape", SIMT_CONFIG_SHAPES, ids=["x".join(map(str, s)) for s in SIMT_CONFIG_SHAPES])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["a%s-b%s" % l for l in LAYOUTS])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.gpu
@needs_gpu
def test_simt_batched_every_layout(C, dev, shape, layout, dtype):
    batch, m, n, k = shape
    rng = np.random.default_rng(m * 31 + n * 7 + k + batch)
    name, err = run_gemm(dev, C, rng, batch=batch, m=m, n=n, k=k, dtype=dtype, out_dtype=dtype, a_major=layout[0],
                         b_major=layout[1], align=1, path="simt", split_k=1)
    assert name == "simt"
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


SIMT_EPILOGUE_CASES = list(itertools.product(["none", "bias", "gelu", "bias_gelu", "gelu_bwd"], [False, True],
                                             [(1, 1000, 36, 129), (2, 200, 200, 33), (3, 1000, 1000, 65)]))


@pytest.mark.parametrize("epilogue,accumulate,shape", SIMT_EPILOGUE_CASES,
                         ids=["-".join([e, "acc" if a else "set", "x".join(map(str, s))])
                              for e, a, s in SIMT_EPILOGUE_CASES])
@pytest.mark.parametrize("dtype,out_dtype", [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")])
@pytest.mark.gpu
@needs_gpu
def test_simt_epilogues(C, dev, epilogue, accumulate, shape, dtype, out_dtype):
    batch, m, n, k = shape
    rng = np.random.default_rng(len(epilogue) * 13 + accumulate + n)
    name, err = run_gemm(dev, C, rng, batch=batch, m=m, n=n, k=k, dtype=dtype, out_dtype=out_dtype, a_major="k",
                         b_major="k", epilogue=epilogue, accumulate=accumulate, align=1, path="simt", split_k=1)
    assert name == "simt"
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("m", [1, 7, 129, 1000])
@pytest.mark.parametrize("n", [10, 36])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["a%s-b%s" % l for l in LAYOUTS])
@pytest.mark.gpu
@needs_gpu
def test_bf16_narrow_n_auto_path(C, dev, m, n, layout):
    """Classifier-head GEMMs as the frontend issues them (path auto, split-K heuristic on)."""
    rng = np.random.default_rng(m + n)
    name, err = run_gemm(dev, C, rng, batch=1, m=m, n=n, k=256, dtype="bf16", out_dtype="bf16", a_major=layout[0],
                         b_major=layout[1])
    assert err < TOLERANCE["bf16"], f"{name}: relative error {err:.2e}"
