"""cutegrad._C.gemm against a float64 NumPy reference.

GPU tests (-m gpu) allocate through cuda-bindings, poison outputs with NaN and
guard D's row padding with a sentinel.  The bad-input tests need no GPU: the
C++ entry validates before it touches a device."""

import itertools
import zlib

import numpy as np
import pytest

from gemm_harness import TOLERANCE, Device, cuda_device_or_skip_reason, gemm_kernel_module, run_gemm

SPECS = gemm_kernel_module().SPECS
_skip_reason = cuda_device_or_skip_reason()
needs_gpu = pytest.mark.skipif(_skip_reason is not None, reason=_skip_reason or "")
LAYOUTS = [("k", "k"), ("k", "n"), ("m", "n"), ("m", "k")]


@pytest.fixture(scope="module")
def C():
    from cutegrad import _C

    return _C


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
                         accumulate=spec.accumulate, path="tensor_core", tile_n=spec.tile_n)
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


EPILOGUE_CASES = list(itertools.product(["none", "bias", "gelu", "bias_gelu", "gelu_bwd"], LAYOUTS, [False, True],
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
    with pytest.raises(ValueError, match="unknown epilogue 'relu'"):
        _call(C, epilogue="relu")
    with pytest.raises(ValueError, match="gelu_bwd needs aux_strides"):
        _call(C, epilogue="gelu_bwd", aux=P)


@pytest.mark.gpu
@needs_gpu
def test_forced_tensor_core_path_rejects_misaligned_strides(C, dev):
    if _sm(dev) != 90:
        pytest.skip("tensor-core GEMM needs sm_90")
    with pytest.raises(ValueError, match="row strides must be multiples of 16 bytes"):
        run_gemm(dev, C, np.random.default_rng(0), batch=1, m=130, n=130, k=131, dtype="bf16", out_dtype="bf16",
                 a_major="k", b_major="k", align=1, path="tensor_core")
    dev.free_all()


def test_extension_holds_every_specialization(C):
    built = {s["name"] for s in C.gemm_specializations()}
    assert built == {s.name for s in SPECS}
